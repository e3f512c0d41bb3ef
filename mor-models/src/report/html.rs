//! `depth_tokens.html`: sample texts with every token coloured by the recursion depth it
//! received, as in the paper's Figure 1 (right); spec §7.
//!
//! The page is self-contained (inline CSS, no scripts). Each run is one
//! `<section class="trace">`; each of its sample sequences one `<div class="sample">`, with
//! one `<div class="text" data-rule="...">` per routing rule: the full-sequence rule and the
//! causal rule when they differ (tokens whose depth differs are underlined), or one marked
//! as both. Each token is one `<span class="tok dN">` whose `title` gives its depth (and the
//! other rule's where it differs) and difficulty label on hover.

use std::fmt::Write as _;

use super::format::escape_xml;
use super::types::{DepthByDifficulty, DepthTrace, TraceRule};

/// Lightest and darkest colours of the depth ramp (sRGB).
const LIGHT: [f64; 3] = [222.0, 235.0, 247.0];
const DARK: [f64; 3] = [8.0, 48.0, 107.0];

/// Background and text colour for `depth` out of `max_depth` (depth 0 has no background).
fn depth_colours(depth: u8, max_depth: u8) -> (String, &'static str) {
    if depth == 0 {
        return ("transparent".to_string(), "#555555");
    }
    let t = if max_depth <= 1 {
        1.0
    } else {
        f64::from(depth - 1) / f64::from(max_depth - 1)
    };
    let c: Vec<u8> = LIGHT
        .iter()
        .zip(DARK)
        .map(|(&a, b)| (a + (b - a) * t).round() as u8)
        .collect();
    let text = if t > 0.5 { "#ffffff" } else { "#111111" };
    (format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]), text)
}

fn token_title(depth: u8, other: Option<(TraceRule, u8)>, difficulty: Option<u8>) -> String {
    let mut t = format!("depth {depth}");
    if let Some((rule, d)) = other {
        let _ = write!(t, " ({}: {d})", rule.describe());
    }
    if let Some(d) = difficulty {
        let _ = write!(t, ", difficulty {d}");
    }
    t
}

fn rule_attr(rule: TraceRule) -> &'static str {
    match rule {
        TraceRule::FullSequence => "full_sequence",
        TraceRule::Causal => "causal",
        TraceRule::Both => "both",
    }
}

/// Traces grouped by run, then by sample sequence, both in first-seen order (a trace
/// without a sequence index is a group of its own).
fn grouped(traces: &[DepthTrace]) -> Vec<(&str, Vec<Vec<&DepthTrace>>)> {
    let mut runs: Vec<(&str, Vec<Vec<&DepthTrace>>)> = Vec::new();
    for t in traces {
        let i = match runs.iter().position(|(r, _)| *r == t.run) {
            Some(i) => i,
            None => {
                runs.push((&t.run, Vec::new()));
                runs.len() - 1
            }
        };
        let groups = &mut runs[i].1;
        match groups
            .iter_mut()
            .find(|g| t.sequence.is_some() && g[0].sequence == t.sequence)
        {
            Some(g) => g.push(t),
            None => groups.push(vec![t]),
        }
    }
    runs
}

