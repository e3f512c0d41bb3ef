//! `depth_tokens.html`: sample texts with every token coloured by the recursion depth it
//! received, as in the paper's Figure 1 (right); spec §7.
//!
//! The page is self-contained (inline CSS, no scripts). Each token is one
//! `<span class="tok dN">` whose `title` gives its depth and difficulty label on hover.

use std::fmt::Write as _;

use super::format::escape_xml;
use super::types::{DepthByDifficulty, DepthTrace};

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

fn token_title(depth: u8, difficulty: Option<u8>) -> String {
    match difficulty {
        Some(d) => format!("depth {depth}, difficulty {d}"),
        None => format!("depth {depth}"),
    }
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
         h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-bottom: 0.3rem; }\n\
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
         Hover a token to see its depth and difficulty label.</p>\n",
    );
    out.push_str("<div class=\"legend\">depth:");
    for d in first..=max_depth {
        let _ = write!(out, " <span class=\"key d{d}\">{d}</span>");
    }
    out.push_str("</div>\n");

    if traces.is_empty() {
        out.push_str("<p class=\"meta\">No depth traces were recorded.</p>\n");
    }
    for trace in traces {
        let n = trace.tokens.len();
        let mean = if n == 0 {
            0.0
        } else {
            trace.tokens.iter().map(|k| f64::from(k.depth)).sum::<f64>() / n as f64
        };
        let _ = writeln!(
            out,
            "<section class=\"trace\">\n<h2>{}</h2>",
            escape_xml(&trace.run)
        );
        let _ = write!(out, "<p class=\"meta\">{n} tokens, mean depth {mean:.2}");
        let stats = DepthByDifficulty::from_trace(trace);
        if !stats.by_label.is_empty() {
            let parts: Vec<String> = stats
                .by_label
                .iter()
                .map(|s| format!("{}: {:.2} ({} tokens)", s.difficulty, s.mean_depth, s.count))
                .collect();
            let _ = write!(out, "; mean depth by difficulty: {}", parts.join("; "));
        }
        out.push_str("</p>\n<div class=\"text\">");
        for tok in &trace.tokens {
            let _ = write!(
                out,
                "<span class=\"tok d{}\" title=\"{}\">{}</span>",
                tok.depth,
                escape_xml(&token_title(tok.depth, tok.difficulty)),
                escape_xml(&tok.text)
            );
        }
        out.push_str("</div>\n</section>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}
