//! Hand-written SVG plots: training loss, NLL against FLOPs, depth histogram and depth
//! against difficulty.
//!
//! Every plot shares one frame (title, labelled axes with nice-number ticks, light grid, a
//! legend on the right) and one deterministic colour per run from the Okabe–Ito palette;
//! after eight runs the colours repeat with dashed lines and lighter bars.

use std::fmt::Write as _;

use super::format::escape_xml;
use super::ticks::{log_ticks, nice_ticks, tick_label, NiceTicks};
use super::types::{Curve, DepthByDifficulty, RunSummary};

/// The Okabe–Ito palette, ordered so the first colours are the most distinct on white, with
/// its yellow (too light for lines on white) replaced by a mid grey.
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999",
];

/// Dash patterns of the second and third pass through the palette.
const DASHES: [&str; 3] = ["", "6 3", "2 2"];
/// Bar fill opacities of the first, second and third pass through the palette.
const BAR_OPACITY: [f64; 3] = [0.9, 0.55, 0.3];

/// The most points drawn per training curve; longer curves are thinned evenly.
const MAX_CURVE_POINTS: usize = 1500;

/// Maps run names to a stable colour index: runs in table order first, then names that only
/// appear in curves or traces, in order of appearance.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunColours {
    names: Vec<String>,
}

impl RunColours {
    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Self::default();
        for n in names {
            if !out.names.iter().any(|m| m == n) {
                out.names.push(n.to_string());
            }
        }
        out
    }

    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or(self.names.len())
    }

    /// The colour of a run.
    pub(crate) fn colour(&self, name: &str) -> &'static str {
        PALETTE[self.index(name) % PALETTE.len()]
    }

    fn dash(&self, name: &str) -> &'static str {
        DASHES[(self.index(name) / PALETTE.len()) % DASHES.len()]
    }

    fn bar_opacity(&self, name: &str) -> f64 {
        BAR_OPACITY[(self.index(name) / PALETTE.len()) % BAR_OPACITY.len()]
    }
}

/// How an axis maps values to pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
}

/// A numeric axis: scale, ticks and a label formatter.
#[derive(Debug, Clone)]
struct Axis {
    scale: Scale,
    ticks: NiceTicks,
    title: String,
    percent: bool,
}

impl Axis {
    fn linear(min: f64, max: f64, title: &str) -> Self {
        Self {
            scale: Scale::Linear,
            ticks: nice_ticks(min, max, 6),
            title: title.into(),
            percent: false,
        }
    }

    fn log(min: f64, max: f64, title: &str) -> Self {
        Self {
            scale: Scale::Log,
            ticks: log_ticks(min, max),
            title: title.into(),
            percent: false,
        }
    }

    /// Widens the axis so that `[min, max]` sits inside it with a margin of `pad` (a fraction
    /// of the span; on a log axis, of the span in decades).
    fn padded(min: f64, max: f64, pad: f64, title: &str, log: bool) -> Self {
        if log {
            let (a, b) = (min.log10(), max.log10());
            let m = (b - a) * pad;
            Self::log(10f64.powf(a - m), 10f64.powf(b + m), title)
        } else {
            let m = if max > min { (max - min) * pad } else { 0.0 };
            Self::linear(min - m, max + m, title)
        }
    }

    /// Position of `v` as a fraction of the axis length (0 at `lo`, 1 at `hi`).
    fn frac(&self, v: f64) -> f64 {
        let (lo, hi) = (self.ticks.lo, self.ticks.hi);
        match self.scale {
            Scale::Linear => (v - lo) / (hi - lo),
            Scale::Log => {
                (v.max(f64::MIN_POSITIVE).log10() - lo.log10()) / (hi.log10() - lo.log10())
            }
        }
    }

    fn label(&self, v: f64) -> String {
        if self.percent {
            let step = if self.ticks.step > 0.0 {
                self.ticks.step * 100.0
            } else {
                0.0
            };
            format!("{}%", tick_label(v * 100.0, step))
        } else {
            tick_label(v, self.ticks.step)
        }
    }
}

/// A legend entry's symbol.
#[derive(Debug, Clone, Copy)]
enum Swatch {
    Line {
        colour: &'static str,
        dash: &'static str,
    },
    Marker {
        colour: &'static str,
        hollow: bool,
    },
    Bar {
        colour: &'static str,
        opacity: f64,
    },
}