/// Renders the page for `traces`.
pub(crate) fn depth_tokens_html(traces: &[DepthTrace]) -> String {
    let max_depth = traces
        .iter()
        .flat_map(|t| t.tokens.iter().map(|k| k.depth))
        .max()
        .unwrap_or(1)
        .max(1);
    let has_zero = traces.iter().any(|t| t.tokens.iter().any(|k| k.depth == 0));
    let first = if has_zero { 0 } else { 1 };

    let mut out = String::new();
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n");
    out.push_str("<title>Tokens coloured by recursion depth</title>\n<style>\n");
    out.push_str(
        "body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; line-height: 1.5; }\n\
         h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-bottom: 0.3rem; } h3 { font-size: 1rem; margin: 1rem 0 0.2rem; }\n\
         .differs { text-decoration: underline; text-decoration-thickness: 2px; }\n\
         .meta { color: #666; font-size: 0.9rem; margin-top: 0; }\n\
         .text { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 0.95rem; line-height: 1.9; white-space: pre-wrap; word-wrap: break-word; border: 1px solid #ddd; border-radius: 4px; padding: 0.8rem; }\n\
         .tok { border-radius: 2px; padding: 0.1rem 0; }\n\
         .legend { display: flex; gap: 0.5rem; align-items: center; flex-wrap: wrap; font-size: 0.9rem; }\n\
         .key { padding: 0.15rem 0.6rem; border-radius: 3px; border: 1px solid #ccc; }\n",
    );
    for d in first..=max_depth {
        let (bg, fg) = depth_colours(d, max_depth);
        let _ = writeln!(out, ".d{d} {{ background: {bg}; color: {fg}; }}");
    }
    out.push_str("</style>\n</head>\n<body>\n<h1>Tokens coloured by recursion depth</h1>\n");
    out.push_str(
        "<p>Each token is shaded by the number of recursion steps it went through, light to dark. \
         The depth shown at a token is the compute spent to predict the token after it. \
         Hover a token to see its depth and difficulty label. \
         Two routing rules exist: the <em>full-sequence</em> rule is the training-time top-k \
         over the whole sequence (not causal: a token's depth may depend on later tokens); the \
         <em>causal</em> rule is what decoding uses. Each sample sequence is shown under each \
         rule evaluated, once when both rules give it the same depths.</p>\n",
    );
    out.push_str("<div class=\"legend\">depth:");
    for d in first..=max_depth {
        let _ = write!(out, " <span class=\"key d{d}\">{d}</span>");
    }
    out.push_str("</div>\n");

    if traces.is_empty() {
        out.push_str("<p class=\"meta\">No depth traces were recorded.</p>\n");
    }
    for (run, samples) in grouped(traces) {
        let _ = writeln!(
            out,
            "<section class=\"trace\" data-run=\"{0}\">\n<h2>{0}</h2>",
            escape_xml(run)
        );
        for sample in samples {
            let title = match sample[0].sequence {
                Some(i) => format!("validation sequence {i}"),
                None => "sample".to_string(),
            };
            let seq_attr = sample[0]
                .sequence
                .map(|i| format!(" data-sequence=\"{i}\""))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "<div class=\"sample\"{seq_attr}>\n<h3>{}</h3>",
                escape_xml(&title)
            );
            // The other rule's depths, where the sample has both rules separately.
            let other_of = |t: &DepthTrace| {
                let want = match t.rule {
                    TraceRule::FullSequence => TraceRule::Causal,
                    TraceRule::Causal => TraceRule::FullSequence,
                    TraceRule::Both => return None,
                };
                sample
                    .iter()
                    .find(|o| o.rule == want && o.tokens.len() == t.tokens.len())
                    .map(|o| (want, *o))
            };
            for trace in &sample {
                trace_html(&mut out, trace, other_of(trace));
            }
            out.push_str("</div>\n");
        }
        out.push_str("</section>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// One rule's rendering of a sample: a line of statistics and the coloured tokens.
fn trace_html(out: &mut String, trace: &DepthTrace, other: Option<(TraceRule, &DepthTrace)>) {
    let n = trace.tokens.len();
    let mean = if n == 0 {
        0.0
    } else {
        trace.tokens.iter().map(|k| f64::from(k.depth)).sum::<f64>() / n as f64
    };
    let _ = write!(
        out,
        "<p class=\"meta\">{}: {n} tokens, mean depth {mean:.2}",
        escape_xml(trace.rule.describe())
    );
    if let Some((rule, o)) = other {
        let differ = trace
            .tokens
            .iter()
            .zip(&o.tokens)
            .filter(|(a, b)| a.depth != b.depth)
            .count();
        let _ = write!(
            out,
            "; {differ} of {n} tokens get another depth under the {} (underlined)",
            escape_xml(rule.describe())
        );
    }
    let stats = DepthByDifficulty::from_trace(trace);
    if !stats.by_label.is_empty() {
        let parts: Vec<String> = stats
            .by_label
            .iter()
            .map(|s| format!("{}: {:.2} ({} tokens)", s.difficulty, s.mean_depth, s.count))
            .collect();
        let _ = write!(out, "; mean depth by difficulty: {}", parts.join("; "));
    }
    let _ = write!(
        out,
        "</p>\n<div class=\"text\" data-rule=\"{}\">",
        rule_attr(trace.rule)
    );
    for (i, tok) in trace.tokens.iter().enumerate() {
        let other_depth = other
            .and_then(|(rule, o)| Some((rule, o.tokens.get(i)?.depth)))
            .filter(|&(_, d)| d != tok.depth);
        let differs = if other_depth.is_some() {
            " differs"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<span class=\"tok d{}{differs}\" title=\"{}\">{}</span>",
            tok.depth,
            escape_xml(&token_title(tok.depth, other_depth, tok.difficulty)),
            escape_xml(&tok.text)
        );
    }
    out.push_str("</div>\n");
}
