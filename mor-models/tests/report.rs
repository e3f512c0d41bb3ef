//! Tests of the ablation report writer (`mor_models::report`) and the progress display
//! (`mor_models::progress`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use mor_models::progress::{format_duration, format_rate, AblationProgress, RunProgress};
use mor_models::report::{
    csv_field, depth_by_difficulty, escape_xml, format_exact, format_sci, humanize_count,
    log_ticks, markdown_table, nice_step, nice_ticks, tick_label, write_report, write_report_data,
    Curve, CurvePoint, DepthByDifficulty, DepthCorrelation, DepthTrace, DifficultyMeasure,
    DifficultyStat, ReportData, RunSummary, TraceRule, TraceToken, CSV_HEADERS, TABLE_HEADERS,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn run(name: &str, model: &str, nll: f64) -> RunSummary {
    RunSummary {
        name: name.to_string(),
        model: model.to_string(),
        router: "-".to_string(),
        kv_policy: "-".to_string(),
        sharing: "-".to_string(),
        num_recursions: 1,
        params_non_embedding: 315_000_000,
        params_embedding: 28_311_552,
        flops_per_token: 2.05e9,
        train_flops: 1.65e19,
        train_tokens: 20_000_000_000,
        steps: 9_537,
        val_nll: nll,
        val_nll_causal: None,
        bits_per_byte: nll / std::f64::consts::LN_2 / 4.2,
        bits_per_byte_causal: None,
        accuracy: None,
        acc_norm: None,
        dead_token_ratio: None,
        sampling_acc: None,
        maxvio: None,
        entropy: None,
        tokens_per_depth: Vec::new(),
        train_tokens_per_sec: 2150.5,
        wall_secs: 3725.25,
        status: "done".to_string(),
        extra: BTreeMap::new(),
    }
}

fn runs() -> Vec<RunSummary> {
    let vanilla = RunSummary {
        accuracy: Some(0.4231),
        acc_norm: Some(0.3781),
        ..run("vanilla", "vanilla", 2.7824)
    };
    let recursive = RunSummary {
        sharing: "middle_cycle".into(),
        num_recursions: 3,
        params_non_embedding: 1_234_567,
        train_flops: 3.12e13,
        train_tokens: 1_600_000,
        ..run("recursive_nr3", "recursive", 2.8466)
    };
    let mut extra = BTreeMap::new();
    extra.insert("seed".to_string(), serde_json::json!(42));
    let mut expert = RunSummary {
        router: "expert_choice".into(),
        kv_policy: "recursion_wise".into(),
        sharing: "middle_cycle".into(),
        num_recursions: 3,
        params_non_embedding: 118_000_000,
        train_tokens: 30_000_000_000,
        val_nll_causal: Some(2.81234),
        bits_per_byte_causal: Some(0.9712),
        accuracy: Some(0.426),
        dead_token_ratio: Some(0.001),
        sampling_acc: Some(0.992),
        tokens_per_depth: vec![600, 300, 100],
        extra,
        ..run("mor_expert_nr3", "mor", 2.7511)
    };
    expert.set_nll_stderrs(Some(0.0123), Some(0.00004));
    // A name with a comma and quotes exercises CSV quoting.
    let token = RunSummary {
        router: "token_choice".into(),
        kv_policy: "recursive_sharing".into(),
        num_recursions: 4,
        maxvio: Some(0.266),
        entropy: Some(1.056),
        tokens_per_depth: vec![10, 20, 30, 40],
        ..run("mor \"token\", nr4", "mor", 2.9163)
    };
    let failed = RunSummary {
        status: "failed: loss diverged, NaN at step 120".into(),
        tokens_per_depth: vec![0, 0],
        ..run("mor_none_alpha1", "mor", f64::NAN)
    };
    vec![vanilla, recursive, expert, token, failed]
}

fn curves() -> Vec<Curve> {
    let curve = |name: &str, n: u64, scale: f64| Curve {
        run: name.to_string(),
        points: (1..=n)
            .map(|s| CurvePoint {
                step: s * 10,
                tokens: s * 10 * 2048,
                flops: s as f64 * 1e12,
                loss: 3.0 + scale * 8.0 / (s as f64),
                val_nll: (s % 5 == 0).then_some(3.05 + scale / (s as f64)),
            })
            .collect(),
    };
    let mut diverged = curve("mor_none_alpha1", 6, 1.0);
    diverged.points[5].loss = f64::NAN;
    vec![
        curve("vanilla", 40, 1.0),
        curve("mor_expert_nr3", 25, 0.8),
        diverged,
        Curve {
            run: "empty".into(),
            points: vec![],
        },
    ]
}

fn traces() -> Vec<DepthTrace> {
    let t = |text: &str, depth: u8, difficulty: Option<u8>| TraceToken {
        text: text.to_string(),
        depth,
        difficulty,
    };
    vec![
        DepthTrace {
            run: "mor_expert_nr3".into(),
            tokens: vec![
                t("The", 1, Some(0)),
                t(" <b>", 3, Some(2)),
                t(" def", 1, Some(0)),
                t("ensively", 2, Some(1)),
                t(" & \"quoted\" 'x'", 3, Some(2)),
                t("\n", 2, None),
            ],
            ..Default::default()
        },
        DepthTrace {
            run: "mor \"token\", nr4".into(),
            tokens: vec![t("a", 4, Some(1)), t("b", 1, Some(0)), t("c", 2, Some(1))],
            ..Default::default()
        },
        DepthTrace {
            run: "unlabelled".into(),
            tokens: vec![t("x", 1, None)],
            ..Default::default()
        },
    ]
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mor-report-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

// ---------------------------------------------------------------------------------------------
// Small parsers written for these tests.

/// Splits a Markdown table row into trimmed cells (no escaped pipes in the fixtures).
fn md_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

/// The first Markdown table in `doc` whose header starts with `| run | model`.
fn main_table(doc: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("| run | model"))
        .expect("main table header");
    let header = md_cells(lines[start]);
    let rows = lines[start + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .map(|l| md_cells(l))
        .collect();
    (header, rows)
}

/// A minimal RFC 4180 parser: quoted fields with doubled quotes, CRLF or LF record ends.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
        } else {
            match c {
                '"' => quoted = true,
                ',' => row.push(std::mem::take(&mut field)),
                '\r' => {}
                '\n' => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                c => field.push(c),
            }
        }
    }
    assert!(!quoted, "unterminated quoted field");
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// One element start tag found by [`check_xml`].
#[derive(Debug)]
struct Element {
    name: String,
    attrs: BTreeMap<String, String>,
}

