//! The ablation report: a results table (Markdown, CSV, JSON), SVG plots and an HTML page of
//! tokens coloured by recursion depth.
//!
//! [`write_report`] turns finished runs ([`RunSummary`]), their training curves ([`Curve`])
//! and per-token depth traces ([`DepthTrace`]) into these files in one folder:
//!
//! | file | content |
//! |---|---|
//! | `results.md` | the main table (spec §6.1 columns), depth per difficulty, links to the plots |
//! | `results.csv` | the same columns with exact numbers (RFC 4180) |
//! | `results.json` | every input struct ([`ReportData`]) |
//! | `loss_curves.svg` | training loss against step, validation NLL markers |
//! | `nll_vs_flops.svg` | final validation NLL against training FLOPs |
//! | `depth_histogram.svg` | fraction of tokens at each depth per run |
//! | `depth_vs_difficulty.svg` | mean depth per difficulty label per run (spec §7) |
//! | `depth_tokens.html` | sample text coloured by depth (spec §7, Figure 1 right) |
//!
//! All files are written even when there is nothing to plot (a plot then says "no data"),
//! so the links in `results.md` always resolve.
//!
//! # Examples
//!
//! ```no_run
//! use mor_models::report::{write_report, RunSummary};
//! # fn runs() -> Vec<RunSummary> { Vec::new() }
//! let files = write_report("runs/ablation/report".as_ref(), &runs(), &[], &[])?;
//! println!("table at {}", files.results_md.display());
//! # Ok::<(), std::io::Error>(())
//! ```

#![warn(missing_docs)]

mod format;
mod html;
mod scores;
mod svg;
mod table;
mod ticks;
mod types;

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use format::{
    csv_field, escape_xml, format_exact, format_fixed, format_percent, format_sci, humanize_count,
    markdown_cell, or_missing, MISSING,
};
pub use scores::{
    average_ranks, depth_by_reference_nll, pearson, quintiles, spearman, targets_hash, RuleScores,
    TokenScores, QUINTILES,
};
pub use svg::PALETTE;
pub use table::{csv_table, format_nll, markdown_table, CSV_HEADERS, TABLE_HEADERS};
pub use ticks::{log_ticks, nice_step, nice_ticks, tick_label, NiceTicks};
pub use types::{
    depth_by_difficulty, Curve, CurvePoint, DepthByDifficulty, DepthCorrelation, DepthTrace,
    DifficultyMeasure, DifficultyStat, ReportData, RunSummary, TraceRule, TraceToken,
    NLL_BY_MAX_DEPTH_KEY, NLL_CAUSAL_STDERR_KEY, NLL_STDERR_KEY, VAL_TOKENS_SCORED_KEY,
    VAL_TOKENS_SPLIT_KEY,
};

/// File names inside the report folder.
pub mod file_names {
    /// The Markdown report.
    pub const RESULTS_MD: &str = "results.md";
    /// The CSV table.
    pub const RESULTS_CSV: &str = "results.csv";
    /// The JSON dump of every input.
    pub const RESULTS_JSON: &str = "results.json";
    /// Training loss curves.
    pub const LOSS_CURVES_SVG: &str = "loss_curves.svg";
    /// NLL against training FLOPs.
    pub const NLL_VS_FLOPS_SVG: &str = "nll_vs_flops.svg";
    /// Tokens per depth.
    pub const DEPTH_HISTOGRAM_SVG: &str = "depth_histogram.svg";
    /// Mean depth per difficulty label.
    pub const DEPTH_VS_DIFFICULTY_SVG: &str = "depth_vs_difficulty.svg";
    /// Tokens coloured by depth.
    pub const DEPTH_TOKENS_HTML: &str = "depth_tokens.html";
}

/// Paths of the files [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// `results.md`.
    pub results_md: PathBuf,
    /// `results.csv`.
    pub results_csv: PathBuf,
    /// `results.json`.
    pub results_json: PathBuf,
    /// `loss_curves.svg`.
    pub loss_curves_svg: PathBuf,
    /// `nll_vs_flops.svg`.
    pub nll_vs_flops_svg: PathBuf,
    /// `depth_histogram.svg`.
    pub depth_histogram_svg: PathBuf,
    /// `depth_vs_difficulty.svg`.
    pub depth_vs_difficulty_svg: PathBuf,
    /// `depth_tokens.html`.
    pub depth_tokens_html: PathBuf,
}

