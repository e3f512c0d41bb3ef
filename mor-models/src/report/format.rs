//! Number formatting and text escaping shared by the table, CSV, SVG and HTML writers.

/// The placeholder for a missing value in human-readable output (an en dash).
pub const MISSING: &str = "–";

/// Formats a count with an SI suffix and three significant digits: `950`, `1.2K`, `315M`,
/// `1.61B`; trailing zeros are dropped (`1.20M` becomes `1.2M`).
///
/// # Examples
///
/// ```
/// use mor_models::report::humanize_count;
/// assert_eq!(humanize_count(315_000_000), "315M");
/// assert_eq!(humanize_count(1_234_567), "1.23M");
/// assert_eq!(humanize_count(1_610_000_000), "1.61B");
/// assert_eq!(humanize_count(999), "999");
/// ```
pub fn humanize_count(n: u64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")];
    let x = n as f64;
    if x < 1e3 {
        return n.to_string();
    }
    // Pick the unit after rounding, so 999_999 reads 1M rather than 1000K.
    for (i, &(scale, suffix)) in UNITS.iter().enumerate() {
        if x >= scale * 0.9995 || i == UNITS.len() - 1 {
            let v = x / scale;
            let decimals = if v >= 99.95 {
                0
            } else if v >= 9.995 {
                1
            } else {
                2
            };
            return format!("{}{suffix}", trim_zeros(&format!("{v:.decimals$}")));
        }
    }
    n.to_string()
}

/// Formats a large real number in scientific notation with up to three significant digits,
/// the way FLOPs are usually written (`3.1e13`, `1.65e19`, `2e18`); `0` stays `0`.
///
/// Non-finite values print as `NaN`, `inf` or `-inf`.
///
/// # Examples
///
/// ```
/// use mor_models::report::format_sci;
/// assert_eq!(format_sci(3.1e13), "3.1e13");
/// assert_eq!(format_sci(1.65e19), "1.65e19");
/// assert_eq!(format_sci(2.0e18), "2e18");
/// assert_eq!(format_sci(0.0), "0");
/// ```
pub fn format_sci(x: f64) -> String {
    if !x.is_finite() {
        return non_finite(x);
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
        None => s,
    }
}

/// Formats `x` with a fixed number of decimals; non-finite values print as `NaN`/`inf`.
pub fn format_fixed(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        non_finite(x)
    }
}

/// Formats a fraction in `[0, 1]` as a percentage with one decimal (`0.992` is `99.2`).
pub fn format_percent(x: f64) -> String {
    format_fixed(x * 100.0, 1)
}

/// Formats an optional value with `f`, or [`MISSING`].
pub fn or_missing(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| MISSING.to_string())
}

/// A machine-readable rendering of a float: the shortest text that parses back to the same
/// value, in exponent form for magnitudes from `1e15` up or below `1e-4` (`1.65e19`), and
/// `NaN`, `inf`, `-inf` for non-finite values.
pub fn format_exact(x: f64) -> String {
    if !x.is_finite() {
        non_finite(x)
    } else if x != 0.0 && !(1e-4..1e15).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

fn non_finite(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else if x > 0.0 {
        "inf".to_string()
    } else {
        "-inf".to_string()
    }
}

/// Drops trailing zeros (and a trailing point) after a decimal point.
fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// Escapes text for XML and HTML content and attribute values: `&`, `<`, `>`, `"` and `'`.
/// Control characters other than tab, newline and carriage return are dropped, since XML 1.0
/// cannot carry them.
///
/// # Examples
///
/// ```
/// use mor_models::report::escape_xml;
/// assert_eq!(escape_xml(r#"a<b & "c" 'd'>"#), "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;");
/// ```
pub fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Quotes one CSV field as RFC 4180 asks: a field holding a comma, a double quote, CR or LF
/// is wrapped in double quotes, with inner quotes doubled.
///
/// # Examples
///
/// ```
/// use mor_models::report::csv_field;
/// assert_eq!(csv_field("plain"), "plain");
/// assert_eq!(csv_field(r#"a,"b""#), r#""a,""b""""#);
/// ```
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Makes text safe inside a Markdown table cell: pipes and backslashes are escaped and line
/// breaks become spaces.
pub fn markdown_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '\\' => out.push_str("\\\\"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}
