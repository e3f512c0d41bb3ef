//! The results table (spec §6.1) as Markdown and as RFC 4180 CSV.
//!
//! Both renderings come from one column list, so the two files always agree on the column
//! order; Markdown cells are humanised (`315M`, `3.1e13`, percentages), CSV cells are exact.

use super::format::{
    csv_field, format_exact, format_fixed, format_percent, format_sci, humanize_count,
    markdown_cell, or_missing, MISSING,
};
use super::types::RunSummary;

/// One column: its Markdown header, its CSV header and how to render a run in each; a
/// column with a standard error (`se`) has it beside the value in Markdown and in a CSV
/// column of its own right after the value's.
struct Column {
    header: &'static str,
    csv: &'static str,
    numeric: bool,
    human: fn(&RunSummary) -> String,
    exact: fn(&RunSummary) -> String,
    se: Option<(&'static str, fn(&RunSummary) -> Option<f64>)>,
}

/// An NLL with its standard error, `4.123 ± 0.012`: three decimals, more (up to six) when
/// the standard error is below 0.005, so that it keeps two significant digits; four
/// decimals and no `±` without a standard error; `NaN` for a non-finite NLL.
///
/// # Examples
///
/// ```
/// use mor_models::report::format_nll;
/// assert_eq!(format_nll(4.12345, Some(0.0123)), "4.123 ± 0.012");
/// assert_eq!(format_nll(4.12345, Some(0.00004)), "4.123450 ± 0.000040");
/// assert_eq!(format_nll(4.12345, None), "4.1235");
/// ```
pub fn format_nll(nll: f64, se: Option<f64>) -> String {
    match se.filter(|s| s.is_finite() && *s >= 0.0) {
        Some(se) if nll.is_finite() => {
            let mut decimals = 3usize;
            while decimals < 6 && se > 0.0 && se < 0.5 * 10f64.powi(-(decimals as i32) + 1) {
                decimals += 1;
            }
            format!(
                "{} ± {}",
                format_fixed(nll, decimals),
                format_fixed(se, decimals)
            )
        }
        _ => format_fixed(nll, 4),
    }
}

fn text_or_missing(s: &str) -> String {
    if s.trim().is_empty() {
        MISSING.to_string()
    } else {
        s.to_string()
    }
}

fn opt_exact(x: Option<f64>) -> String {
    x.map(format_exact).unwrap_or_default()
}

/// Throughput and wall time: whole numbers from 100 up, one decimal below.
fn format_magnitude(x: f64) -> String {
    if x.abs() >= 100.0 {
        format_fixed(x, 0)
    } else {
        format_fixed(x, 1)
    }
}

const COLUMNS: [Column; 20] = [
    Column {
        header: "run",
        csv: "run",
        numeric: false,
        human: |r| text_or_missing(&r.name),
        exact: |r| r.name.clone(),
        se: None,
    },
    Column {
        header: "model",
        csv: "model",
        numeric: false,
        human: |r| text_or_missing(&r.model),
        exact: |r| r.model.clone(),
        se: None,
    },
    Column {
        header: "router",
        csv: "router",
        numeric: false,
        human: |r| text_or_missing(&r.router),
        exact: |r| r.router.clone(),
        se: None,
    },
    Column {
        header: "KV policy",
        csv: "kv_policy",
        numeric: false,
        human: |r| text_or_missing(&r.kv_policy),
        exact: |r| r.kv_policy.clone(),
        se: None,
    },
    Column {
        header: "sharing",
        csv: "sharing",
        numeric: false,
        human: |r| text_or_missing(&r.sharing),
        exact: |r| r.sharing.clone(),
        se: None,
    },
    Column {
        header: "N_r",
        csv: "num_recursions",
        numeric: true,
        human: |r| r.num_recursions.to_string(),
        exact: |r| r.num_recursions.to_string(),
        se: None,
    },
    Column {
        header: "params",
        csv: "params_non_embedding",
        numeric: true,
        human: |r| humanize_count(r.params_non_embedding),
        exact: |r| r.params_non_embedding.to_string(),
        se: None,
    },
    Column {
        header: "FLOPs",
        csv: "train_flops",
        numeric: true,
        human: |r| format_sci(r.train_flops),
        exact: |r| format_exact(r.train_flops),
        se: None,
    },
    Column {
        header: "tokens",
        csv: "train_tokens",
        numeric: true,
        human: |r| humanize_count(r.train_tokens),
        exact: |r| r.train_tokens.to_string(),
        se: None,
    },
    Column {
        header: "NLL",
        csv: "val_nll",
        numeric: true,
        human: |r| format_nll(r.val_nll, r.val_nll_stderr()),
        exact: |r| format_exact(r.val_nll),
        se: Some(("val_nll_stderr", RunSummary::val_nll_stderr)),
    },
    Column {
        header: "NLL (causal)",
        csv: "val_nll_causal",
        numeric: true,
        human: |r| {
            or_missing(r.val_nll_causal, |x| {
                format_nll(x, r.val_nll_causal_stderr())
            })
        },
        exact: |r| opt_exact(r.val_nll_causal),
        se: Some(("val_nll_causal_stderr", RunSummary::val_nll_causal_stderr)),
    },
    Column {
        header: "bits/byte",
        csv: "bits_per_byte",
        numeric: true,
        human: |r| format_fixed(r.bits_per_byte, 4),
        exact: |r| format_exact(r.bits_per_byte),
        se: None,
    },
    Column {
        header: "acc",
        csv: "accuracy",
        numeric: true,
        human: |r| or_missing(r.accuracy, format_percent),
        exact: |r| opt_exact(r.accuracy),
        se: None,
    },
    Column {
        header: "acc_norm",
        csv: "acc_norm",
        numeric: true,
        human: |r| or_missing(r.acc_norm, format_percent),
        exact: |r| opt_exact(r.acc_norm),
        se: None,
    },
    Column {
        header: "dead%",
        csv: "dead_token_ratio",
        numeric: true,
        human: |r| or_missing(r.dead_token_ratio, format_percent),
        exact: |r| opt_exact(r.dead_token_ratio),
        se: None,
    },
    Column {
        header: "samp.acc",
        csv: "sampling_acc",
        numeric: true,
        human: |r| or_missing(r.sampling_acc, format_percent),
        exact: |r| opt_exact(r.sampling_acc),
        se: None,
    },
    Column {
        header: "MaxVio",
        csv: "maxvio",
        numeric: true,
        human: |r| or_missing(r.maxvio, |x| format_fixed(x, 3)),
        exact: |r| opt_exact(r.maxvio),
        se: None,
    },
    Column {
        header: "entropy",
        csv: "entropy",
        numeric: true,
        human: |r| or_missing(r.entropy, |x| format_fixed(x, 3)),
        exact: |r| opt_exact(r.entropy),
        se: None,
    },
    Column {
        header: "tokens/s",
        csv: "train_tokens_per_sec",
        numeric: true,
        human: |r| format_magnitude(r.train_tokens_per_sec),
        exact: |r| format_exact(r.train_tokens_per_sec),
        se: None,
    },
    Column {
        header: "wall (s)",
        csv: "wall_secs",
        numeric: true,
        human: |r| format_magnitude(r.wall_secs),
        exact: |r| format_exact(r.wall_secs),
        se: None,
    },
];

/// Index of the NLL column, whose best value is set in bold.
const NLL_COLUMN: usize = 9;

/// Headers of the Markdown table, in column order.
pub const TABLE_HEADERS: [&str; 20] = {
    let mut out = [""; 20];
    let mut i = 0;
    while i < COLUMNS.len() {
        out[i] = COLUMNS[i].header;
        i += 1;
    }
    out
};

/// Headers of `results.csv`: the table's columns under machine-readable names (each
/// standard error in a column of its own right after its value, `val_nll_stderr` and
/// `val_nll_causal_stderr`), then `status`.
pub const CSV_HEADERS: [&str; 23] = {
    let mut out = [""; 23];
    let (mut i, mut k) = (0, 0);
    while i < COLUMNS.len() {
        out[k] = COLUMNS[i].csv;
        k += 1;
        if let Some((h, _)) = COLUMNS[i].se {
            out[k] = h;
            k += 1;
        }
        i += 1;
    }
    out[k] = "status";
    out
};

/// The lowest finite NLL among finished runs, if any.
pub(crate) fn best_nll(runs: &[RunSummary]) -> Option<f64> {
    runs.iter()
        .filter(|r| r.is_done() && r.val_nll.is_finite())
        .map(|r| r.val_nll)
        .min_by(f64::total_cmp)
}

/// Renders the results table as GitHub-flavoured Markdown: one header row, one alignment row
/// and one row per run, with missing values as `–` and the best NLL of the finished runs in
/// bold.
pub fn markdown_table(runs: &[RunSummary]) -> String {
    let best = best_nll(runs);
    let mut out = String::new();
    push_row(&mut out, COLUMNS.iter().map(|c| c.header.to_string()));
    push_row(
        &mut out,
        COLUMNS
            .iter()
            .map(|c| if c.numeric { "---:" } else { "---" }.to_string()),
    );
    for run in runs {
        let cells = COLUMNS.iter().enumerate().map(|(i, c)| {
            let cell = markdown_cell(&(c.human)(run));
            let is_best = i == NLL_COLUMN && run.is_done() && Some(run.val_nll) == best;
            if is_best {
                format!("**{cell}**")
            } else {
                cell
            }
        });
        push_row(&mut out, cells);
    }
    out
}

fn push_row(out: &mut String, cells: impl Iterator<Item = String>) {
    out.push('|');
    for cell in cells {
        out.push(' ');
        out.push_str(&cell);
        out.push_str(" |");
    }
    out.push('\n');
}

/// Renders `results.csv` (RFC 4180: CRLF line ends, quoting where needed): the header row
/// [`CSV_HEADERS`], then one row per run with exact numbers; ratios stay fractions and a
/// missing value is an empty field.
pub fn csv_table(runs: &[RunSummary]) -> String {
    let mut out = String::new();
    let header: Vec<String> = CSV_HEADERS.iter().map(|h| csv_field(h)).collect();
    out.push_str(&header.join(","));
    out.push_str("\r\n");
    for run in runs {
        let mut cells: Vec<String> = Vec::with_capacity(CSV_HEADERS.len());
        for c in &COLUMNS {
            cells.push(csv_field(&(c.exact)(run)));
            if let Some((_, se)) = c.se {
                cells.push(se(run).map(format_exact).unwrap_or_default());
            }
        }
        cells.push(csv_field(&run.status));
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}