fn check_entities(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        let tail = &rest[i..];
        let end = tail.find(';').ok_or_else(|| format!("bare '&' in {s:?}"))?;
        let ent = &tail[1..end];
        let ok = matches!(ent, "amp" | "lt" | "gt" | "quot" | "apos")
            || ent
                .strip_prefix('#')
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !ok {
            return Err(format!("unknown entity &{ent}; in {s:?}"));
        }
        rest = &tail[end + 1..];
    }
    Ok(())
}

/// A small XML well-formedness checker: balanced tags with one root, quoted attributes
/// without duplicates or raw `<`, and only known entities in text and attribute values.
/// Returns every element in document order.
fn check_xml(doc: &str) -> Result<Vec<Element>, String> {
    let mut stack: Vec<String> = Vec::new();
    let mut elements = Vec::new();
    let mut roots = 0;
    let mut i = 0;
    while i < doc.len() {
        let rest = &doc[i..];
        if !rest.starts_with('<') {
            let end = rest.find('<').unwrap_or(rest.len());
            let text = &rest[..end];
            if stack.is_empty() && !text.trim().is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            check_entities(text)?;
            i += end;
            continue;
        }
        let end = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[1..end];
        i += end + 1;
        if tag.starts_with('!') || tag.starts_with('?') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack
                .pop()
                .ok_or_else(|| format!("</{name}> without an open tag"))?;
            if open != name.trim() {
                return Err(format!("</{name}> closes <{open}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = &body[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
        {
            return Err(format!("bad element name {name:?}"));
        }
        let mut attrs = BTreeMap::new();
        let mut a = body[name_end..].trim_start();
        while !a.is_empty() {
            let eq = a
                .find('=')
                .ok_or_else(|| format!("attribute without value in <{name}>"))?;
            let key = a[..eq].trim();
            let after = &a[eq + 1..];
            let value_body = after
                .strip_prefix('"')
                .ok_or_else(|| format!("unquoted attribute {key} in <{name}>"))?;
            let close = value_body.find('"').ok_or("unterminated attribute value")?;
            let value = &value_body[..close];
            if value.contains('<') {
                return Err(format!("raw '<' in attribute {key}"));
            }
            check_entities(value)?;
            if attrs.insert(key.to_string(), value.to_string()).is_some() {
                return Err(format!("duplicate attribute {key} in <{name}>"));
            }
            a = value_body[close + 1..].trim_start();
        }
        if stack.is_empty() {
            roots += 1;
        }
        elements.push(Element {
            name: name.to_string(),
            attrs,
        });
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed elements {stack:?}"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(elements)
}

fn with_class<'a>(els: &'a [Element], class: &str) -> Vec<&'a Element> {
    els.iter()
        .filter(|e| {
            e.attrs
                .get("class")
                .is_some_and(|c| c.split(' ').any(|w| w == class))
        })
        .collect()
}

fn attr_f64(e: &Element, key: &str) -> f64 {
    e.attrs[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key} of {e:?}"))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

// ---------------------------------------------------------------------------------------------
// The checker itself must reject bad documents, or the SVG tests could not fail.

#[test]
fn xml_checker_rejects_malformed_documents() {
    assert!(check_xml("<svg><g></g></svg>").is_ok());
    for bad in [
        "<svg><g></svg>",
        "<svg></svg><svg></svg>",
        "<svg a=\"1\" a=\"2\"/>",
        "<svg a=1/>",
        "<svg>a & b</svg>",
        "<svg><text>x</tex></svg>",
        "<svg>",
    ] {
        assert!(check_xml(bad).is_err(), "accepted {bad}");
    }
}

#[test]
fn csv_parser_reads_quoted_fields() {
    let rows = parse_csv("a,\"b,\"\"c\"\"\",\r\n1,,\"x\ny\"\r\n");
    assert_eq!(rows, vec![vec!["a", "b,\"c\"", ""], vec!["1", "", "x\ny"]]);
}

// ---------------------------------------------------------------------------------------------
// The full report.

#[test]
fn write_report_writes_every_file() {
    let dir = out_dir("all-files");
    let files = write_report(&dir, &runs(), &curves(), &traces()).unwrap();
    for path in files.all() {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(meta.len() > 100, "{} is nearly empty", path.display());
        assert_eq!(path.parent().unwrap(), dir);
    }
    let md = std::fs::read_to_string(&files.results_md).unwrap();
    for link in [
        "loss_curves.svg",
        "nll_vs_flops.svg",
        "depth_histogram.svg",
        "depth_vs_difficulty.svg",
        "depth_tokens.html",
    ] {
        assert!(
            md.contains(&format!("]({link})")),
            "results.md does not link {link}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn markdown_table_has_the_right_values_in_the_right_columns() {
    let runs = runs();
    let (header, rows) = main_table(&markdown_table(&runs));
    assert_eq!(header, TABLE_HEADERS);
    assert_eq!(rows.len(), runs.len());
    assert!(rows.iter().all(|r| r.len() == TABLE_HEADERS.len()));
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let cell = |row: usize, name: &str| rows[row][col(name)].as_str();

    // Vanilla.
    assert_eq!(cell(0, "run"), "vanilla");
    assert_eq!(cell(0, "router"), "-");
    assert_eq!(cell(0, "params"), "315M");
    assert_eq!(cell(0, "FLOPs"), "1.65e19");
    assert_eq!(cell(0, "tokens"), "20B");
    assert_eq!(cell(0, "NLL"), "2.7824");
    assert_eq!(cell(0, "NLL (causal)"), "–");
    assert_eq!(cell(0, "acc"), "42.3");
    assert_eq!(cell(0, "acc_norm"), "37.8");
    assert_eq!(cell(0, "tokens/s"), "2150");
    assert_eq!(cell(0, "wall (s)"), "3725");
    // Recursive.
    assert_eq!(cell(1, "sharing"), "middle_cycle");
    assert_eq!(cell(1, "N_r"), "3");
    assert_eq!(cell(1, "params"), "1.23M");
    assert_eq!(cell(1, "FLOPs"), "3.12e13");
    assert_eq!(cell(1, "tokens"), "1.6M");
    // Expert-choice MoR has the best NLL among finished runs: bold.
    // With its standard error beside it (more decimals for a tiny one).
    assert_eq!(cell(2, "NLL"), "**2.751 ± 0.012**");
    assert_eq!(cell(2, "NLL (causal)"), "2.812340 ± 0.000040");
    assert_eq!(
        cell(2, "bits/byte"),
        format!("{:.4}", runs[2].bits_per_byte)
    );
    assert_eq!(cell(2, "KV policy"), "recursion_wise");
    assert_eq!(cell(2, "dead%"), "0.1");
    assert_eq!(cell(2, "samp.acc"), "99.2");
    assert_eq!(cell(2, "MaxVio"), "–");
    assert_eq!(cell(2, "acc_norm"), "–");
    // Token-choice MoR.
    assert_eq!(cell(3, "run"), "mor \"token\", nr4");
    assert_eq!(cell(3, "MaxVio"), "0.266");
    assert_eq!(cell(3, "entropy"), "1.056");
    assert_eq!(cell(3, "dead%"), "–");
    // The failed run shows its NaN and is never bold.
    assert_eq!(cell(4, "NLL"), "NaN");
    let bold = rows
        .iter()
        .flatten()
        .filter(|c| c.starts_with("**"))
        .count();
    assert_eq!(bold, 1);
}

#[test]
fn markdown_report_tabulates_the_test_time_depth_sweep() {
    let dir = out_dir("md-sweep");
    let mut rs = runs();
    rs[1].extra.insert(
        mor_models::report::NLL_BY_MAX_DEPTH_KEY.into(),
        serde_json::json!([
            {"max_depth": 1, "nll": 3.25, "tokens": 64},
            {"max_depth": 2, "nll": 3.125, "tokens": 64},
            {"max_depth": 3, "nll": 3.0625, "tokens": 64}
        ]),
    );
    assert_eq!(
        rs[1].nll_by_max_depth(),
        vec![(1, 3.25), (2, 3.125), (3, 3.0625)]
    );
    let files = write_report(&dir, &rs, &curves(), &traces()).unwrap();
    let md = std::fs::read_to_string(&files.results_md).unwrap();
    assert!(md.contains("## NLL by test-time depth"), "{md}");
    let header = md
        .lines()
        .find(|l| l.starts_with("| run | d <= 1"))
        .expect("sweep table");
    assert_eq!(md_cells(header), ["run", "d <= 1", "d <= 2", "d <= 3"]);
    let name = rs[1].name.clone();
    let row = md
        .lines()
        .find(|l| l.starts_with(&format!("| {name} | 3.2500")))
        .expect("sweep row");
    assert_eq!(md_cells(row), [name.as_str(), "3.2500", "3.1250", "3.0625"]);
    // Runs without a sweep: no section.
    let dir2 = out_dir("md-nosweep");
    let files = write_report(&dir2, &runs(), &curves(), &traces()).unwrap();
    let md = std::fs::read_to_string(&files.results_md).unwrap();
    assert!(!md.contains("test-time depth"));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

#[test]
fn markdown_report_lists_failures_and_depth_sections() {
    let dir = out_dir("md-sections");
    let files = write_report(&dir, &runs(), &curves(), &traces()).unwrap();
    let md = std::fs::read_to_string(&files.results_md).unwrap();
    assert!(md.contains("- mor_none_alpha1: failed: loss diverged, NaN at step 120"));
    // Tokens per depth: 600/300/100 of 1000.
    let line = md
        .lines()
        .find(|l| l.starts_with("| mor_expert_nr3 | 60.0 |"))
        .expect("depth row");
    assert_eq!(
        md_cells(line),
        ["mor_expert_nr3", "60.0", "30.0", "10.0", "–"]
    );
    // Depth vs difficulty: labels 0 (depths 1, 1), 1 (depth 2), 2 (depths 3, 3).
    let header = md
        .lines()
        .find(|l| l.starts_with("| run | difficulty 0"))
        .expect("difficulty table");
    assert_eq!(
        md_cells(header),
        ["run", "difficulty 0", "difficulty 1", "difficulty 2"]
    );
    let row = md
        .lines()
        .find(|l| l.starts_with("| mor_expert_nr3 | 1.00"))
        .expect("difficulty row");
    assert_eq!(
        md_cells(row),
        ["mor_expert_nr3", "1.00 (n=2)", "2.00 (n=1)", "3.00 (n=2)"]
    );
    let row = md
        .lines()
        .find(|l| l.starts_with("| mor \"token\", nr4 | 1.00"))
        .expect("token row");
    assert_eq!(
        md_cells(row),
        ["mor \"token\", nr4", "1.00 (n=1)", "3.00 (n=2)", "–"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn csv_parses_back_to_the_same_numbers() {
    let runs = runs();
    let dir = out_dir("csv");
    let files = write_report(&dir, &runs, &[], &[]).unwrap();
    let text = std::fs::read_to_string(&files.results_csv).unwrap();
    assert!(text.contains("\r\n"), "RFC 4180 records end with CRLF");
    let rows = parse_csv(&text);
    assert_eq!(rows[0], CSV_HEADERS);
    assert_eq!(rows.len(), runs.len() + 1);
    let col = |name: &str| CSV_HEADERS.iter().position(|h| *h == name).unwrap();
    let num = |row: &[String], name: &str| -> Option<f64> {
        let s = &row[col(name)];
        (!s.is_empty()).then(|| s.parse::<f64>().unwrap_or_else(|_| panic!("{name}: {s:?}")))
    };
    let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
    for (r, row) in runs.iter().zip(&rows[1..]) {
        assert_eq!(row.len(), CSV_HEADERS.len());
        assert_eq!(row[col("run")], r.name);
        assert_eq!(row[col("kv_policy")], r.kv_policy);
        assert_eq!(row[col("status")], r.status);
        assert_eq!(
            row[col("num_recursions")].parse::<usize>().unwrap(),
            r.num_recursions
        );
        assert_eq!(
            row[col("params_non_embedding")].parse::<u64>().unwrap(),
            r.params_non_embedding
        );
        assert_eq!(
            row[col("train_tokens")].parse::<u64>().unwrap(),
            r.train_tokens
        );
        assert_eq!(num(row, "train_flops"), Some(r.train_flops));
        assert!(same(num(row, "val_nll").unwrap(), r.val_nll), "{}", r.name);
        assert_eq!(num(row, "val_nll_causal"), r.val_nll_causal);
        assert_eq!(num(row, "val_nll_stderr"), r.val_nll_stderr());
        assert_eq!(num(row, "val_nll_causal_stderr"), r.val_nll_causal_stderr());
        assert!(
            same(num(row, "bits_per_byte").unwrap(), r.bits_per_byte),
            "{}",
            r.name
        );
        assert_eq!(num(row, "accuracy"), r.accuracy);
        assert_eq!(num(row, "acc_norm"), r.acc_norm);
        assert_eq!(num(row, "dead_token_ratio"), r.dead_token_ratio);
        assert_eq!(num(row, "sampling_acc"), r.sampling_acc);
        assert_eq!(num(row, "maxvio"), r.maxvio);
        assert_eq!(num(row, "entropy"), r.entropy);
        assert_eq!(
            num(row, "train_tokens_per_sec"),
            Some(r.train_tokens_per_sec)
        );
        assert_eq!(num(row, "wall_secs"), Some(r.wall_secs));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_round_trips_including_nan() {
    let (runs, curves, traces) = (runs(), curves(), traces());
    let dir = out_dir("json");
    let files = write_report(&dir, &runs, &curves, &traces).unwrap();
    let back: ReportData =
        serde_json::from_str(&std::fs::read_to_string(&files.results_json).unwrap()).unwrap();
    assert_eq!(back.runs[..4], runs[..4]);
    assert!(back.runs[4].val_nll.is_nan());
    let mut a = back.runs[4].clone();
    let mut b = runs[4].clone();
    (a.val_nll, a.bits_per_byte, b.val_nll, b.bits_per_byte) = (0.0, 0.0, 0.0, 0.0);
    assert_eq!(a, b);
    assert_eq!(back.runs[2].extra["seed"], serde_json::json!(42));
    assert_eq!(back.curves[..2], curves[..2]);
    assert!(back.curves[2].points[5].loss.is_nan());
    assert_eq!(back.traces, traces);
    assert_eq!(back.depth_by_difficulty, depth_by_difficulty(&traces));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_reads_non_finite_spellings_and_rejects_garbage() {
    let mut v = serde_json::to_value(&runs()[0]).unwrap();
    v["val_nll"] = serde_json::json!("inf");
    v["wall_secs"] = serde_json::Value::Null;
    v["entropy"] = serde_json::json!("-inf");
    let r: RunSummary = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(r.val_nll, f64::INFINITY);
    assert!(r.wall_secs.is_nan());
    assert_eq!(r.entropy, Some(f64::NEG_INFINITY));
    v["val_nll"] = serde_json::json!("lots");
    let err = serde_json::from_value::<RunSummary>(v)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lots"), "{err}");
}

#[test]
fn svgs_are_well_formed_with_one_mark_per_series() {
    let (runs, curves, traces) = (runs(), curves(), traces());
    let dir = out_dir("svg");
    let files = write_report(&dir, &runs, &curves, &traces).unwrap();
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap();

    // Loss curves: one polyline per curve with a finite point, one marker per val NLL.
    let loss = check_xml(&read(&files.loss_curves_svg)).unwrap();
    assert_eq!(loss[0].name, "svg");
    let lines = with_class(&loss, "curve");
    let drawn: Vec<&Curve> = curves.iter().filter(|c| !c.points.is_empty()).collect();
    assert_eq!(lines.len(), drawn.len());
    for (line, c) in lines.iter().zip(&drawn) {
        assert_eq!(unescape(&line.attrs["data-run"]), c.run);
        let xs: Vec<f64> = line.attrs["points"]
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            xs.len(),
            c.points.iter().filter(|p| p.loss.is_finite()).count()
        );
        assert!(
            xs.windows(2).all(|w| w[0] < w[1]),
            "x must grow with the step"
        );
    }
    let vals: usize = curves
        .iter()
        .map(|c| c.points.iter().filter(|p| p.val_nll.is_some()).count())
        .sum();
    assert_eq!(with_class(&loss, "val-marker").len(), vals);

    // NLL against FLOPs: one marker per run with a finite NLL.
    let nll = check_xml(&read(&files.nll_vs_flops_svg)).unwrap();
    let markers = with_class(&nll, "run-marker");
    assert_eq!(
        markers.len(),
        runs.iter().filter(|r| r.val_nll.is_finite()).count()
    );
    // Lower NLL is drawn higher up.
    let cy = |name: &str| {
        attr_f64(
            markers
                .iter()
                .find(|m| m.attrs["data-run"] == name)
                .unwrap(),
            "cy",
        )
    };
    assert!(cy("mor_expert_nr3") > cy("vanilla") && cy("vanilla") > cy("recursive_nr3"));
    assert_eq!(with_class(&nll, "marker-label").len(), markers.len());

    // Depth histogram: one bar per (run, depth) of the runs with counts, heights in proportion.
    let hist = check_xml(&read(&files.depth_histogram_svg)).unwrap();
    let bars = with_class(&hist, "bar");
    let expected: usize = runs
        .iter()
        .filter(|r| r.tokens_per_depth.iter().sum::<u64>() > 0)
        .map(|r| r.tokens_per_depth.len())
        .sum();
    assert_eq!(bars.len(), expected);
    for r in runs
        .iter()
        .filter(|r| r.tokens_per_depth.iter().sum::<u64>() > 0)
    {
        let mine: Vec<&&Element> = bars
            .iter()
            .filter(|b| unescape(&b.attrs["data-run"]) == r.name)
            .collect();
        assert_eq!(mine.len(), r.tokens_per_depth.len());
        let total = r.tokens_per_depth.iter().sum::<u64>() as f64;
        let first = attr_f64(mine[0], "height") / (r.tokens_per_depth[0] as f64 / total);
        for (d, b) in mine.iter().enumerate() {
            assert_eq!(b.attrs["data-depth"], (d + 1).to_string());
            let want = first * r.tokens_per_depth[d] as f64 / total;
            assert!(
                (attr_f64(b, "height") - want).abs() < 0.2,
                "{} depth {}",
                r.name,
                d + 1
            );
        }
    }
    assert_eq!(with_class(&hist, "swatch").len(), 2);

    // Depth against difficulty: one polyline per run with labelled tokens.
    let diff = check_xml(&read(&files.depth_vs_difficulty_svg)).unwrap();
    assert_eq!(with_class(&diff, "curve").len(), 2);
    assert_eq!(with_class(&diff, "point").len(), 3 + 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn long_curves_are_thinned_keeping_both_ends() {
    let n = 4001u64;
    let curve = Curve {
        run: "long".into(),
        points: (0..n)
            .map(|s| CurvePoint {
                step: s,
                tokens: s,
                flops: s as f64,
                loss: 3.0 + 1.0 / (1.0 + s as f64),
                val_nll: None,
            })
            .collect(),
    };
    let dir = out_dir("thin");
    let files = write_report(&dir, &[], &[curve], &[]).unwrap();
    let els = check_xml(&std::fs::read_to_string(&files.loss_curves_svg).unwrap()).unwrap();
    let lines = with_class(&els, "curve");
    assert_eq!(lines.len(), 1);
    let xs: Vec<f64> = lines[0].attrs["points"]
        .split(' ')
        .map(|p| p.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert!((1000..=1500).contains(&xs.len()), "{} points", xs.len());
    // The axis spans steps 0..4000 exactly (nice ticks), so the ends sit on the frame's edges.
    let axes = els
        .iter()
        .find(|e| e.attrs.get("class").is_some_and(|c| c == "axes"))
        .unwrap();
    let d = &axes.attrs["d"];
    let x0: f64 = d[1..d.find(',').unwrap()].parse().unwrap();
    let x1: f64 = d[d.find('H').unwrap() + 1..].parse().unwrap();
    assert!(
        (xs[0] - x0).abs() < 0.05 && (xs[xs.len() - 1] - x1).abs() < 0.05,
        "{} {} vs {x0} {x1}",
        xs[0],
        xs[xs.len() - 1]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn html_escapes_text_and_has_one_span_per_token() {
    let traces = traces();
    let dir = out_dir("html");
    let files = write_report(&dir, &[], &[], &traces).unwrap();
    let html = std::fs::read_to_string(&files.depth_tokens_html).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    let els = check_xml(&html).unwrap();
    let spans: Vec<&Element> = with_class(&els, "tok");
    let tokens: Vec<&TraceToken> = traces.iter().flat_map(|t| &t.tokens).collect();
    assert_eq!(spans.len(), tokens.len());
    for (s, t) in spans.iter().zip(&tokens) {
        assert_eq!(s.name, "span");
        assert_eq!(s.attrs["class"], format!("tok d{}", t.depth));
        let title = match t.difficulty {
            Some(d) => format!("depth {}, difficulty {d}", t.depth),
            None => format!("depth {}", t.depth),
        };
        assert_eq!(s.attrs["title"], title);
    }
    assert!(html.contains(">&lt;b&gt;<") || html.contains("> &lt;b&gt;</span>"));
    assert!(html.contains(" &amp; &quot;quoted&quot; &#39;x&#39;</span>"));
    assert!(!html.contains("<b>"));
    // Every depth class used has a style, lighter for lower depths.
    for d in 1..=4 {
        assert!(
            html.contains(&format!(".d{d} {{ background: #")),
            "no style for depth {d}"
        );
    }
    let bg = |d: u8| {
        let i = html.find(&format!(".d{d} {{ background: #")).unwrap()
            + format!(".d{d} {{ background: #").len();
        let hex = &html[i..i + 6];
        (0..3)
            .map(|k| u32::from_str_radix(&hex[2 * k..2 * k + 2], 16).unwrap())
            .sum::<u32>()
    };
    assert!(bg(1) > bg(2) && bg(2) > bg(3) && bg(3) > bg(4));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn empty_inputs_still_give_well_formed_files() {
    let dir = out_dir("empty");
    let files = write_report(&dir, &[], &[], &[]).unwrap();
    for p in [
        &files.loss_curves_svg,
        &files.nll_vs_flops_svg,
        &files.depth_histogram_svg,
        &files.depth_vs_difficulty_svg,
    ] {
        let svg = std::fs::read_to_string(p).unwrap();
        check_xml(&svg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(svg.contains("class=\"no-data\""), "{}", p.display());
    }
    check_xml(&std::fs::read_to_string(&files.depth_tokens_html).unwrap()).unwrap();
    let (_, rows) = main_table(&std::fs::read_to_string(&files.results_md).unwrap());
    assert!(rows.is_empty());
    assert_eq!(
        parse_csv(&std::fs::read_to_string(&files.results_csv).unwrap()),
        vec![CSV_HEADERS.to_vec()]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_report_reports_io_errors_with_the_path() {
    let dir = out_dir("blocked");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    std::fs::write(&dir, b"a file where the folder should be").unwrap();
    let err = write_report(&dir, &runs(), &[], &[]).unwrap_err();
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
    std::fs::remove_file(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Formatting and ticks.

#[test]
fn humanised_numbers() {
    for (n, s) in [
        (0, "0"),
        (999, "999"),
        (1_000, "1K"),
        (1_234, "1.23K"),
        (999_999, "1M"),
        (1_200_000, "1.2M"),
        (12_345_678, "12.3M"),
        (167_000_000, "167M"),
        (1_610_000_000, "1.61B"),
        (30_000_000_000, "30B"),
        (2_500_000_000_000, "2.5T"),
    ] {
        assert_eq!(humanize_count(n), s, "{n}");
    }
    assert_eq!(format_sci(3.12e13), "3.12e13");
    assert_eq!(format_sci(3.1e13), "3.1e13");
    assert_eq!(format_sci(1.65e19), "1.65e19");
    assert_eq!(format_sci(2e18), "2e18");
    assert_eq!(format_sci(1.2345e-3), "1.23e-3");
    assert_eq!(format_sci(f64::NAN), "NaN");
    assert_eq!(escape_xml("<&>\"'"), "&lt;&amp;&gt;&quot;&#39;");
    assert_eq!(csv_field("a\nb"), "\"a\nb\"");
    for x in [
        1.65e19,
        3.0e13,
        1e15,
        0.1 + 0.2,
        1e-5,
        2.5e-300,
        -4.2e17,
        0.0,
        123.456,
    ] {
        assert_eq!(format_exact(x).parse::<f64>().unwrap(), x, "{x}");
    }
    assert_eq!(format_exact(1.65e19), "1.65e19");
    assert_eq!(format_exact(0.25), "0.25");
}

#[test]
fn nice_ticks_closed_forms() {
    let check = |min: f64, max: f64, target: usize, step: f64, ticks: &[f64]| {
        let t = nice_ticks(min, max, target);
        assert_eq!(t.step, step, "step for [{min}, {max}]");
        assert_eq!(t.ticks, ticks, "ticks for [{min}, {max}]");
        assert_eq!((t.lo, t.hi), (ticks[0], ticks[ticks.len() - 1]));
    };
    check(0.0, 1.0, 5, 0.2, &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    check(0.0, 100.0, 5, 20.0, &[0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
    check(2.71, 3.49, 5, 0.2, &[2.6, 2.8, 3.0, 3.2, 3.4, 3.6]);
    check(0.0, 7.0, 5, 2.0, &[0.0, 2.0, 4.0, 6.0, 8.0]);
    check(-3.0, 12.0, 5, 5.0, &[-5.0, 0.0, 5.0, 10.0, 15.0]);
    check(
        0.0,
        0.03,
        6,
        0.005,
        &[0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03],
    );
    check(1200.0, 98000.0, 4, 50000.0, &[0.0, 50000.0, 100000.0]);
    // Degenerate and bad input.
    check(3.0, 3.0, 5, 0.2, &[2.6, 2.8, 3.0, 3.2, 3.4]);
    check(0.0, 0.0, 2, 1.0, &[-1.0, 0.0, 1.0]);
    check(f64::NAN, 1.0, 5, 0.2, &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    check(1.0, 0.0, 5, 0.2, &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    assert_eq!(nice_step(0.0), 1.0);
    assert_eq!(nice_step(4.9e-7), 5e-7);

    let t = log_ticks(2.0, 30.0);
    assert_eq!(t.ticks, [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
    let t = log_ticks(3e13, 2e15);
    assert_eq!((t.lo, t.hi, t.ticks.len()), (1e13, 1e16, 4));
    let t = log_ticks(1e3, 1e3);
    assert_eq!(t.ticks, [1e3, 2e3, 5e3, 1e4]);
    let t = log_ticks(1.0, 1e20);
    assert!(t.ticks.len() <= 12 && t.ticks[0] == 1.0 && *t.ticks.last().unwrap() == 1e20);
    assert_eq!(log_ticks(-1.0, 0.0).ticks, [1.0, 2.0, 5.0, 10.0]);

    assert_eq!(tick_label(2.6, 0.2), "2.6");
    assert_eq!(tick_label(3.0, 0.2), "3.0");
    assert_eq!(tick_label(40.0, 20.0), "40");
    assert_eq!(tick_label(250_000.0, 50_000.0), "2.5e5");
    assert_eq!(tick_label(1e13, 0.0), "1e13");
    assert_eq!(tick_label(0.005, 0.005), "0.005");
}

#[test]
fn csv_has_the_standard_errors_next_to_their_nll() {
    let i = CSV_HEADERS.iter().position(|h| *h == "val_nll").unwrap();
    assert_eq!(CSV_HEADERS[i + 1], "val_nll_stderr");
    let j = CSV_HEADERS
        .iter()
        .position(|h| *h == "val_nll_causal")
        .unwrap();
    assert_eq!(CSV_HEADERS[j + 1], "val_nll_causal_stderr");
    let csv = mor_models::report::csv_table(&runs());
    let rows = parse_csv(&csv);
    // The expert run has both; the vanilla run has none (empty fields).
    assert_eq!(rows[3][i + 1], "0.0123");
    assert_eq!(rows[3][j + 1], "4e-5");
    assert_eq!(rows[1][i + 1], "");
}

fn by_nll(run: &str, depths: [f64; 5], pearson: Option<f64>) -> DepthByDifficulty {
    DepthByDifficulty {
        run: run.into(),
        by_label: depths
            .iter()
            .enumerate()
            .map(|(q, &d)| DifficultyStat {
                difficulty: q as u8,
                count: 20,
                mean_depth: d,
            })
            .collect(),
        unlabelled: 0,
        measure: DifficultyMeasure::ReferenceNll {
            reference: "vanilla".into(),
            rule: TraceRule::FullSequence,
            edges: vec![0.01, 1.5, 2.25, 3.0, 4.5, 11.0],
        },
        correlations: vec![
            DepthCorrelation {
                rule: TraceRule::FullSequence,
                tokens: 100,
                pearson,
                spearman: Some(0.25),
            },
            DepthCorrelation {
                rule: TraceRule::Causal,
                tokens: 100,
                pearson: Some(-0.125),
                spearman: None,
            },
        ],
    }
}

#[test]
fn depth_by_reference_nll_is_tabled_and_plotted_without_labels() {
    let dir = out_dir("by-nll");
    let data = ReportData {
        runs: runs(),
        curves: Vec::new(),
        traces: Vec::new(),
        depth_by_difficulty: vec![
            by_nll("mor_expert_nr3", [1.25, 1.5, 2.0, 2.5, 2.75], Some(0.5)),
            by_nll("mor \"token\", nr4", [2.0, 2.0, 2.0, 2.0, 2.0], None),
        ],
    };
    let files = write_report_data(&dir, &data).unwrap();
    let md = std::fs::read_to_string(&files.results_md).unwrap();
    let header = md
        .lines()
        .find(|l| l.starts_with("| run | reference |"))
        .expect("quintile table");
    assert_eq!(
        md_cells(header),
        [
            "run",
            "reference",
            "depths",
            "Q1",
            "Q2",
            "Q3",
            "Q4",
            "Q5",
            "r (full seq.)",
            "ρ (full seq.)",
            "r (causal)",
            "ρ (causal)"
        ]
    );
    let row = md
        .lines()
        .find(|l| l.starts_with("| mor_expert_nr3 | vanilla |"))
        .expect("quintile row");
    assert_eq!(
        md_cells(row),
        [
            "mor_expert_nr3",
            "vanilla",
            "full seq.",
            "1.25 (n=20)",
            "1.50 (n=20)",
            "2.00 (n=20)",
            "2.50 (n=20)",
            "2.75 (n=20)",
            "+0.500",
            "+0.250",
            "-0.125",
            "–"
        ]
    );
    // A constant depth has no Pearson correlation.
    let row = md
        .lines()
        .find(|l| l.starts_with("| mor \"token\", nr4 | vanilla |"))
        .unwrap();
    assert_eq!(md_cells(row)[8], "–");
    assert!(md.contains(
        "NLL bounds of the quintiles under vanilla (nats): Q1 0.01–1.50, Q2 1.50–2.25, \
         Q3 2.25–3.00, Q4 3.00–4.50, Q5 4.50–11.00."
    ));
    assert!(!md.contains("No depth trace carries difficulty labels"));
    // The plot draws the quintiles: one line per run, five points each, ticks Q1..Q5.
    let svg = std::fs::read_to_string(&files.depth_vs_difficulty_svg).unwrap();
    let els = check_xml(&svg).unwrap();
    assert_eq!(with_class(&els, "curve").len(), 2);
    assert_eq!(with_class(&els, "point").len(), 10);
    assert!(!svg.contains("class=\"no-data\""));
    for q in 1..=5 {
        assert!(svg.contains(&format!(">Q{q}<")), "no tick Q{q}");
    }
    assert!(svg.contains("NLL under vanilla"));

    // With labelled entries too, the plot keeps the labels and the report has both tables.
    let mut both = data.clone();
    both.depth_by_difficulty
        .extend(mor_models::report::depth_by_difficulty(&traces()));
    write_report_data(&dir, &both).unwrap();
    let md = std::fs::read_to_string(&files.results_md).unwrap();
    assert!(md.contains("| run | difficulty 0 |") && md.contains("| run | reference |"));
    let svg = std::fs::read_to_string(&files.depth_vs_difficulty_svg).unwrap();
    let els = check_xml(&svg).unwrap();
    assert_eq!(with_class(&els, "point").len(), 3 + 2);
    assert!(!svg.contains(">Q1<"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A trace of `depths` (token text = its position) under `rule` for validation row `seq`.
fn sample(run: &str, seq: usize, rule: TraceRule, depths: &[u8]) -> DepthTrace {
    DepthTrace {
        run: run.into(),
        tokens: depths
            .iter()
            .enumerate()
            .map(|(i, &depth)| TraceToken {
                text: format!("t{i} "),
                depth,
                difficulty: None,
            })
            .collect(),
        rule,
        sequence: Some(seq),
    }
}

#[test]
fn html_shows_every_sample_sequence_and_both_rules_when_they_differ() {
    let traces = vec![
        sample("mor", 0, TraceRule::Both, &[1, 2, 3, 1]),
        sample("mor", 5, TraceRule::FullSequence, &[3, 2, 1, 1]),
        sample("mor", 5, TraceRule::Causal, &[1, 2, 2, 1]),
        sample("mor", 10, TraceRule::Both, &[2, 2, 2, 2]),
        sample("mor", 15, TraceRule::Both, &[1, 1, 1, 3]),
        sample("other", 0, TraceRule::Causal, &[1, 3]),
    ];
    let dir = out_dir("html-samples");
    let files = write_report(&dir, &[], &[], &traces).unwrap();
    let html = std::fs::read_to_string(&files.depth_tokens_html).unwrap();
    let els = check_xml(&html).unwrap();
    // Two runs; four sample sequences of `mor` and one of `other`.
    assert_eq!(with_class(&els, "trace").len(), 2);
    let samples: Vec<String> = with_class(&els, "sample")
        .iter()
        .map(|e| e.attrs["data-sequence"].clone())
        .collect();
    assert_eq!(samples, ["0", "5", "10", "15", "0"]);
    // One text block per trace, each naming its rule.
    let rules: Vec<String> = with_class(&els, "text")
        .iter()
        .map(|e| e.attrs["data-rule"].clone())
        .collect();
    assert_eq!(
        rules,
        ["both", "full_sequence", "causal", "both", "both", "causal"]
    );
    assert_eq!(with_class(&els, "tok").len(), 4 * 5 + 2);
    // Sequence 5 differs at tokens 0 and 2, marked in both renderings with the other depth.
    let differs: Vec<String> = els
        .iter()
        .filter(|e| {
            e.attrs
                .get("class")
                .is_some_and(|c| c.ends_with(" differs"))
        })
        .map(|e| format!("{} | {}", e.attrs["class"], unescape(&e.attrs["title"])))
        .collect();
    assert_eq!(
        differs,
        [
            "tok d3 differs | depth 3 (causal rule: 1)",
            "tok d1 differs | depth 1 (causal rule: 2)",
            "tok d1 differs | depth 1 (full-sequence rule: 3)",
            "tok d2 differs | depth 2 (full-sequence rule: 1)",
        ]
    );
    assert!(html.contains("full-sequence rule: 4 tokens, mean depth 1.75; 2 of 4 tokens get another depth under the causal rule"));
    assert!(html.contains("full-sequence and causal rules (identical depths): 4 tokens"));
    assert!(html.contains("<h3>validation sequence 15</h3>"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn depth_by_difficulty_merges_a_runs_samples_under_one_rule() {
    let lab = |mut t: DepthTrace, labels: &[u8]| {
        for (k, &l) in t.tokens.iter_mut().zip(labels) {
            k.difficulty = Some(l);
        }
        t
    };
    let traces = vec![
        lab(sample("mor", 0, TraceRule::FullSequence, &[3, 1]), &[1, 0]),
        lab(sample("mor", 0, TraceRule::Causal, &[2, 2]), &[1, 0]),
        lab(sample("mor", 4, TraceRule::Both, &[1, 2]), &[1, 0]),
        lab(
            sample("causal_only", 0, TraceRule::Causal, &[2, 3]),
            &[0, 0],
        ),
        lab(sample("causal_only", 1, TraceRule::Causal, &[1]), &[0]),
    ];
    let d = depth_by_difficulty(&traces);
    assert_eq!(d.len(), 2);
    // Full-sequence depths of both samples: label 0 → (1 + 2) / 2, label 1 → (3 + 1) / 2.
    assert_eq!(d[0].run, "mor");
    let got: Vec<(u8, u64, f64)> = d[0]
        .by_label
        .iter()
        .map(|s| (s.difficulty, s.count, s.mean_depth))
        .collect();
    assert_eq!(got, [(0, 2, 1.5), (1, 2, 2.0)]);
    // Only causal traces: all of them, label 0 → (2 + 3 + 1) / 3.
    assert_eq!(d[1].run, "causal_only");
    assert_eq!(d[1].by_label.len(), 1);
    assert_eq!(
        (d[1].by_label[0].count, d[1].by_label[0].mean_depth),
        (3, 2.0)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nice_ticks_cover_the_range_with_even_nice_steps(
        lo in -1e6f64..1e6,
        span in 1e-6f64..1e6,
        target in 2usize..10,
    ) {
        let hi = lo + span;
        let t = nice_ticks(lo, hi, target);
        // Tick values carry the rounding of numbers of size |lo|, far above 1e-9 * span when
        // the span is tiny against the offset.
        let slack = 1e-9 * span + 4.0 * f64::EPSILON * lo.abs().max(hi.abs());
        prop_assert!(t.lo <= lo + slack && t.hi >= hi - slack, "{t:?} misses [{lo}, {hi}]");
        prop_assert!(t.ticks.len() >= 2 && t.ticks.len() <= target + 2, "{} ticks for target {target}", t.ticks.len());
        let m = t.step / 10f64.powi(t.step.log10().floor() as i32);
        prop_assert!([1.0, 2.0, 5.0].iter().any(|n| (m - n).abs() < 1e-6), "step {} is not nice", t.step);
        for w in t.ticks.windows(2) {
            prop_assert!(((w[1] - w[0]) - t.step).abs() <= 1e-6 * t.step.max(w[1].abs()), "uneven {w:?}");
        }
    }

    #[test]
    fn depth_by_difficulty_matches_a_naive_count(
        tokens in prop::collection::vec((0u8..5, prop::option::of(0u8..4)), 0..40),
    ) {
        let trace = DepthTrace {
            run: "r".into(),
            tokens: tokens.iter().map(|&(depth, difficulty)| TraceToken { text: "t".into(), depth, difficulty }).collect(),
            ..Default::default()
        };
        let got = DepthByDifficulty::from_trace(&trace);
        let mut expect = Vec::new();
        for label in 0u8..=255 {
            let depths: Vec<f64> = tokens.iter().filter(|t| t.1 == Some(label)).map(|t| f64::from(t.0)).collect();
            if !depths.is_empty() {
                expect.push((label, depths.len() as u64, depths.iter().sum::<f64>() / depths.len() as f64));
            }
        }
        let got_tuples: Vec<(u8, u64, f64)> = got.by_label.iter().map(|s| (s.difficulty, s.count, s.mean_depth)).collect();
        prop_assert_eq!(got_tuples, expect);
        prop_assert_eq!(got.unlabelled, tokens.iter().filter(|t| t.1.is_none()).count() as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// Progress display.

#[test]
fn run_progress_logs_plain_lines_every_n_steps_when_quiet() {
    let p = RunProgress::new("[3/9] mor_expert_nr3", 10, true).with_log_every(4);
    assert!(p.is_hidden());
    let lines: Vec<(u64, String)> = (1..=10)
        .filter_map(|s| p.update(s, 3.0 + 1.0 / s as f64, 2150.0).map(|l| (s, l)))
        .collect();
    let steps: Vec<u64> = lines.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [4, 8, 10]);
    assert!(
        lines[0]
            .1
            .starts_with("[3/9] mor_expert_nr3 step 4/10 (40.0%) loss 3.2500 2.1k tok/s"),
        "{}",
        lines[0].1
    );
    let end = p.finish("val NLL 3.0100").unwrap();
    assert!(
        end.contains("done at step 10/10") && end.contains("val NLL 3.0100"),
        "{end}"
    );
    assert!(p.finish("again").is_none());

    // Odd input never panics.
    let q = RunProgress::new("odd", 0, true).with_log_every(0);
    assert!(q.update(5, f64::NAN, f64::INFINITY).is_none());
    assert!(q.finish("x").is_some());
    let r = RunProgress::new("over", 2, true).with_log_every(1);
    assert!(r.update(3, f64::NAN, -1.0).unwrap().contains("step 3/2"));
}

#[test]
fn progress_types_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RunProgress>();
    send_sync::<AblationProgress>();
}

#[test]
fn ablation_progress_counts_runs() {
    let a = AblationProgress::new(3, true);
    assert_eq!(a.start_run("vanilla", 5).label(), "[1/3] vanilla");
    assert_eq!(
        a.finish_run("vanilla", true),
        "ablation: 1/3 runs done (0 failed); last: vanilla ok"
    );
    assert_eq!(a.start_run("mor", 5).label(), "[2/3] mor");
    assert!(a
        .finish_run("mor", false)
        .ends_with("(1 failed); last: mor FAILED"));
    assert_eq!((a.done(), a.failed()), (2, 1));
    assert!(a
        .finish()
        .starts_with("ablation finished: 2/3 runs, 1 failed"));
}

#[test]
fn progress_formatting() {
    assert_eq!(format_rate(950.4), "950");
    assert_eq!(format_rate(2150.0), "2.1k");
    assert_eq!(format_rate(1.25e6), "1.2M");
    assert_eq!(format_rate(f64::NAN), "?");
    assert_eq!(format_duration(std::time::Duration::from_secs(42)), "42s");
    assert_eq!(
        format_duration(std::time::Duration::from_secs(312)),
        "5m12s"
    );
    assert_eq!(
        format_duration(std::time::Duration::from_secs(3720)),
        "1h02m"
    );
}
