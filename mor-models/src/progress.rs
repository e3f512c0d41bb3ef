//! Progress display for training runs and ablations: indicatif bars on stderr when stderr is a
//! terminal, and plain log lines every `N` steps otherwise (or when asked to be quiet).
//!
//! Nothing here panics: a bad template falls back to indicatif's default style, and odd
//! inputs (step beyond the total, a `NaN` loss) are shown as they are.

use std::io::IsTerminal as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const RUN_TEMPLATE: &str =
    "{prefix:.bold} [{bar:28.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]";
const ABLATION_TEMPLATE: &str =
    "{prefix:.bold} [{bar:28.green/white}] {pos}/{len} runs {msg} [{elapsed_precise}]";

/// Whether bars can be drawn: stderr is a terminal and the caller did not ask for quiet.
fn bars_visible(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The default interval of plain log lines: about twenty lines per run.
pub fn default_log_every(total_steps: u64) -> u64 {
    (total_steps / 20).max(1)
}

/// Formats a throughput compactly: `950`, `2.1k`, `1.3M` (tokens per second).
pub fn format_rate(per_sec: f64) -> String {
    if !per_sec.is_finite() {
        return "?".to_string();
    }
    if per_sec >= 1e6 {
        format!("{:.1}M", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}")
    }
}

/// Formats a duration as `42s`, `5m12s` or `1h02m`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Locks a mutex, recovering the data if another thread panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a [`RunProgress`] remembers between updates.
#[derive(Debug)]
struct RunState {
    total: u64,
    first_step: Option<(u64, Instant)>,
    last: Option<(u64, f64, f64)>,
    finished: bool,
}

/// The progress of one training run: run label, step/total, loss, tokens per second and ETA.
///
/// On a terminal this is an indicatif bar on stderr. When stderr is not a terminal, or when
/// `quiet` is set (tests, CI), the bar is hidden and [`RunProgress::update`] writes a plain
/// line to stderr every [`RunProgress::with_log_every`] steps instead.
///
/// Like indicatif's bars, every method takes `&self`, so the display can be shared.
///
/// # Examples
///
/// ```
/// use mor_models::progress::RunProgress;
/// let p = RunProgress::new("[1/1] tiny", 4, true).with_log_every(2);
/// assert!(p.update(1, 3.2, 1500.0).is_none());
/// let line = p.update(2, 3.1, 1500.0).unwrap();
/// assert!(line.contains("step 2/4") && line.contains("loss 3.1000"));
/// p.finish("val NLL 3.05");
/// ```
#[derive(Debug)]
pub struct RunProgress {
    bar: ProgressBar,
    label: String,
    log_every: u64,
    plain: bool,
    started: Instant,
    state: Mutex<RunState>,
}

impl RunProgress {
    /// A progress display for a run of `total_steps` steps, labelled `run_label`
    /// (e.g. `"[3/9] mor_expert_nr3"`).
    pub fn new(run_label: impl Into<String>, total_steps: u64, quiet: bool) -> Self {
        Self::build(run_label.into(), total_steps, bars_visible(quiet), None)
    }

    fn build(label: String, total: u64, visible: bool, multi: Option<&MultiProgress>) -> Self {
        let bar = if visible {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let bar = match multi {
                Some(m) => m.add(bar),
                None => bar,
            };
            bar.set_style(style(RUN_TEMPLATE));
            bar.set_prefix(label.clone());
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            label,
            log_every: default_log_every(total),
            plain: !visible,
            started: Instant::now(),
            state: Mutex::new(RunState {
                total,
                first_step: None,
                last: None,
                finished: false,
            }),
        }
    }

    /// Sets how often plain log lines are written when the bar is hidden: every `every` steps
    /// (and at the last step); 0 turns them off.
    pub fn with_log_every(mut self, every: u64) -> Self {
        self.log_every = every;
        self
    }

    /// Whether the bar is hidden (plain log lines are used instead).
    pub fn is_hidden(&self) -> bool {
        self.plain
    }

    /// The run label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Records that `step` (1-based, out of the total) finished with `loss` at
    /// `tokens_per_sec`.
    ///
    /// Returns the plain log line written to stderr, if one was due (only when the bar is
    /// hidden).
    pub fn update(&self, step: u64, loss: f64, tokens_per_sec: f64) -> Option<String> {
        let now = Instant::now();
        let mut st = lock(&self.state);
        if st.first_step.is_none() {
            st.first_step = Some((step, now));
        }
        st.last = Some((step, loss, tokens_per_sec));
        if !self.plain {
            if step > st.total {
                st.total = step;
                self.bar.set_length(step);
            }
            self.bar.set_position(step);
            self.bar.set_message(format!(
                "loss {loss:.4} | {} tok/s",
                format_rate(tokens_per_sec)
            ));
            return None;
        }
        let due = self.log_every > 0 && (step.is_multiple_of(self.log_every) || step == st.total);
        if !due {
            return None;
        }
        let line = self.line(&st, step, loss, tokens_per_sec, now);
        drop(st);
        eprintln!("{line}");
        Some(line)
    }

    /// The plain log line for a step.
    fn line(
        &self,
        st: &RunState,
        step: u64,
        loss: f64,
        tokens_per_sec: f64,
        now: Instant,
    ) -> String {
        let total = st.total;
        let pct = if total > 0 {
            100.0 * step as f64 / total as f64
        } else {
            100.0
        };
        let mut line = format!(
            "{} step {step}/{total} ({pct:.1}%) loss {loss:.4} {} tok/s",
            self.label,
            format_rate(tokens_per_sec)
        );
        if let Some((s0, t0)) = st.first_step {
            let done = step.saturating_sub(s0);
            let left = total.saturating_sub(step);
            if done > 0 && left > 0 {
                let per_step = now.duration_since(t0).as_secs_f64() / done as f64;
                let eta =
                    Duration::try_from_secs_f64(per_step * left as f64).unwrap_or(Duration::MAX);
                line.push_str(&format!(" ETA {}", format_duration(eta)));
            }
        }
        line
    }

    /// Prints a message above the bar (or as a plain line when the bar is hidden).
    pub fn println(&self, msg: impl AsRef<str>) {
        if self.plain {
            eprintln!("{}", msg.as_ref());
        } else {
            self.bar.println(msg.as_ref());
        }
    }

    /// Ends the run with a closing message (e.g. the final validation NLL) and returns the
    /// closing line. Calling it again does nothing and returns `None`.
    pub fn finish(&self, msg: &str) -> Option<String> {
        let mut st = lock(&self.state);
        if st.finished {
            return None;
        }
        st.finished = true;
        let elapsed = format_duration(self.started.elapsed());
        let line = match st.last {
            Some((step, loss, _)) => {
                format!(
                    "{} done at step {step}/{}: loss {loss:.4}, {msg} ({elapsed})",
                    self.label, st.total
                )
            }
            None => format!("{} done: {msg} ({elapsed})", self.label),
        };
        drop(st);
        if self.plain {
            eprintln!("{line}");
        } else {
            self.bar.finish_with_message(format!("{msg} ({elapsed})"));
        }
        Some(line)
    }
}

/// Run counts of an [`AblationProgress`].
#[derive(Debug, Default)]
struct AblationState {
    done: usize,
    failed: usize,
}

/// The outer loop of an ablation: runs done out of the total, with one [`RunProgress`] per
/// run drawn below it.
///
/// # Examples
///
/// ```
/// use mor_models::progress::AblationProgress;
/// let a = AblationProgress::new(2, true);
/// let run = a.start_run("vanilla", 10);
/// assert_eq!(run.label(), "[1/2] vanilla");
/// run.finish("ok");
/// a.finish_run("vanilla", true);
/// assert_eq!(a.start_run("mor", 10).label(), "[2/2] mor");
/// ```
#[derive(Debug)]
pub struct AblationProgress {
    multi: Option<MultiProgress>,
    outer: ProgressBar,
    total: usize,
    started: Instant,
    state: Mutex<AblationState>,
}

impl AblationProgress {
    /// A display for an ablation of `total_runs` runs.
    pub fn new(total_runs: usize, quiet: bool) -> Self {
        let (multi, outer) = if bars_visible(quiet) {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let outer = multi.add(ProgressBar::new(total_runs as u64));
            outer.set_style(style(ABLATION_TEMPLATE));
            outer.set_prefix("ablation");
            (Some(multi), outer)
        } else {
            (None, ProgressBar::hidden())
        };
        Self {
            multi,
            outer,
            total: total_runs,
            started: Instant::now(),
            state: Mutex::default(),
        }
    }

    /// The label of the next run: `"[k/n] name"`, where `k` counts the runs finished so far
    /// plus one.
    pub fn run_label(&self, name: &str) -> String {
        format!("[{}/{}] {name}", self.done() + 1, self.total)
    }

    /// Starts the progress display of the next run.
    pub fn start_run(&self, name: &str, total_steps: u64) -> RunProgress {
        let label = self.run_label(name);
        RunProgress::build(
            label,
            total_steps,
            self.multi.is_some(),
            self.multi.as_ref(),
        )
    }

    /// Records that a run ended (`ok` false for a failure) and returns the summary line.
    pub fn finish_run(&self, name: &str, ok: bool) -> String {
        let (done, failed) = {
            let mut st = lock(&self.state);
            st.done += 1;
            if !ok {
                st.failed += 1;
            }
            (st.done, st.failed)
        };
        let line = format!(
            "ablation: {done}/{} runs done ({failed} failed); last: {name} {}",
            self.total,
            if ok { "ok" } else { "FAILED" }
        );
        if self.multi.is_some() {
            self.outer.set_position(done as u64);
            self.outer.set_message(format!("({failed} failed)"));
        } else {
            eprintln!("{line}");
        }
        line
    }

    /// Runs finished so far (including failures).
    pub fn done(&self) -> usize {
        lock(&self.state).done
    }

    /// Runs that failed so far.
    pub fn failed(&self) -> usize {
        lock(&self.state).failed
    }

    /// Ends the display and returns the closing line.
    pub fn finish(&self) -> String {
        let (done, failed) = (self.done(), self.failed());
        let line = format!(
            "ablation finished: {done}/{} runs, {failed} failed ({})",
            self.total,
            format_duration(self.started.elapsed())
        );
        if self.multi.is_some() {
            self.outer.finish_with_message(format!("({failed} failed)"));
        } else {
            eprintln!("{line}");
        }
        line
    }
}