/// The shared layout of every plot; pixel coordinates of the plotting area.
#[derive(Debug)]
struct Plot {
    out: String,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

const WIDTH: f64 = 830.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 74.0;
const RIGHT: f64 = 260.0;
const TOP: f64 = 46.0;
const BOTTOM: f64 = 58.0;
const LEGEND_ROW: f64 = 18.0;
const FONT: &str = "DejaVu Sans, Helvetica, Arial, sans-serif";

impl Plot {
    /// Opens a plot sized so that `legend_rows` legend entries fit beside it.
    fn new(title: &str, legend_rows: usize) -> Self {
        let h = HEIGHT.max(TOP + 16.0 + legend_rows as f64 * LEGEND_ROW + BOTTOM);
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="{FONT}" font-size="12">"#
        );
        let _ = writeln!(out, r#"<title>{}</title>"#, escape_xml(title));
        let _ = writeln!(
            out,
            r##"<rect x="0" y="0" width="{WIDTH}" height="{h}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text class="plot-title" x="{:.1}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            (LEFT + WIDTH - RIGHT) / 2.0,
            escape_xml(title)
        );
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, h - BOTTOM);
        let _ = writeln!(
            out,
            r#"<defs><clipPath id="plot-area"><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/></clipPath></defs>"#,
            y0 - 1.0,
            x1 - x0,
            y1 - y0 + 2.0
        );
        Self {
            out,
            h,
            x0,
            x1,
            y0,
            y1,
        }
    }

    fn px(&self, axis: &Axis, v: f64) -> f64 {
        self.x0 + axis.frac(v) * (self.x1 - self.x0)
    }

    fn py(&self, axis: &Axis, v: f64) -> f64 {
        self.y1 - axis.frac(v) * (self.y1 - self.y0)
    }

    /// Draws the y grid, y ticks and both axis titles.
    fn y_axis(&mut self, y: &Axis) {
        for &t in &y.ticks.ticks {
            let py = self.py(y, t);
            let _ = writeln!(
                self.out,
                r##"<line class="grid" x1="{:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e6e6e6" stroke-width="1"/>"##,
                self.x0, self.x1
            );
            let _ = writeln!(
                self.out,
                r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                self.x0 - 7.0,
                py + 4.0,
                escape_xml(&y.label(t))
            );
        }
        let cy = (self.y0 + self.y1) / 2.0;
        let _ = writeln!(
            self.out,
            r#"<text class="axis-title" x="18" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 18 {cy:.1})">{}</text>"#,
            escape_xml(&y.title)
        );
    }

    /// Draws numeric x ticks with vertical grid lines.
    fn x_axis(&mut self, x: &Axis) {
        for &t in &x.ticks.ticks {
            let px = self.px(x, t);
            let _ = writeln!(
                self.out,
                r##"<line class="grid" x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#f0f0f0" stroke-width="1"/>"##,
                self.y0, self.y1
            );
            self.x_tick(px, &x.label(t));
        }
        self.x_title(&x.title);
    }

    fn x_tick(&mut self, px: f64, label: &str) {
        let _ = writeln!(
            self.out,
            r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#333333"/>"##,
            self.y1,
            self.y1 + 5.0
        );
        let _ = writeln!(
            self.out,
            r#"<text class="tick" x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            self.y1 + 19.0,
            escape_xml(label)
        );
    }

    fn x_title(&mut self, title: &str) {
        let _ = writeln!(
            self.out,
            r#"<text class="axis-title" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (self.x0 + self.x1) / 2.0,
            self.h - 14.0,
            escape_xml(title)
        );
    }

    /// Draws the left and bottom axis lines (after the data, so they sit on top).
    fn axis_lines(&mut self) {
        let _ = writeln!(
            self.out,
            r##"<path class="axes" d="M{:.1},{:.1} V{:.1} H{:.1}" fill="none" stroke="#333333" stroke-width="1"/>"##,
            self.x0, self.y0, self.y1, self.x1
        );
    }

