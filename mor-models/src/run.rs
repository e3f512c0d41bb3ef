//! One run end to end: data → model → training → evaluation → summary, in a run folder.
//!
//! A run folder holds `config.toml` (the resolved config), `config.json`, `tokenizer.json`,
//! `data.json` (the data it trains on, [`crate::provenance`]), `metrics.jsonl` (one line
//! per optimiser step), `checkpoints/`, `model.safetensors` (final weights), `eval.json`,
//! `traces.json` (depth traces of sample validation sequences), `token_scores.bin` (each
//! validation token's NLL and depth, [`crate::eval::save_token_scores`]),
//! `summary.json` (a run with a `summary.json` whose status is `done` is finished) and
//! `manifest.json` (size and hash of every other file, [`crate::checkpoint::verify_files`]).
//! While a process works on it the folder holds `run.lock` ([`crate::runlock`]).

use crate::data::{DataConfig, Dataset, TrainBatches};
use crate::model::MorModel;
use crate::provenance::{with_source, DataRecord, DATA_FILE};
use crate::report::{Curve, CurvePoint, DepthTrace, RunSummary};
use crate::runlock::{RunLock, LOCK_FILE};
use crate::train::{self, SpikeAction, StepLog, TokenBatch, TrainData, TrainSettings};
use crate::{Error, Result};
use mor_core::config::ResolvedConfig;
use std::path::{Path, PathBuf};

mod backend;
mod evaluate;
use backend::is_backend_difference;
pub use backend::{
    check_backend, read_run_config, read_segments, with_backend, BackendSwitch, RunConfig, Segment,
    SEGMENTS_FILE,
};
pub use evaluate::{
    evaluate, evaluate_all, DepthNll, EvalResults, Evaluation, DEPTH_SWEEP_TOKENS, TRACE_SEQUENCES,
};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run folder.
    pub out: PathBuf,
    /// Data path overriding the config's `data.source`.
    pub data: Option<PathBuf>,
    /// Continue from the latest checkpoint.
    pub resume: bool,
    /// No progress bars.
    pub quiet: bool,
    /// Label of the progress bar.
    pub label: String,
    /// Stop after this many optimiser steps of this invocation (tests of resume).
    pub stop_after: Option<usize>,
    /// Skip evaluation.
    pub skip_eval: bool,
}