impl ReportFiles {
    fn in_dir(dir: &Path) -> Self {
        use file_names::*;
        Self {
            results_md: dir.join(RESULTS_MD),
            results_csv: dir.join(RESULTS_CSV),
            results_json: dir.join(RESULTS_JSON),
            loss_curves_svg: dir.join(LOSS_CURVES_SVG),
            nll_vs_flops_svg: dir.join(NLL_VS_FLOPS_SVG),
            depth_histogram_svg: dir.join(DEPTH_HISTOGRAM_SVG),
            depth_vs_difficulty_svg: dir.join(DEPTH_VS_DIFFICULTY_SVG),
            depth_tokens_html: dir.join(DEPTH_TOKENS_HTML),
        }
    }

    /// Every path, in the order above.
    pub fn all(&self) -> [&Path; 8] {
        [
            &self.results_md,
            &self.results_csv,
            &self.results_json,
            &self.loss_curves_svg,
            &self.nll_vs_flops_svg,
            &self.depth_histogram_svg,
            &self.depth_vs_difficulty_svg,
            &self.depth_tokens_html,
        ]
    }
}

/// Writes the full report into `out_dir` (created if missing), replacing earlier files of the
/// same names.
///
/// Runs appear in the given order. Curves and traces are matched to runs by name; a curve or
/// trace whose run is not in `runs` is still drawn. Non-finite numbers (a diverged run's
/// `NaN`) are shown as `NaN` in the tables, kept in the JSON and left out of the plots.
///
/// # Errors
///
/// Any I/O error from creating the folder or writing a file, with the path in its message.
pub fn write_report(
    out_dir: &Path,
    runs: &[RunSummary],
    curves: &[Curve],
    traces: &[DepthTrace],
) -> io::Result<ReportFiles> {
    let data = ReportData {
        runs: runs.to_vec(),
        curves: curves.to_vec(),
        traces: traces.to_vec(),
        depth_by_difficulty: depth_by_difficulty(traces),
    };
    write_report_data(out_dir, &data)
}

/// Writes the full report from assembled [`ReportData`], like [`write_report`], but with the
/// depth-per-difficulty table as given (for example measured over a whole validation split
/// with [`DepthByDifficulty::from_means`] rather than over the traces).
///
/// # Errors
///
/// Any I/O error from creating the folder or writing a file, with the path in its message.
pub fn write_report_data(out_dir: &Path, data: &ReportData) -> io::Result<ReportFiles> {
    fs::create_dir_all(out_dir).map_err(|e| with_path(e, out_dir))?;
    let files = ReportFiles::in_dir(out_dir);
    let (runs, curves, traces) = (&data.runs, &data.curves, &data.traces);
    let colours = svg::RunColours::new(
        runs.iter()
            .map(|r| r.name.as_str())
            .chain(curves.iter().map(|c| c.run.as_str()))
            .chain(traces.iter().map(|t| t.run.as_str())),
    );
    let json = serde_json::to_string_pretty(data).map_err(io::Error::other)?;

    write(&files.results_md, &results_markdown(data))?;
    write(&files.results_csv, &csv_table(runs))?;
    write(&files.results_json, &(json + "\n"))?;
    write(
        &files.loss_curves_svg,
        &svg::loss_curves_svg(curves, &colours),
    )?;
    write(
        &files.nll_vs_flops_svg,
        &svg::nll_vs_flops_svg(runs, &colours),
    )?;
    write(
        &files.depth_histogram_svg,
        &svg::depth_histogram_svg(runs, &colours),
    )?;
    write(
        &files.depth_vs_difficulty_svg,
        &svg::depth_vs_difficulty_svg(&data.depth_by_difficulty, &colours),
    )?;
    write(&files.depth_tokens_html, &html::depth_tokens_html(traces))?;
    Ok(files)
}