    fn legend(&mut self, entries: &[(String, Swatch)]) {
        let x = self.x1 + 18.0;
        for (i, (name, swatch)) in entries.iter().enumerate() {
            let y = self.y0 + 8.0 + i as f64 * LEGEND_ROW;
            match *swatch {
                Swatch::Line { colour, dash } => {
                    let _ = writeln!(
                        self.out,
                        r#"<line class="legend-line" x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2.2"{}/>"#,
                        x + 22.0,
                        dash_attr(dash)
                    );
                }
                Swatch::Marker { colour, hollow } => {
                    let fill = if hollow { "#ffffff" } else { colour };
                    let _ = writeln!(
                        self.out,
                        r#"<circle class="legend-marker" cx="{:.1}" cy="{y:.1}" r="4" fill="{fill}" stroke="{colour}" stroke-width="1.6"/>"#,
                        x + 11.0
                    );
                }
                Swatch::Bar { colour, opacity } => {
                    let _ = writeln!(
                        self.out,
                        r#"<rect class="swatch" x="{:.1}" y="{:.1}" width="14" height="11" fill="{colour}" fill-opacity="{opacity}" stroke="{colour}"/>"#,
                        x + 4.0,
                        y - 5.5
                    );
                }
            }
            let _ = writeln!(
                self.out,
                r#"<text class="legend-label" x="{:.1}" y="{:.1}">{}<title>{}</title></text>"#,
                x + 30.0,
                y + 4.0,
                escape_xml(&truncate(name, 28)),
                escape_xml(name)
            );
        }
    }

    /// A small grey note in the bottom-right corner.
    fn note(&mut self, text: &str) {
        let _ = writeln!(
            self.out,
            r##"<text class="note" x="{:.1}" y="{:.1}" text-anchor="end" font-size="11" fill="#666666">{}</text>"##,
            WIDTH - 10.0,
            self.h - 6.0,
            escape_xml(text)
        );
    }