/// Runs candle's element-wise CPU ops on the calling thread (`CANDLE_NUM_THREADS=1`),
/// unless that variable is already set. Takes effect only before the process's first
/// element-wise tensor op; [`set_threads`] calls it.
///
/// candle 0.11 gives element-wise ops a pool of its own, whose workers spin after each op,
/// beside rayon's pool (which runs the matmuls and mor's fused kernels). On 2 cores a
/// spinning worker takes a core away from the next matmul: on the d = 256, 4-layer training
/// step of `mor-bench` this setting took the median from 2.27k to 2.59k tokens/s (6 runs
/// each, interleaved).
pub fn prefer_rayon_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Applies the thread count of the run (0 = leave the default). A count above the
/// machine's parallelism (a run trained on a larger machine) is lowered to it, with a notice
/// on stderr; a new run refuses it instead ([`mor_core::config::check_threads`]).
pub fn set_threads(n: usize) {
    prefer_rayon_threads();
    let cores = mor_core::config::available_cores();
    let n = if n > cores {
        eprintln!(
            "note: runtime.threads = {n} but this machine runs {cores} threads in parallel; using {cores}"
        );
        cores
    } else {
        n
    };
    if n > 0 {
        // candle reads RAYON_NUM_THREADS on every matmul; rayon's pool is built once.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// The data settings of a run.
pub fn data_config(cfg: &ResolvedConfig, data_override: Option<&Path>) -> DataConfig {
    use mor_core::config::{DataSource, TokenizerSpec};
    let d = &cfg.data;
    let source = match (data_override, &d.source) {
        (Some(p), _) => p.display().to_string(),
        (None, DataSource::Builtin) => "builtin".into(),
        (None, DataSource::Path(p)) => p.display().to_string(),
    };
    let tokenizer = match &d.tokenizer {
        TokenizerSpec::Auto => "auto".to_string(),
        TokenizerSpec::Byte => "byte".to_string(),
        TokenizerSpec::Bpe => "bpe".to_string(),
        TokenizerSpec::Path(p) => p.display().to_string(),
    };
    DataConfig {
        source,
        tokenizer,
        text_column: d.text_column.clone(),
        doc_masking: d.doc_masking,
        shuffle: d.shuffle,
        val_fraction: d.val_fraction,
        builtin_docs: d.builtin_docs,
        seq_len: cfg.model.seq_len,
        vocab_size: cfg.model.vocab_size,
        seed: cfg.seed,
    }
}

/// The training-loop settings of a config.
pub fn train_settings(cfg: &ResolvedConfig, opts: &RunOptions) -> TrainSettings {
    use crate::optim::{AdamWConfig, Schedule};
    use mor_core::config::Schedule as S;
    let t = &cfg.train;
    let steps = t.steps as usize;
    let warmup = t.warmup_steps as usize;
    let schedule = match t.schedule {
        S::Trapezoid => Schedule::Trapezoid {
            warmup,
            decay: t.decay_steps() as usize,
            total: steps,
        },
        S::Cosine => Schedule::Cosine {
            warmup,
            total: steps,
            min_ratio: t.min_lr_ratio,
        },
        S::Constant => Schedule::Constant { warmup },
    };
    TrainSettings {
        steps,
        batch_seqs: t.batch_seqs,
        micro_batch_seqs: t.micro_batch_seqs,
        adamw: AdamWConfig {
            lr: t.lr,
            betas: (t.betas[0], t.betas[1]),
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
        grad_clip: t.grad_clip,
        schedule,
        log_every: t.log_every as usize,
        checkpoint_every: t.checkpoint_every as usize,
        keep_checkpoints: 2,
        spike_zscore: t.spike_zscore,
        spike_window: t.spike_window,
        spike_action: match t.spike_action {
            mor_core::config::SpikeAction::Skip => SpikeAction::Skip,
            mor_core::config::SpikeAction::Stop => SpikeAction::Stop,
            mor_core::config::SpikeAction::Off => SpikeAction::Off,
        },
        seed: cfg.seed,
        quiet: opts.quiet,
        label: if opts.label.is_empty() {
            "train".into()
        } else {
            opts.label.clone()
        },
        stop_after: opts.stop_after,
    }
}

struct DataAdapter {
    it: TrainBatches,
}

impl TrainData for DataAdapter {
    fn next_batch(&mut self, rows: usize) -> Result<TokenBatch> {
        let b = self.it.next_batch(rows)?;
        Ok(TokenBatch {
            inputs: b.inputs,
            targets: b.targets,
            b: b.b,
            t: b.t,
        })
    }
    fn cursor(&self) -> serde_json::Value {
        serde_json::to_value(self.it.cursor()).unwrap_or(serde_json::Value::Null)
    }
    fn restore(&mut self, cursor: &serde_json::Value) -> Result<()> {
        let c = serde_json::from_value(cursor.clone()).map_err(|e| {
            Error::msg(format!("the checkpoint's data position is unreadable: {e}"))
        })?;
        Ok(self.it.restore(c)?)
    }
}

/// Everything a finished run reports.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The summary row.
    pub summary: RunSummary,
    /// Loss curve.
    pub curve: Curve,
    /// Depth traces of the sample validation sequences (MoR only): per sequence one per
    /// routing rule, or one when both rules agree.
    pub traces: Vec<DepthTrace>,
    /// The run was already finished (with the same config and data): nothing was trained
    /// or written, the outcome is read from the folder.
    pub already_finished: bool,
}

/// What a run folder holds.
#[derive(Debug, Clone)]
pub enum Existing {
    /// No run yet (no `config.toml`).
    New,
    /// A run that started and has not finished.
    Partial,
    /// A finished run (`summary.json` with status `done`).
    Finished(Box<RunSummary>),
}

/// A run folder checked against a config and data, without writing anything.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// What the folder holds.
    pub existing: Existing,
    /// Resolved config keys whose values differ between the folder's `config.toml` and the
    /// new config, as `key: old -> new` (`data.source` is compared through the data record).
    pub config_diffs: Vec<String>,
    /// How the data differs from the one the run was trained on, when it does.
    pub data_problem: Option<String>,
    /// The data this invocation uses.
    pub data: DataRecord,
    /// Its settings.
    pub data_config: DataConfig,
    /// The backend the folder's run was started on (its saved config's `backend`), when it
    /// holds one.
    pub recorded_backend: Option<mor_core::config::PluginSpec>,
    /// The backend of the config given (`backend.kind`).
    pub given_backend: String,
}

impl Inspection {
    /// Whether the folder holds no run, or one with the same resolved config and data.
    pub fn is_compatible(&self) -> bool {
        self.config_diffs.is_empty() && self.data_problem.is_none()
    }

    /// Whether the configs differ, and only in their backend (`backend.kind` or the
    /// backend's parameters): the run can continue on the given backend when that is asked
    /// for explicitly ([`BackendSwitch::Allow`]).
    pub fn backend_only(&self) -> bool {
        !self.config_diffs.is_empty() && self.config_diffs.iter().all(|d| is_backend_difference(d))
    }

    /// Whether the folder holds no run, or one with the same data and the same resolved
    /// config up to its backend when `switch` allows another backend.
    pub fn is_compatible_with(&self, switch: BackendSwitch) -> bool {
        match switch {
            BackendSwitch::Refuse => self.is_compatible(),
            BackendSwitch::Allow => {
                self.data_problem.is_none() && (self.config_diffs.is_empty() || self.backend_only())
            }
        }
    }

    /// The differences, one per line (empty when compatible). When only the backend
    /// differs, the last line says how to continue on the given backend.
    pub fn problems(&self) -> String {
        let mut lines: Vec<String> = self
            .config_diffs
            .iter()
            .map(|d| format!("config {d}"))
            .collect();
        if self.backend_only() {
            lines.push(backend_hint(&self.given_backend));
        }
        lines.extend(self.data_problem.iter().cloned());
        lines.join("\n")
    }
}

/// The hint of a refused resume whose config differs only in its backend, `kind` given.
fn backend_hint(kind: &str) -> String {
    format!(
        "only the backend differs: pass --backend {kind} to take this run to `{kind}` (an unfinished run continues there from its latest checkpoint, not bit-identical to an uninterrupted run, recorded in {SEGMENTS_FILE}; a finished one is only reported)"
    )
}

/// Resolved config keys whose values differ, as `key: old -> new`; the source TOML and
/// `data.source` are left out.
pub fn config_differences(old: &ResolvedConfig, new: &ResolvedConfig) -> Vec<String> {
    let old = serde_json::to_value(old).unwrap_or_default();
    json_differences(&[&old], &serde_json::to_value(new).unwrap_or_default())
}

/// As [`config_differences`], on resolved configs as JSON values. The old value of a key is
/// taken from the first of `olds` that has it: a run's saved `config.json` (the config as it
/// was resolved when the run started, so a changed default is seen), then its `config.toml`
/// resolved today (for keys that a newer version added).
pub fn json_differences(olds: &[&serde_json::Value], new: &serde_json::Value) -> Vec<String> {
    fn flatten(
        prefix: &str,
        v: &serde_json::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, x, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let flat = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("source");
            if let Some(d) = m.get_mut("data").and_then(|d| d.as_object_mut()) {
                d.remove("source");
            }
        }
        let mut out = std::collections::BTreeMap::new();
        flatten("", &v, &mut out);
        out
    };
    let mut a = std::collections::BTreeMap::new();
    for o in olds.iter().rev() {
        a.extend(flat(o));
    }
    let b = flat(new);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = "(absent)".to_string();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} -> {}",
                a.get(k).unwrap_or(&absent),
                b.get(k).unwrap_or(&absent)
            )
        })
        .collect()
}

