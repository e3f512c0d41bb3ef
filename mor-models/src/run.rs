//! One run end to end: data → model → training → evaluation → summary, in a run folder.
//!
//! A run folder holds `config.toml` (the resolved config), `config.json`, `tokenizer.json`,
//! `metrics.jsonl` (one line per optimiser step), `checkpoints/`, `model.safetensors`
//! (final weights), `eval.json` and `summary.json` (written last: a run with a
//! `summary.json` whose status is `done` is finished and is skipped by ablation reruns).

use crate::data::{DataConfig, Dataset, TrainBatches};
use crate::model::MorModel;
use crate::report::{Curve, CurvePoint, DepthTrace, RunSummary};
use crate::train::{self, SpikeAction, StepLog, TokenBatch, TrainData, TrainSettings};
use crate::{Error, Result};
use mor_core::config::ResolvedConfig;
use std::path::{Path, PathBuf};

mod evaluate;
pub use evaluate::{evaluate, EvalResults};

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

/// Applies the thread count of the run (0 = leave the default).
pub fn set_threads(n: usize) {
    prefer_rayon_threads();
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
    /// Depth trace of one validation sample (MoR only).
    pub trace: Option<DepthTrace>,
}

/// Trains and evaluates `cfg` in `opts.out`.
pub fn run(cfg: &ResolvedConfig, name: &str, opts: &RunOptions) -> Result<RunOutcome> {
    let out = &opts.out;
    if cfg.data.doc_masking {
        return Err(Error::msg(
            "data.doc_masking = true is not supported by the model's attention yet; set it to false",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    set_threads(cfg.threads);
    crate::checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml_string().as_bytes())?;
    crate::checkpoint::write_atomic(
        &out.join("config.json"),
        cfg.to_json().unwrap_or_default().as_bytes(),
    )?;
    let dcfg = data_config(cfg, opts.data.as_deref());
    let ds = Dataset::prepare(&dcfg, Some(out))?;
    let model = MorModel::new(cfg)?;
    let acct = mor_core::accounting::report(cfg)?;
    let settings = train_settings(cfg, opts);
    let it = ds.train_batches(settings.micro_batch_seqs, None)?;
    let mut adapter = DataAdapter { it };
    let summary = train::train(
        &model,
        &mut adapter,
        &settings,
        out,
        opts.resume,
        acct.flops_per_token,
    )?;
    let curve = read_curve(name, &out.join("metrics.jsonl"))?;
    if !summary.finished {
        return Err(Error::msg(format!(
            "stopped after step {} of {}",
            summary.steps, settings.steps
        )));
    }
    crate::checkpoint::save_model(
        out,
        &model.named_vars(),
        &serde_json::to_value(cfg).unwrap_or_default(),
    )?;

    let (ev, trace) = if opts.skip_eval {
        (EvalResults::default(), None)
    } else {
        evaluate(&model, &ds, cfg, name, &[])?
    };
    crate::checkpoint::write_atomic(
        &out.join("eval.json"),
        serde_json::to_string_pretty(&ev)
            .unwrap_or_default()
            .as_bytes(),
    )?;

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
    if let Some(c) = &ev.causal {
        extra.insert(
            "depth_fractions_causal".into(),
            serde_json::json!(c.depth_fractions),
        );
    }
    let row = RunSummary {
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
    crate::checkpoint::write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&row)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(RunOutcome {
        summary: row,
        curve,
        trace,
    })
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