    fn no_data(&mut self, what: &str) {
        let _ = writeln!(
            self.out,
            r##"<text class="no-data" x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888888">{}</text>"##,
            (self.x0 + self.x1) / 2.0,
            (self.y0 + self.y1) / 2.0,
            escape_xml(what)
        );
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max_chars.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Evenly thins `n` indices down to at most `max`, always keeping the first and last.
fn thin(n: usize, max: usize) -> Vec<usize> {
    if n <= max || max < 2 {
        return (0..n).collect();
    }
    let stride = n.div_ceil(max - 1);
    let mut idx: Vec<usize> = (0..n).step_by(stride).collect();
    if idx.last() != Some(&(n - 1)) {
        idx.push(n - 1);
    }
    idx
}

fn min_max(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// `loss_curves.svg`: training loss against step, one polyline per curve with points, and
/// hollow markers where a validation NLL was measured.
///
/// The y axis is cut at the highest loss after the first 5% of each curve's points (and at
/// least the highest validation NLL), so the early transient does not flatten the rest; the
/// cut-off part is clipped.
pub(crate) fn loss_curves_svg(curves: &[Curve], colours: &RunColours) -> String {
    let drawn: Vec<&Curve> = curves
        .iter()
        .filter(|c| {
            c.points
                .iter()
                .any(|p| p.loss.is_finite() || p.val_nll.is_some_and(f64::is_finite))
        })
        .collect();
    let has_val = drawn.iter().any(|c| {
        c.points
            .iter()
            .any(|p| p.val_nll.is_some_and(f64::is_finite))
    });
    let mut legend: Vec<(String, Swatch)> = drawn
        .iter()
        .map(|c| {
            (
                c.run.clone(),
                Swatch::Line {
                    colour: colours.colour(&c.run),
                    dash: colours.dash(&c.run),
                },
            )
        })
        .collect();
    if has_val {
        legend.push((
            "val NLL".to_string(),
            Swatch::Marker {
                colour: "#555555",
                hollow: true,
            },
        ));
    }
    let mut plot = Plot::new("Training loss", legend.len());

    let steps = min_max(
        drawn
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.step as f64)),
    );
    let y_lo = min_max(drawn.iter().flat_map(|c| {
        c.points
            .iter()
            .flat_map(|p| [Some(p.loss), p.val_nll])
            .flatten()
    }));
    // The upper end of the y axis ignores the first tenth of the step range, where the loss
    // is still falling steeply, unless nothing is left after it.
    let late_from = steps.map_or(0.0, |(a, b)| a + 0.1 * (b - a));
    let late = |all: bool| {
        min_max(drawn.iter().flat_map(|c| {
            let loss = c
                .points
                .iter()
                .filter(move |p| all || p.step as f64 >= late_from)
                .map(|p| p.loss);
            loss.chain(c.points.iter().filter_map(|p| p.val_nll))
        }))
    };
    let y_hi = late(false).or_else(|| late(true));
    let (Some((sx0, sx1)), Some((ly0, _)), Some((_, ly1))) = (steps, y_lo, y_hi) else {
        let x = Axis::linear(0.0, 1.0, "step");
        let y = Axis::linear(0.0, 1.0, "training loss (nats/token)");
        plot.y_axis(&y);
        plot.x_axis(&x);
        plot.no_data("no training curves");
        plot.axis_lines();
        return plot.finish();
    };
    let x = Axis::linear(sx0, sx1, "step");
    let y = Axis::linear(ly0, ly1, "training loss (nats/token)");
    plot.y_axis(&y);
    plot.x_axis(&x);

    plot.out.push_str("<g clip-path=\"url(#plot-area)\">\n");
    for c in &drawn {
        let colour = colours.colour(&c.run);
        let finite: Vec<_> = c.points.iter().filter(|p| p.loss.is_finite()).collect();
        if !finite.is_empty() {
            let mut pts = String::new();
            for i in thin(finite.len(), MAX_CURVE_POINTS) {
                let p = finite[i];
                let _ = write!(
                    pts,
                    "{:.1},{:.1} ",
                    plot.px(&x, p.step as f64),
                    plot.py(&y, p.loss)
                );
            }
            let _ = writeln!(
                plot.out,
                r#"<polyline class="curve" data-run="{}" points="{}" fill="none" stroke="{colour}" stroke-width="1.6" stroke-linejoin="round"{}/>"#,
                escape_xml(&c.run),
                pts.trim_end(),
                dash_attr(colours.dash(&c.run))
            );
        }
        for p in &c.points {
            if let Some(v) = p.val_nll.filter(|v| v.is_finite()) {
                let _ = writeln!(
                    plot.out,
                    r##"<circle class="val-marker" data-run="{}" cx="{:.1}" cy="{:.1}" r="3.5" fill="#ffffff" stroke="{colour}" stroke-width="1.6"><title>{} step {}: val NLL {:.4}</title></circle>"##,
                    escape_xml(&c.run),
                    plot.px(&x, p.step as f64),
                    plot.py(&y, v),
                    escape_xml(&c.run),
                    p.step,
                    v
                );
            }
        }
    }
    plot.out.push_str("</g>\n");
    plot.axis_lines();
    plot.legend(&legend);
    plot.finish()
}

/// `nll_vs_flops.svg`: final validation NLL against training FLOPs, one labelled marker per
/// run with a finite NLL (log x when the FLOPs span a factor of ten or more).
pub(crate) fn nll_vs_flops_svg(runs: &[RunSummary], colours: &RunColours) -> String {
    let shown: Vec<&RunSummary> = runs
        .iter()
        .filter(|r| r.val_nll.is_finite() && r.train_flops.is_finite() && r.train_flops > 0.0)
        .collect();
    let mut plot = Plot::new("Validation NLL against training FLOPs", 0);
    let flops = min_max(shown.iter().map(|r| r.train_flops));
    let nll = min_max(shown.iter().map(|r| r.val_nll));
    let (Some((fx0, fx1)), Some((ny0, ny1))) = (flops, nll) else {
        plot.y_axis(&Axis::linear(0.0, 1.0, "validation NLL (nats/token)"));
        plot.x_axis(&Axis::linear(0.0, 1.0, "training FLOPs"));
        plot.no_data("no run with a finite NLL");
        plot.axis_lines();
        return plot.finish();
    };
    // Markers stay off the axis lines: both ranges get a 5% margin.
    let x = Axis::padded(
        fx0,
        fx1,
        0.05,
        "training FLOPs",
        fx0 > 0.0 && fx1 / fx0 >= 10.0,
    );
    let y = Axis::padded(ny0, ny1, 0.05, "validation NLL (nats/token)", false);
    plot.y_axis(&y);
    plot.x_axis(&x);

    // Labels sit right of their marker; a label that would overlap an earlier one moves down,
    // with a leader line back to its marker.
    let mut order: Vec<usize> = (0..shown.len()).collect();
    order.sort_by(|&a, &b| {
        shown[a]
            .val_nll
            .total_cmp(&shown[b].val_nll)
            .then(a.cmp(&b))
    });
    let mut placed: Vec<(f64, f64, f64)> = Vec::new(); // (x_start, x_end, y)
    let mut labels = String::new();
    for &i in &order {
        let r = shown[i];
        let (mx, my) = (plot.px(&x, r.train_flops), plot.py(&y, r.val_nll));
        let text = truncate(&r.name, 28);
        let (lx0, lx1) = (mx + 9.0, mx + 9.0 + 6.8 * text.chars().count() as f64);
        let mut ly = my;
        for _ in 0..=placed.len() {
            let clash = placed
                .iter()
                .find(|&&(a, b, y)| a < lx1 && lx0 < b && (y - ly).abs() < 14.0);
            match clash {
                Some(&(_, _, y)) => ly = y + 14.0,
                None => break,
            }
        }
        placed.push((lx0, lx1, ly));
        if (ly - my).abs() > 2.0 {
            let _ = writeln!(
                labels,
                r##"<line class="leader" x1="{mx:.1}" y1="{my:.1}" x2="{:.1}" y2="{:.1}" stroke="#aaaaaa" stroke-width="0.8"/>"##,
                lx0 - 2.0,
                ly - 4.0
            );
        }
        let _ = writeln!(
            labels,
            r#"<text class="marker-label" x="{lx0:.1}" y="{:.1}" font-size="11">{}</text>"#,
            ly + 4.0,
            escape_xml(&text)
        );
    }
    plot.out.push_str(&labels);
    for r in &shown {
        let colour = colours.colour(&r.name);
        let _ = writeln!(
            plot.out,
            r##"<circle class="run-marker" data-run="{}" cx="{:.1}" cy="{:.1}" r="5" fill="{colour}" stroke="#ffffff" stroke-width="1"><title>{}: NLL {:.4} at {:.2e} FLOPs</title></circle>"##,
            escape_xml(&r.name),
            plot.px(&x, r.train_flops),
            plot.py(&y, r.val_nll),
            escape_xml(&r.name),
            r.val_nll,
            r.train_flops
        );
    }
    plot.axis_lines();
    let hidden = runs.len() - shown.len();
    if hidden > 0 {
        plot.note(&format!(
            "{hidden} run(s) without a finite NLL or FLOPs not shown"
        ));
    }
    plot.finish()
}

/// `depth_histogram.svg`: for each run with depth counts, the fraction of tokens whose final
/// depth is `d`, as grouped bars (one group per depth, one bar per run and depth).
pub(crate) fn depth_histogram_svg(runs: &[RunSummary], colours: &RunColours) -> String {
    let shown: Vec<&RunSummary> = runs
        .iter()
        .filter(|r| r.tokens_per_depth.iter().sum::<u64>() > 0)
        .collect();
    let legend: Vec<(String, Swatch)> = shown
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                Swatch::Bar {
                    colour: colours.colour(&r.name),
                    opacity: colours.bar_opacity(&r.name),
                },
            )
        })
        .collect();
    let mut plot = Plot::new("Tokens per recursion depth", legend.len());
    let max_depth = shown
        .iter()
        .map(|r| r.tokens_per_depth.len())
        .max()
        .unwrap_or(0);
    let fractions: Vec<Vec<f64>> = shown
        .iter()
        .map(|r| {
            let total = r.tokens_per_depth.iter().sum::<u64>() as f64;
            r.tokens_per_depth
                .iter()
                .map(|&n| n as f64 / total)
                .collect()
        })
        .collect();
    let top = fractions.iter().flatten().copied().fold(0.0, f64::max);
    let mut y = Axis::linear(
        0.0,
        if top > 0.0 { top * 1.05 } else { 1.0 },
        "share of tokens",
    );
    y.percent = true;
    plot.y_axis(&y);
    if shown.is_empty() {
        plot.x_title("recursion depth");
        plot.no_data("no run with depth counts");
        plot.axis_lines();
        return plot.finish();
    }
    let band = (plot.x1 - plot.x0) / max_depth as f64;
    let slot = band * 0.8 / shown.len() as f64;
    for d in 0..max_depth {
        plot.x_tick(plot.x0 + (d as f64 + 0.5) * band, &(d + 1).to_string());
    }
    plot.x_title("recursion depth");
    for (j, r) in shown.iter().enumerate() {
        let colour = colours.colour(&r.name);
        let opacity = colours.bar_opacity(&r.name);
        for (d, &f) in fractions[j].iter().enumerate() {
            let bx = plot.x0 + d as f64 * band + band * 0.1 + j as f64 * slot;
            let by = plot.py(&y, f);
            let _ = writeln!(
                plot.out,
                r#"<rect class="bar" data-run="{}" data-depth="{}" x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{colour}" fill-opacity="{opacity}" stroke="{colour}" stroke-width="0.8"><title>{}: depth {}, {:.1}% ({} tokens)</title></rect>"#,
                escape_xml(&r.name),
                d + 1,
                (slot - 1.0).max(0.5),
                (plot.y1 - by).max(0.0),
                escape_xml(&r.name),
                d + 1,
                f * 100.0,
                r.tokens_per_depth[d]
            );
        }
    }
    plot.axis_lines();
    plot.legend(&legend);
    plot.finish()
}