/// Checks `opts.out` against `cfg` and the data without writing anything: what the folder
/// holds, whether its config and data equal the new ones, and which data this invocation
/// uses. The data of a run that records it (`data.json`) is that record's source unless
/// `opts.data` (or a path in `cfg`'s `data.source`) names one, which must then hold the
/// same contents.
///
/// # Errors
/// When `opts.out` is a non-empty folder without a run, its `config.toml` is unreadable or
/// corrupt, or the data cannot be read.
pub fn inspect(cfg: &ResolvedConfig, opts: &RunOptions) -> Result<Inspection> {
    use mor_core::config::{Config, DataSource};
    let out = &opts.out;
    if out.exists() && !out.is_dir() {
        return Err(Error::msg(format!(
            "--out {} is a file, not a run folder",
            out.display()
        )));
    }
    let cfg_path = out.join("config.toml");
    let has_run = cfg_path.is_file();
    if !has_run && out.is_dir() {
        let mut others: Vec<String> = std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n != LOCK_FILE && !crate::checkpoint::is_leftover_name(n))
            .collect();
        others.sort();
        if !others.is_empty() {
            return Err(Error::msg(format!(
                "{} is not empty and holds no run (no config.toml; it has {}); choose a new or empty --out",
                out.display(),
                others
                    .iter()
                    .take(3)
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut config_diffs = Vec::new();
    let mut existing = Existing::New;
    let mut recorded = None;
    let mut recorded_backend = None;
    if has_run {
        crate::checkpoint::verify_files(out, &["config.toml"], false)?;
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let old = Config::from_toml_str(&text)
            .map_err(|e| Error::msg(format!("{}: {e}", cfg_path.display())))?;
        let old = serde_json::to_value(&old).unwrap_or_default();
        let json_path = out.join("config.json");
        let saved: Option<serde_json::Value> = if json_path.is_file() {
            crate::checkpoint::verify_files(out, &["config.json"], false)?;
            let raw = std::fs::read(&json_path).map_err(|e| Error::io(&json_path, e))?;
            Some(
                serde_json::from_slice(&raw)
                    .map_err(|e| Error::msg(format!("{}: corrupt: {e}", json_path.display())))?,
            )
        } else {
            None
        };
        let olds: Vec<&serde_json::Value> = saved.iter().chain([&old]).collect();
        recorded_backend = olds
            .iter()
            .find_map(|v| serde_json::from_value(v.get("backend")?.clone()).ok());
        config_diffs = json_differences(&olds, &serde_json::to_value(cfg).unwrap_or_default());
        existing = match finished_summary(out) {
            Some(s) => Existing::Finished(Box::new(s)),
            None => Existing::Partial,
        };
        if out.join(DATA_FILE).exists() {
            crate::checkpoint::verify_files(out, &[DATA_FILE], false)?;
        }
        recorded = DataRecord::read(out)?;
    }
    let base = data_config(cfg, None);
    // The data named explicitly: `--data`, else a path in the config's `data.source`.
    let named: Option<String> = match (&opts.data, &cfg.data.source) {
        (Some(d), _) => Some(d.display().to_string()),
        (None, DataSource::Path(p)) => Some(p.display().to_string()),
        (None, DataSource::Builtin) => None,
    };
    let (dcfg, from_record) = match (&named, &recorded) {
        (Some(n), _) => (with_source(&base, n), false),
        (None, Some(r)) => (with_source(&base, &r.source), true),
        (None, None) => (base, false),
    };
    let data = DataRecord::of(&dcfg).map_err(|e| match (&recorded, from_record) {
        (Some(r), true) => Error::msg(format!(
            "the data this run was trained on, {}, cannot be read: {e}; restore it, or pass --data with a copy of it",
            r.source
        )),
        _ => e,
    })?;
    let data_problem = match &recorded {
        Some(r) if !r.same_data(&data) => Some(format!(
            "data differs from the data this run was trained on:\n  recorded: {}\n  now:      {}",
            r.describe(),
            data.describe()
        )),
        Some(_) => None,
        // A finished run that does not record its data cannot be shown to match any data:
        // its results are never reused as the results of this data.
        None if matches!(existing, Existing::Finished(_)) => Some(format!(
            "{} does not record the data it was trained on (no {DATA_FILE}: written by an older version), so its results cannot be matched to this data",
            out.display()
        )),
        // An unfinished one continues on the data named (`--data`, a path in the config, or
        // the built-in corpus its config describes), which is then recorded.
        None => None,
    };
    Ok(Inspection {
        existing,
        config_diffs,
        data_problem,
        data,
        data_config: dcfg,
        recorded_backend,
        given_backend: cfg.backend.kind.clone(),
    })
}

/// Prepares the data of an existing run folder `dir` without writing into it: the saved
/// `tokenizer.json` is used from a copy, and the tokenizer `dcfg` resolves to must be that
/// same tokenizer (byte for byte), else the run is refused.
pub fn prepare_existing(dir: &Path, dcfg: &DataConfig) -> Result<Dataset> {
    let tok = dir.join(crate::tokenizer::TOKENIZER_FILE);
    let stage = std::env::temp_dir().join(format!(
        "mor-stage-{}-{}",
        std::process::id(),
        STAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(|e| Error::io(&stage, e))?;
    let staged = stage.join(crate::tokenizer::TOKENIZER_FILE);
    let result = (|| {
        if tok.exists() {
            std::fs::copy(&tok, &staged).map_err(|e| Error::io(&tok, e))?;
        }
        let ds = Dataset::prepare(dcfg, Some(&stage))?;
        if tok.exists() {
            let a = std::fs::read(&tok).map_err(|e| Error::io(&tok, e))?;
            let b = std::fs::read(&staged).map_err(|e| Error::io(&staged, e))?;
            if a != b {
                return Err(Error::msg(format!(
                    "data.tokenizer = {:?} gives another tokenizer than the run's {}; use the run's settings",
                    dcfg.tokenizer,
                    tok.display()
                )));
            }
        }
        Ok(ds)
    })();
    let _ = std::fs::remove_dir_all(&stage);
    result
}

static STAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Files a new run writes before training; removed again when the run fails before its
/// first optimiser step.
const SETUP_FILES: [&str; 5] = [
    "config.toml",
    "config.json",
    DATA_FILE,
    crate::tokenizer::TOKENIZER_FILE,
    crate::checkpoint::MANIFEST_FILE,
];

/// Trains and evaluates `cfg` in `opts.out`.
///
/// Holds the folder's lock ([`RunLock`]) throughout. Everything is checked before anything
/// is written ([`inspect`]): a folder holding a run with another resolved config or other
/// data is refused with the differences; an unfinished run needs `opts.resume`; a finished
/// one is never changed (with `opts.resume` its outcome is returned as it is). A command that
/// fails before training leaves no new files in `opts.out` (nor the folder, if it created
/// it).
///
/// The backend is part of the config: a run started on another backend is refused, naming
/// `--backend`; [`run_with`] continues it on `cfg`'s backend when asked explicitly.
pub fn run(cfg: &ResolvedConfig, name: &str, opts: &RunOptions) -> Result<RunOutcome> {
    run_with(cfg, name, opts, BackendSwitch::Refuse)
}

/// As [`run`]; with [`BackendSwitch::Allow`], a run in `opts.out` whose config differs from
/// `cfg` only in its backend (`backend.kind`, or the backend's parameters such as a device
/// ordinal) is accepted: an unfinished one continues on `cfg`'s backend from its latest
/// checkpoint (weights and optimiser moments move to the new device) with a notice that the
/// continuation is not bit-identical to an uninterrupted run, and [`SEGMENTS_FILE`] records
/// the backend of each segment; a finished one is only reported (with `opts.resume`), never
/// changed. Any other difference is refused as [`run`] refuses it.
pub fn run_with(
    cfg: &ResolvedConfig,
    name: &str,
    opts: &RunOptions,
    switch: BackendSwitch,
) -> Result<RunOutcome> {
    let out = &opts.out;
    if cfg.data.doc_masking {
        return Err(Error::msg(
            "data.doc_masking = true is not supported by the model's attention yet; set it to false",
        ));
    }
    // Refuse a model that cannot fit before anything is written (the estimate counts
    // parameters, gradients, AdamW moments and one micro-batch's activations).
    if let Some(avail) = mor_core::accounting::available_memory() {
        mor_core::accounting::check_fits(cfg, avail).map_err(Error::msg)?;
    }
    let lock = RunLock::acquire(out)?;
    let created = lock.created().to_vec();
    let mut setup = Setup::default();
    let result = run_locked(cfg, name, opts, switch, &mut setup);
    if result.is_err() && !setup.training_started {
        for f in &setup.written {
            let _ = std::fs::remove_file(out.join(f));
        }
    }
    drop(lock);
    if result.is_err() {
        // The folders this command created (`--out` and missing parents), when empty.
        crate::runlock::remove_empty(&created);
    }
    result
}

#[derive(Default)]
struct Setup {
    written: Vec<&'static str>,
    training_started: bool,
}

fn run_locked(
    cfg: &ResolvedConfig,
    name: &str,
    opts: &RunOptions,
    switch: BackendSwitch,
    setup: &mut Setup,
) -> Result<RunOutcome> {
    let out = &opts.out;
    let insp = inspect(cfg, opts)?;
    if matches!(insp.existing, Existing::New) {
        mor_core::config::check_threads(cfg.threads)?;
    }
    let switching = insp.backend_only() && switch == BackendSwitch::Allow;
    if !insp.config_diffs.is_empty() && !switching {
        let hint = if insp.backend_only() {
            format!("\n{}", backend_hint(&cfg.backend.kind))
        } else {
            String::new()
        };
        return Err(Error::msg(format!(
            "{} holds a run with another config; nothing was changed. Differing keys (run's -> given):\n  {}\nUse the run's own config (its config.toml), or choose another --out{hint}",
            out.display(),
            insp.config_diffs.join("\n  ")
        )));
    }
    if let Some(p) = &insp.data_problem {
        return Err(Error::msg(format!(
            "{}: {p}\nnothing was changed",
            out.display()
        )));
    }
    let resuming = match &insp.existing {
        Existing::Finished(s) => {
            if !opts.resume {
                return Err(Error::msg(format!(
                    "{} holds a finished run ({} steps); it is kept as it is: choose another --out (with --resume it is only reported)",
                    out.display(),
                    s.steps
                )));
            }
            let curve = read_curve(name, &out.join("metrics.jsonl")).unwrap_or(Curve {
                run: name.to_string(),
                points: Vec::new(),
            });
            let traces = read_traces(out);
            return Ok(RunOutcome {
                summary: (**s).clone(),
                curve,
                traces,
                already_finished: true,
            });
        }
        Existing::Partial if !opts.resume => {
            return Err(Error::msg(format!(
                "{} holds an unfinished run; pass --resume to continue it or choose another --out",
                out.display()
            )));
        }
        Existing::Partial => true,
        Existing::New => false,
    };
    // The backend the run last trained on: its last segment's, else (a run started by an
    // older version, which records no segments) its config's.
    let last_backend: Option<String> = if resuming {
        read_segments(out)?
            .last()
            .map(|s| s.backend.kind.clone())
            .or_else(|| insp.recorded_backend.as_ref().map(|b| b.kind.clone()))
    } else {
        None
    };
    // A run moved to another backend with `--backend` stays there until asked again, even
    // when the config given is its own.
    if let Some(last) = last_backend.as_deref() {
        let kind = &cfg.backend.kind;
        if last != kind && switch == BackendSwitch::Refuse {
            return Err(Error::msg(format!(
                "{} last trained on backend `{last}` (recorded in {SEGMENTS_FILE}), the config given names `{kind}`; nothing was changed.\npass --backend {kind} to continue it on `{kind}` from its latest checkpoint (not bit-identical to an uninterrupted run), or --backend {last} to continue it on `{last}`",
                out.display()
            )));
        }
    }
    // The task files of the final evaluation are read now, so a bad one is refused before
    // any training rather than after it.
    if !opts.skip_eval {
        for p in &cfg.eval.tasks {
            crate::data::tasks::load_mc_tasks(p)?;
        }
    }
    if resuming {
        crate::checkpoint::remove_leftovers(out)?;
        crate::checkpoint::verify_files(out, &[crate::tokenizer::TOKENIZER_FILE], false)?;
    }
    set_threads(cfg.threads);
    // The saved config names the data actually used (a `--data` override included).
    let cfg = &if insp.data.source != "builtin" && !resuming {
        let mut table = cfg.source.clone();
        mor_core::config::apply_override(
            &mut table,
            "data.source",
            toml::Value::String(insp.data.source.clone()),
        )?;
        mor_core::config::Config::from_table(table)?
    } else {
        cfg.clone()
    };
    let model = MorModel::new(cfg).map_err(|e| {
        // An unfinished run whose backend is unavailable here can move to another one.
        if resuming && cfg.backend.kind != "cpu" && backend::unbuildable(cfg) {
            Error::msg(format!(
                "{e}\nthe run can continue on another backend from its latest checkpoint: pass --backend cpu (not bit-identical to an uninterrupted run; docs/runs-across-devices.md)"
            ))
        } else {
            e
        }
    })?;
    // `[init]` (uptraining, spec §2): the blocks start from a pretrained model's layers,
    // routers fresh. A resumed run takes its weights from its checkpoint instead.
    if !resuming {
        if let Some(r) = crate::hf::apply_init(&model)? {
            if !opts.quiet {
                eprintln!(
                    "{name}: initialised by `{}` from {} ({} pretrained layers): blocks <- {:?}",
                    r.method.as_str(),
                    cfg.init
                        .as_ref()
                        .map(|i| i.from.display().to_string())
                        .unwrap_or_default(),
                    r.pretrained_layers,
                    r.sources
                );
            }
        }
    }
    let acct = mor_core::accounting::report(cfg)?;
    let settings = train_settings(cfg, opts);
    let ds = if resuming {
        prepare_existing(out, &insp.data_config)?
    } else {
        Dataset::prepare(&insp.data_config, None)?
    };
    let it = ds.train_batches(settings.micro_batch_seqs, None)?;
    let corpus = ds.corpus_stats();
    if !opts.quiet {
        eprintln!("{name}: {corpus}");
    }
    if !resuming {
        setup.written.extend(SETUP_FILES);
        use crate::checkpoint::write_atomic;
        write_atomic(&out.join("config.toml"), cfg.to_toml_string().as_bytes())?;
        write_atomic(
            &out.join("config.json"),
            cfg.to_json().unwrap_or_default().as_bytes(),
        )?;
        insp.data.write(out)?;
        ds.tokenizer().save(out)?;
        crate::checkpoint::record_files(
            out,
            &[
                "config.toml",
                "config.json",
                DATA_FILE,
                crate::tokenizer::TOKENIZER_FILE,
            ],
        )?;
    }
    if resuming {
        // A run started by an older version: record what it lacks (its data, its resolved
        // config, the hashes of its setup files), so later commands can check them.
        use crate::checkpoint::write_atomic;
        if !out.join(DATA_FILE).exists() {
            insp.data.write(out)?;
        }
        if !out.join("config.json").exists() {
            // From the run's own config.toml (checked by `inspect`), not from `cfg`, which
            // may name another backend (`--backend`).
            let p = out.join("config.toml");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            let own = mor_core::config::Config::from_toml_str(&text)
                .map_err(|e| Error::msg(format!("{}: {e}", p.display())))?;
            write_atomic(
                &out.join("config.json"),
                own.to_json().unwrap_or_default().as_bytes(),
            )?;
        }
        let manifest = crate::checkpoint::read_manifest(out)?.unwrap_or_default();
        let missing: Vec<&str> = [
            "config.toml",
            "config.json",
            DATA_FILE,
            crate::tokenizer::TOKENIZER_FILE,
        ]
        .into_iter()
        .filter(|n| !manifest.files.contains_key(*n) && out.join(n).exists())
        .collect();
        if !missing.is_empty() {
            crate::checkpoint::record_files(out, &missing)?;
        }
    }
    let mut adapter = DataAdapter { it };
    let started_on = insp.recorded_backend.clone().unwrap_or(cfg.backend.clone());
    // Called by the trainer once the checkpoint it resumes from has loaded (`from_step` is
    // that checkpoint's step), so the segment names the step training really continues
    // from, and nothing is recorded when the trainer refuses before any work.
    let mut on_start = |from_step: usize| -> Result<()> {
        if from_step > 0 && last_backend.as_deref() != Some(cfg.backend.kind.as_str()) {
            eprintln!(
                "note: {name}: continuing from step {from_step} on backend `{}` (it ran on `{}` before; recorded in {SEGMENTS_FILE}); the continuation is not bit-identical to an uninterrupted run",
                cfg.backend.kind,
                last_backend.as_deref().unwrap_or("another backend")
            );
        }
        setup.training_started = true;
        backend::record_segment(
            out,
            Segment {
                from_step,
                backend: cfg.backend.clone(),
            },
            &started_on,
        )
    };
    let summary = train::train_observed(
        &model,
        &mut adapter,
        &settings,
        out,
        opts.resume,
        acct.flops_per_token,
        model.config().train.update_path.into(),
        &mut on_start,
    )?;
    let curve = read_curve(name, &out.join("metrics.jsonl"))?;
    if !summary.finished {
        return Err(Error::msg(format!(
            "stopped after step {} of {}",
            summary.steps, settings.steps
        )));
    }
    if resuming {
        // The run keeps the config.json it started with (or, for a run of an older version,
        // the one written above from its config.toml): a run continued on another backend
        // is still the run of its own config.
        crate::checkpoint::save_run_weights(out, &model)?;
    } else {
        crate::checkpoint::save_run_model(
            out,
            &model,
            &serde_json::to_value(cfg).unwrap_or_default(),
        )?;
    }

    let evaluated = !opts.skip_eval;
    let (ev, traces, scores) = if evaluated {
        let e = evaluate_all(&model, &ds, cfg, name, &[])?;
        (e.results, e.traces, Some(e.scores))
    } else {
        (EvalResults::default(), Vec::new(), None)
    };
    if evaluated && !opts.quiet {
        eprintln!("{name}: {}", ev.coverage());
    }
    crate::checkpoint::write_atomic(
        &out.join("eval.json"),
        serde_json::to_string_pretty(&ev)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut recorded = vec!["metrics.jsonl", "eval.json", "summary.json"];
    if let Some(s) = &scores {
        crate::eval::save_token_scores(out, s)?;
        crate::checkpoint::write_atomic(
            &out.join(TRACES_FILE),
            serde_json::to_string(&traces)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        recorded.extend([crate::eval::TOKEN_SCORES_FILE, TRACES_FILE]);
    }

    let full = ev.full_sequence.clone().unwrap_or_default();
    let stats = ev
        .causal
        .as_ref()
        .and_then(|c| c.router_stats.clone())
        .or_else(|| full.router_stats.clone());
    let full_stats = full.router_stats.clone();
    let m = &cfg.model;
    let model_kind = match (&cfg.router, cfg.plan.num_recursions) {
        (Some(_), _) => "mor",
        (None, 1) => "vanilla",
        (None, _) => "recursive",
    };
    let tokens_per_depth = match &full_stats {
        Some(s) => s.tokens_per_depth.clone(),
        None => {
            let mut v = vec![0u64; cfg.plan.num_recursions.max(1)];
            if let Some(last) = v.last_mut() {
                *last = full.tokens;
            }
            v
        }
    };
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(
        "skipped_steps".into(),
        serde_json::json!(summary.skipped_steps),
    );
    extra.insert(
        "final_train_loss".into(),
        serde_json::json!(summary.final_loss),
    );
    extra.insert("threads".into(), serde_json::json!(cfg.threads));
    // A run that changed backend lists the backend of each segment, in order.
    let mut backends: Vec<String> = read_segments(out)?
        .iter()
        .map(|s| s.backend.kind.clone())
        .collect();
    backends.dedup();
    if backends.len() > 1 {
        extra.insert("backends".into(), serde_json::json!(backends));
    }
    extra.insert("corpus".into(), serde_json::json!(corpus));
    if evaluated {
        extra.insert(
            crate::report::VAL_TOKENS_SCORED_KEY.into(),
            serde_json::json!(ev.scored_tokens),
        );
        extra.insert(
            crate::report::VAL_TOKENS_SPLIT_KEY.into(),
            serde_json::json!(ev.split_tokens),
        );
    }
    if let Some(c) = &ev.causal {
        extra.insert(
            "depth_fractions_causal".into(),
            serde_json::json!(c.depth_fractions),
        );
    }
    if !ev.nll_by_max_depth.is_empty() {
        extra.insert(
            crate::report::NLL_BY_MAX_DEPTH_KEY.into(),
            serde_json::json!(ev.nll_by_max_depth),
        );
    }
    let mut row = RunSummary {
        name: name.to_string(),
        model: model_kind.into(),
        router: cfg
            .router
            .as_ref()
            .map(|r| r.kind.clone())
            .unwrap_or_else(|| "-".into()),
        kv_policy: cfg.kv.kind.clone(),
        sharing: cfg.recursion.sharing.kind.clone(),
        num_recursions: cfg.plan.num_recursions,
        params_non_embedding: acct.non_embedding_params,
        params_embedding: acct.embedding_params,
        flops_per_token: acct.flops_per_token,
        train_flops: 3.0 * acct.flops_per_token * summary.tokens as f64,
        train_tokens: summary.tokens,
        steps: summary.steps as u64,
        val_nll: full.nll,
        val_nll_causal: ev.causal.as_ref().map(|c| c.nll),
        bits_per_byte: full.bits_per_byte.unwrap_or(f64::NAN),
        bits_per_byte_causal: ev.causal.as_ref().and_then(|c| c.bits_per_byte),
        accuracy: ev.acc,
        acc_norm: ev.acc_norm,
        dead_token_ratio: full_stats.as_ref().and_then(|s| s.dead_token_ratio()),
        sampling_acc: full_stats.as_ref().and_then(|s| s.sampling_accuracy()),
        maxvio: stats.as_ref().and_then(|s| s.max_vio()),
        entropy: stats.as_ref().and_then(|s| s.entropy()),
        tokens_per_depth,
        train_tokens_per_sec: summary.tokens_per_sec,
        wall_secs: summary.wall_secs,
        status: "done".into(),
        extra,
    };
    let _ = m;
    row.set_nll_stderrs(
        full.nll_stderr,
        ev.causal.as_ref().and_then(|c| c.nll_stderr),
    );
    crate::checkpoint::write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&row)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    crate::checkpoint::record_files(out, &recorded)?;
    Ok(RunOutcome {
        summary: row,
        curve,
        traces,
        already_finished: false,
    })
}

/// The file of a run's depth traces (a JSON list of [`DepthTrace`]).
pub const TRACES_FILE: &str = "traces.json";

/// A run's depth traces: `traces.json`, or the single `trace.json` of older runs.
pub fn read_traces(dir: &Path) -> Vec<DepthTrace> {
    if let Some(v) = std::fs::read_to_string(dir.join(TRACES_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
    {
        return v;
    }
    std::fs::read_to_string(dir.join("trace.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<DepthTrace>(&t).ok())
        .into_iter()
        .collect()
}

/// Reads `metrics.jsonl` into a loss curve.
pub fn read_curve(name: &str, path: &Path) -> Result<Curve> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let points = text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .map(|r| CurvePoint {
            step: r.step as u64,
            tokens: r.tokens,
            flops: r.flops,
            loss: r.loss,
            val_nll: None,
        })
        .collect();
    Ok(Curve {
        run: name.to_string(),
        points,
    })
}

/// Reads a finished run's `summary.json`, if the run is done.
pub fn finished_summary(dir: &Path) -> Option<RunSummary> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let s: RunSummary = serde_json::from_str(&text).ok()?;
    s.is_done().then_some(s)
}