fn write(path: &Path, contents: &str) -> io::Result<()> {
    fs::write(path, contents).map_err(|e| with_path(e, path))
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Renders `results.md`: the main table, failed runs, tokens per depth, depth per difficulty
/// and the plots.
pub fn results_markdown(data: &ReportData) -> String {
    use file_names::*;
    let runs = &data.runs;
    let done = runs.iter().filter(|r| r.is_done()).count();
    let mut out = String::from("# Ablation results\n\n");
    let _ = writeln!(
        out,
        "{} runs ({done} done, {} failed). NLL is the validation negative log-likelihood in nats \
         per token with full-sequence routing; \"NLL (causal)\" uses the causal inference rule. \
         params counts non-embedding parameters; FLOPs and tokens are for training; acc, \
         acc_norm, dead% and samp.acc are percentages. The best NLL of the finished runs is in \
         bold; `{MISSING}` marks a value that was not measured. `a ± s` is an NLL with its \
         standard error over validation sequences (the standard deviation of the \
         per-sequence mean NLLs over the square root of their number); two NLLs closer than \
         about 2·sqrt(s₁² + s₂²) are not distinguishable from noise (conservative: the runs \
         are scored on the same tokens).\n",
        runs.len(),
        runs.len() - done
    );
    let coverage: Vec<(u64, u64)> = runs
        .iter()
        .filter_map(|r| {
            let get = |k: &str| r.extra.get(k).and_then(|v| v.as_u64());
            Some((get(VAL_TOKENS_SCORED_KEY)?, get(VAL_TOKENS_SPLIT_KEY)?))
        })
        .collect();
    if let Some(&(scored, split)) = coverage.first() {
        if coverage.iter().all(|&c| c == (scored, split)) {
            let whole = if scored == split {
                " (the whole split)"
            } else {
                " (cut by eval.max_tokens or eval.max_batches)"
            };
            let _ = writeln!(
                out,
                "Every NLL is over {scored} of the {split} predicted validation tokens{whole}.\n"
            );
        } else {
            out.push_str(
                "The runs were scored on different numbers of validation tokens (see \
                 `val_tokens_scored` in results.json).\n\n",
            );
        }
    }
    out.push_str(&markdown_table(runs));

    let failed: Vec<&RunSummary> = runs.iter().filter(|r| !r.is_done()).collect();
    if !failed.is_empty() {
        out.push_str("\n## Runs that did not finish\n\n");
        for r in failed {
            let _ = writeln!(
                out,
                "- {}: {}",
                markdown_cell(&r.name),
                markdown_cell(&r.status)
            );
        }
    }

    let with_depths: Vec<&RunSummary> = runs
        .iter()
        .filter(|r| r.tokens_per_depth.iter().sum::<u64>() > 0)
        .collect();
    if !with_depths.is_empty() {
        out.push_str("\n## Tokens per depth\n\n");
        out.push_str("Share of tokens (%) whose final recursion depth is d.\n\n");
        let max_depth = with_depths
            .iter()
            .map(|r| r.tokens_per_depth.len())
            .max()
            .unwrap_or(0);
        out.push_str("| run |");
        for d in 1..=max_depth {
            let _ = write!(out, " depth {d} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(max_depth));
        out.push('\n');
        for r in with_depths {
            let total = r.tokens_per_depth.iter().sum::<u64>() as f64;
            let _ = write!(out, "| {} |", markdown_cell(&r.name));
            for d in 0..max_depth {
                let cell = r
                    .tokens_per_depth
                    .get(d)
                    .map(|&n| format_percent(n as f64 / total))
                    .unwrap_or_else(|| MISSING.to_string());
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
    }

    let swept: Vec<(&RunSummary, Vec<(usize, f64)>)> = runs
        .iter()
        .map(|r| (r, r.nll_by_max_depth()))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if !swept.is_empty() {
        out.push_str("\n## NLL by test-time depth\n\n");
        out.push_str(
            "Causal validation NLL when every token runs at most d recursion steps (spec \
             Fig. 5c; the last column is the trained model), on the first scored tokens \
             of the validation split.\n\n",
        );
        let max_d = swept
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.0))
            .max()
            .unwrap_or(0);
        out.push_str("| run |");
        for d in 1..=max_d {
            let _ = write!(out, " d <= {d} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(max_d));
        out.push('\n');
        for (r, v) in swept {
            let _ = write!(out, "| {} |", markdown_cell(&r.name));
            for d in 1..=max_d {
                let cell = v
                    .iter()
                    .find(|p| p.0 == d)
                    .map(|p| format_fixed(p.1, 4))
                    .unwrap_or_else(|| MISSING.to_string());
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
    }

    out.push_str("\n## Depth vs difficulty\n\n");
    let (labelled, by_nll) = split_by_measure(&data.depth_by_difficulty);
    if labelled.is_empty() && by_nll.is_empty() {
        out.push_str(
            "No depth trace carries difficulty labels, and no reference run's per-token NLL \
             was available.\n",
        );
    }
    if !labelled.is_empty() {
        out.push_str(
            "Mean recursion depth of the tokens with each difficulty label (higher is \
             harder), with the token count: over the whole validation split with \
             full-sequence routing for evaluated runs, otherwise over the sample trace. The \
             paper finds that tokens which are harder to predict receive more recursions.\n\n",
        );
        let mut labels: Vec<u8> = labelled
            .iter()
            .flat_map(|d| d.by_label.iter().map(|s| s.difficulty))
            .collect();
        labels.sort_unstable();
        labels.dedup();
        out.push_str("| run |");
        for l in &labels {
            let _ = write!(out, " difficulty {l} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(labels.len()));
        out.push('\n');
        for d in &labelled {
            let _ = write!(out, "| {} |", markdown_cell(&d.run));
            for &l in &labels {
                let cell = d
                    .by_label
                    .iter()
                    .find(|s| s.difficulty == l)
                    .map(|s| format!("{:.2} (n={})", s.mean_depth, s.count))
                    .unwrap_or_else(|| MISSING.to_string());
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
    }
    if !by_nll.is_empty() {
        if !labelled.is_empty() {
            out.push('\n');
        }
        depth_by_nll_markdown(&mut out, &by_nll);
    }

    out.push_str("\n## Plots\n\n");
    for (title, file) in [
        ("Training loss", LOSS_CURVES_SVG),
        ("Validation NLL against training FLOPs", NLL_VS_FLOPS_SVG),
        ("Tokens per recursion depth", DEPTH_HISTOGRAM_SVG),
        ("Mean depth by token difficulty", DEPTH_VS_DIFFICULTY_SVG),
    ] {
        let _ = writeln!(out, "### {title}\n\n[![{title}]({file})]({file})\n");
    }
    let _ = writeln!(
        out,
        "Tokens coloured by depth: [{DEPTH_TOKENS_HTML}]({DEPTH_TOKENS_HTML})"
    );
    out
}

/// Entries by measure: the corpus's labels, and quintiles of a reference run's NLL.
pub(crate) fn split_by_measure(
    stats: &[DepthByDifficulty],
) -> (Vec<&DepthByDifficulty>, Vec<&DepthByDifficulty>) {
    stats
        .iter()
        .partition(|d| matches!(d.measure, DifficultyMeasure::Labels))
}

/// The quintile table: mean depth per quintile of the reference NLL, and the correlations.
fn depth_by_nll_markdown(out: &mut String, entries: &[&DepthByDifficulty]) {
    let _ = writeln!(
        out,
        "Difficulty as the token's NLL under the reference run on the same validation tokens, \
         in {QUINTILES} quintiles by rank (Q1 easiest, Q{QUINTILES} hardest): mean recursion \
         depth of the tokens in each quintile, and the correlation over tokens between depth \
         and that NLL (Pearson r; Spearman ρ with tied depths at their mean rank) for each \
         routing rule. A positive correlation means harder tokens receive more recursions, \
         as the paper finds.\n"
    );
    let rules: Vec<TraceRule> = [TraceRule::FullSequence, TraceRule::Causal]
        .into_iter()
        .filter(|r| {
            entries
                .iter()
                .any(|d| d.correlations.iter().any(|c| c.rule == *r))
        })
        .collect();
    let short = |r: TraceRule| match r {
        TraceRule::FullSequence => "full seq.",
        TraceRule::Causal => "causal",
        TraceRule::Both => "both",
    };
    out.push_str("| run | reference | depths |");
    for q in 1..=QUINTILES {
        let _ = write!(out, " Q{q} |");
    }
    for &r in &rules {
        let _ = write!(out, " r ({0}) | ρ ({0}) |", short(r));
    }
    out.push_str("\n|---|---|---|");
    out.push_str(&"---:|".repeat(QUINTILES + 2 * rules.len()));
    out.push('\n');
    let corr = |x: Option<f64>| x.map_or_else(|| MISSING.to_string(), |v| format!("{v:+.3}"));
    for d in entries {
        let (reference, rule) = match &d.measure {
            DifficultyMeasure::ReferenceNll {
                reference, rule, ..
            } => (reference.as_str(), *rule),
            DifficultyMeasure::Labels => ("", TraceRule::Both),
        };
        let _ = write!(
            out,
            "| {} | {} | {} |",
            markdown_cell(&d.run),
            markdown_cell(reference),
            short(rule)
        );
        for q in 0..QUINTILES {
            let cell = d
                .by_label
                .iter()
                .find(|s| usize::from(s.difficulty) == q)
                .map(|s| format!("{:.2} (n={})", s.mean_depth, s.count))
                .unwrap_or_else(|| MISSING.to_string());
            let _ = write!(out, " {cell} |");
        }
        for &r in &rules {
            let c = d.correlations.iter().find(|c| c.rule == r);
            let _ = write!(
                out,
                " {} | {} |",
                corr(c.and_then(|c| c.pearson)),
                corr(c.and_then(|c| c.spearman))
            );
        }
        out.push('\n');
    }
    // The quintile bounds, once per reference run.
    let mut seen: Vec<&str> = Vec::new();
    for d in entries {
        if let DifficultyMeasure::ReferenceNll {
            reference, edges, ..
        } = &d.measure
        {
            if seen.contains(&reference.as_str()) || edges.len() != QUINTILES + 1 {
                continue;
            }
            seen.push(reference);
            let parts: Vec<String> = (0..QUINTILES)
                .map(|q| format!("Q{} {:.2}–{:.2}", q + 1, edges[q], edges[q + 1]))
                .collect();
            let _ = writeln!(
                out,
                "\nNLL bounds of the quintiles under {} (nats): {}.",
                markdown_cell(reference),
                parts.join(", ")
            );
        }
    }
}