/// `depth_vs_difficulty.svg`: mean recursion depth per difficulty label, one polyline with
/// markers per run.
/// Mean depth per difficulty group: the corpus's labels where any run has them, otherwise
/// the quintiles of a reference run's NLL (labelled `Q1`..`Q5`).
pub(crate) fn depth_vs_difficulty_svg(stats: &[DepthByDifficulty], colours: &RunColours) -> String {
    let (labelled, by_nll) = super::split_by_measure(stats);
    let (stats, x_title, tick): (Vec<&DepthByDifficulty>, String, fn(u8) -> String) =
        if labelled.is_empty() && !by_nll.is_empty() {
            let reference = match &by_nll[0].measure {
                super::DifficultyMeasure::ReferenceNll { reference, .. } => reference.clone(),
                super::DifficultyMeasure::Labels => String::new(),
            };
            (
                by_nll,
                format!("quintile of the token's NLL under {reference} (Q5 hardest)"),
                |l| format!("Q{}", u32::from(l) + 1),
            )
        } else {
            (
                labelled,
                "difficulty label (higher is harder)".to_string(),
                |l| l.to_string(),
            )
        };
    let legend: Vec<(String, Swatch)> = stats
        .iter()
        .map(|s| {
            (
                s.run.clone(),
                Swatch::Line {
                    colour: colours.colour(&s.run),
                    dash: colours.dash(&s.run),
                },
            )
        })
        .collect();
    let mut plot = Plot::new("Mean depth by token difficulty", legend.len());
    let mut labels: Vec<u8> = stats
        .iter()
        .flat_map(|s| s.by_label.iter().map(|l| l.difficulty))
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let top = stats
        .iter()
        .flat_map(|s| s.by_label.iter().map(|l| l.mean_depth))
        .fold(0.0, f64::max);
    let y = Axis::linear(
        0.0,
        if top > 0.0 { top * 1.05 } else { 1.0 },
        "mean recursion depth",
    );
    plot.y_axis(&y);
    if labels.is_empty() {
        plot.x_title(&x_title);
        plot.no_data("no difficulty labels and no reference NLL");
        plot.axis_lines();
        return plot.finish();
    }
    let band = (plot.x1 - plot.x0) / labels.len() as f64;
    let cx = |label: u8| {
        let i = labels.iter().position(|&l| l == label).unwrap_or(0);
        LEFT + (i as f64 + 0.5) * band
    };
    for &l in &labels {
        plot.x_tick(cx(l), &tick(l));
    }
    plot.x_title(&x_title);
    for s in stats {
        let colour = colours.colour(&s.run);
        let pts: Vec<String> = s
            .by_label
            .iter()
            .map(|l| format!("{:.1},{:.1}", cx(l.difficulty), plot.py(&y, l.mean_depth)))
            .collect();
        let _ = writeln!(
            plot.out,
            r#"<polyline class="curve" data-run="{}" points="{}" fill="none" stroke="{colour}" stroke-width="1.8"{}/>"#,
            escape_xml(&s.run),
            pts.join(" "),
            dash_attr(colours.dash(&s.run))
        );
        for l in &s.by_label {
            let _ = writeln!(
                plot.out,
                r##"<circle class="point" data-run="{}" cx="{:.1}" cy="{:.1}" r="4" fill="{colour}" stroke="#ffffff" stroke-width="1"><title>{}: difficulty {}, mean depth {:.2} ({} tokens)</title></circle>"##,
                escape_xml(&s.run),
                cx(l.difficulty),
                plot.py(&y, l.mean_depth),
                escape_xml(&s.run),
                tick(l.difficulty),
                l.mean_depth,
                l.count
            );
        }
    }
    plot.axis_lines();
    plot.legend(&legend);
    plot.finish()
}
