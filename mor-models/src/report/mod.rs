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
pub use svg::PALETTE;
pub use table::{csv_table, markdown_table, CSV_HEADERS, TABLE_HEADERS};
pub use ticks::{log_ticks, nice_step, nice_ticks, tick_label, NiceTicks};
pub use types::{
    depth_by_difficulty, Curve, CurvePoint, DepthByDifficulty, DepthTrace, DifficultyStat,
    ReportData, RunSummary, TraceToken,
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
         bold; `{MISSING}` marks a value that was not measured.\n",
        runs.len(),
        runs.len() - done
    );
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

    out.push_str("\n## Depth vs difficulty\n\n");
    if data.depth_by_difficulty.is_empty() {
        out.push_str("No depth trace carries difficulty labels.\n");
    } else {
        out.push_str(
            "Mean recursion depth of the tokens with each difficulty label (higher is \
             harder), with the token count: over the whole validation split with \
             full-sequence routing for evaluated runs, otherwise over the sample trace. The \
             paper finds that tokens which are harder to predict receive more recursions.\n\n",
        );
        let mut labels: Vec<u8> = data
            .depth_by_difficulty
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
        for d in &data.depth_by_difficulty {
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
