//! The training loop: gradient accumulation, AdamW with decay groups and the aux router's
//! own optimiser, global-norm clipping, schedules, NaN/Inf guards, a loss-spike detector,
//! JSONL metrics, atomic checkpoints and bit-identical resume (spec §1.3, §3.3).

use crate::checkpoint::{self, CheckpointTensors, TrainState};
use crate::model::{MorModel, NamedVar};
use crate::optim::{self, AdamW, AdamWConfig, Schedule, UpdatePath};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use mor_core::rng::Rng;
use mor_router::{RouteMode, RouterStats};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One batch of token ids: `inputs[i]` predicts `targets[i]`.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Input ids, row-major `[b, t]`.
    pub inputs: Vec<u32>,
    /// Target ids, row-major `[b, t]`.
    pub targets: Vec<u32>,
    /// Rows.
    pub b: usize,
    /// Tokens per row.
    pub t: usize,
}

/// A source of training batches whose position can be saved and restored.
pub trait TrainData {
    /// The next batch of `rows` sequences.
    fn next_batch(&mut self, rows: usize) -> Result<TokenBatch>;
    /// The current position (stored in checkpoints).
    fn cursor(&self) -> serde_json::Value;
    /// Restores a position saved by [`TrainData::cursor`].
    fn restore(&mut self, cursor: &serde_json::Value) -> Result<()>;
}

/// What the spike detector does when the loss jumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpikeAction {
    /// Skip the optimiser step (gradients dropped).
    Skip,
    /// Stop training with an error; the last good checkpoint is kept.
    Stop,
    /// Detector off.
    Off,
}

/// Everything the loop needs, derived from the run config.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per optimiser step.
    pub batch_seqs: usize,
    /// Sequences per micro-batch (gradient accumulation = batch / micro).
    pub micro_batch_seqs: usize,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Max global gradient norm (0 = no clipping).
    pub grad_clip: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Log every n steps (JSONL always gets every step).
    pub log_every: usize,
    /// Checkpoint every n steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Spike detector threshold (rolling z-score of the loss).
    pub spike_zscore: f64,
    /// Spike detector window.
    pub spike_window: usize,
    /// Spike action.
    pub spike_action: SpikeAction,
    /// Seed of the trainer RNG.
    pub seed: u64,
    /// Hide progress bars.
    pub quiet: bool,
    /// Label shown on the progress bar.
    pub label: String,
    /// Stop after this many steps of this invocation (for tests of resume); `None` = run to
    /// the end.
    pub stop_after: Option<usize>,
}

/// One JSONL record per optimiser step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    /// 1-based step number.
    pub step: usize,
    /// Total loss (CE + router losses).
    pub loss: f64,
    /// Cross-entropy.
    pub ce: f64,
    /// Router loss terms (before coefficients).
    pub router_terms: Vec<(String, f64)>,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens consumed so far.
    pub tokens: u64,
    /// Training FLOPs so far (forward FLOPs/token × 3 × tokens).
    pub flops: f64,
    /// Tokens per second of this step.
    pub tokens_per_sec: f64,
    /// Seconds since the start of this invocation.
    pub elapsed: f64,
    /// Whether the step was skipped by the spike detector.
    pub skipped: bool,
}

/// Result of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: usize,
    /// Tokens consumed.
    pub tokens: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Mean tokens/s over this invocation (excluding the first step).
    pub tokens_per_sec: f64,
    /// Wall seconds of this invocation.
    pub wall_secs: f64,
    /// Steps skipped by the spike detector.
    pub skipped_steps: usize,
    /// Router stats over the last 10% of steps.
    pub router_stats: Option<RouterStats>,
    /// Whether the run reached its last step.
    pub finished: bool,
}

/// Most consecutive steps the spike detector flags. A loss that stays high for longer is not a
/// bad batch but the model's new level (the update that caused it is already applied), and
/// skipping more updates would only freeze the model there: the step is then taken and the
/// statistics restart from the new level.
pub const MAX_CONSECUTIVE_SPIKES: usize = 3;

/// Rolling z-score spike detector.
#[derive(Debug, Clone)]
struct SpikeGuard {
    window: Vec<f64>,
    cap: usize,
    z: f64,
    /// Consecutive flagged steps so far.
    run: usize,
}

impl SpikeGuard {
    /// Whether the loss of this step is a spike to act on (see [`MAX_CONSECUTIVE_SPIKES`]).
    fn observe(&mut self, loss: f64) -> bool {
        if self.is_spike(loss) {
            self.run += 1;
            if self.run <= MAX_CONSECUTIVE_SPIKES {
                return true;
            }
            self.window.clear();
        }
        self.run = 0;
        false
    }

    fn is_spike(&self, loss: f64) -> bool {
        if self.window.len() < self.cap.max(8) / 2 {
            return false;
        }
        let n = self.window.len() as f64;
        let mean = self.window.iter().sum::<f64>() / n;
        let var = self.window.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let sd = var.sqrt().max(1e-6 * mean.abs().max(1.0));
        (loss - mean) / sd > self.z
    }
    fn push(&mut self, loss: f64) {
        self.window.push(loss);
        if self.window.len() > self.cap {
            self.window.remove(0);
        }
    }
}

/// Trains `model` in `run_dir` (metrics in `metrics.jsonl`, checkpoints in
/// `checkpoints/`). With `resume`, continues from the latest checkpoint bit-identically
/// when run with the same thread count (the `cpu` backend splits products into one row
/// block per thread, and the blocking can change the last bits of a sum).
///
/// `flops_per_token` is the forward FLOPs per token of spec §1.4 (for logging). AdamW
/// takes the path the model's config names (`train.update_path`; the default `auto` is
/// the host update for f32 parameters on the CPU, tensor ops on the parameters' device
/// otherwise); see [`train_with`].
pub fn train(
    model: &MorModel,
    data: &mut dyn TrainData,
    s: &TrainSettings,
    run_dir: &Path,
    resume: bool,
    flops_per_token: f64,
) -> Result<TrainSummary> {
    train_with(
        model,
        data,
        s,
        run_dir,
        resume,
        flops_per_token,
        model.config().train.update_path.into(),
    )
}

/// [`train`] with the AdamW update computed by `update` for both optimisers (the main and
/// the auxiliary router's): [`UpdatePath::Device`] runs on the CPU the tensor-op update a
/// GPU run takes, moments and checkpoints included.
///
/// # Errors
/// Those of [`train`]; [`UpdatePath::Host`] for parameters that are not f32 CPU tensors.
pub fn train_with(
    model: &MorModel,
    data: &mut dyn TrainData,
    s: &TrainSettings,
    run_dir: &Path,
    resume: bool,
    flops_per_token: f64,
    update: UpdatePath,
) -> Result<TrainSummary> {
    train_observed(
        model,
        data,
        s,
        run_dir,
        resume,
        flops_per_token,
        update,
        &mut |_| Ok(()),
    )
}

/// [`train_with`], calling `on_start(step)` once before the first step: `step` is the step
/// of the checkpoint the run resumed from, after it loaded (0 for a start). What is refused
/// before any work (a setting, a checkpoint that does not load) never reaches it, so it
/// records only invocations that train; an error from it stops the run there.
///
/// # Errors
/// Those of [`train_with`], and `on_start`'s.
#[allow(clippy::too_many_arguments)]
pub fn train_observed(
    model: &MorModel,
    data: &mut dyn TrainData,
    s: &TrainSettings,
    run_dir: &Path,
    resume: bool,
    flops_per_token: f64,
    update: UpdatePath,
    on_start: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<TrainSummary> {
    if s.micro_batch_seqs == 0 || !s.batch_seqs.is_multiple_of(s.micro_batch_seqs) {
        return Err(Error::msg(format!(
            "train.batch_seqs ({}) must be a multiple of train.micro_batch_seqs ({})",
            s.batch_seqs, s.micro_batch_seqs
        )));
    }
    let accum = s.batch_seqs / s.micro_batch_seqs;
    let main_vars: Vec<NamedVar> = model.named_vars();
    let aux_vars: Vec<NamedVar> = model.aux_named_vars();
    let mk = |vars: &[NamedVar]| -> Vec<(String, Var, bool)> {
        vars.iter()
            .map(|(n, v)| (n.clone(), v.clone(), !MorModel::no_decay(n)))
            .collect()
    };
    if update == UpdatePath::Host {
        // Refused before any work, the run folder untouched: the host update reads f32
        // CPU tensors only.
        if let Some((n, v)) = main_vars
            .iter()
            .chain(&aux_vars)
            .find(|(_, v)| !v.device().is_cpu() || v.dtype() != candle_core::DType::F32)
        {
            return Err(Error::msg(format!(
                "train.update_path = \"host\" updates f32 parameters on the CPU, but `{n}` is \
                 {:?} on {:?}; use \"auto\" or \"device\"",
                v.dtype(),
                v.device().location()
            )));
        }
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let ckpt_root = run_dir.join("checkpoints");
    let mut opt = AdamW::new(s.adamw.clone(), mk(&main_vars))?;
    let aux_mult = model.router().map(|r| r.aux_lr_mult()).unwrap_or(1.0);
    let mut aux_opt = AdamW::new(s.adamw.clone(), mk(&aux_vars))?;
    let main_v: Vec<Var> = main_vars.iter().map(|(_, v)| v.clone()).collect();
    let aux_v: Vec<Var> = aux_vars.iter().map(|(_, v)| v.clone()).collect();

    if let Some(r) = model.router() {
        r.set_grad_accum(accum);
    }
    let mut step = 0usize;
    let mut tokens = 0u64;
    let mut rng = Rng::new(s.seed);
    let mut guard = SpikeGuard {
        window: Vec::new(),
        cap: s.spike_window.max(2),
        z: s.spike_zscore,
        run: 0,
    };
    let mut last_good: Option<PathBuf> = None;
    let metrics_path = run_dir.join("metrics.jsonl");

    if resume {
        // The checkpoint `latest` names; without the pointer (lost, or a kill before it
        // moved), the newest valid one; none: from the start.
        if let Some((dir, state, t, refused)) = checkpoint::resume_checkpoint(&ckpt_root)? {
            // Newer checkpoints that failed their checks are kept on disk, but said.
            for r in &refused {
                eprintln!("warning: skipped a newer checkpoint that is not valid: {r}");
            }
            if !refused.is_empty() {
                eprintln!("resuming from {}", dir.display());
            }
            let all: Vec<NamedVar> = main_vars.iter().chain(aux_vars.iter()).cloned().collect();
            let mut params = t.model.clone();
            let buffers: Vec<(String, Tensor)> = params
                .iter()
                .filter(|(k, _)| k.starts_with("buffer."))
                .map(|(k, v)| (k.trim_start_matches("buffer.").to_string(), v.clone()))
                .collect();
            params.retain(|k, _| !k.starts_with("buffer."));
            checkpoint::assign_params(&dir.join("model.safetensors"), &all, &params)?;
            if let Some(r) = model.router() {
                r.load_buffers(&buffers)?;
            }
            let (main_m, aux_m): (
                std::collections::HashMap<_, _>,
                std::collections::HashMap<_, _>,
            ) = t
                .optim
                .into_iter()
                .partition(|(k, _)| !k.starts_with("aux."));
            opt.load_state(state.optimizer_t, &main_m)?;
            let aux_m = aux_m
                .into_iter()
                .map(|(k, v)| (k.trim_start_matches("aux.").to_string(), v))
                .collect();
            aux_opt.load_state(state.aux_optimizer_t, &aux_m)?;
            data.restore(&state.data_cursor)?;
            step = state.step;
            tokens = state.tokens;
            rng = state.rng;
            guard.window = state.loss_window;
            guard.run = state
                .extra
                .get("spike_run")
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as usize;
            last_good = Some(dir);
        }
        // Every step after the resumed one is run again: the log keeps each step once.
        truncate_metrics(&metrics_path, step)?;
    } else if ckpt_root.exists() {
        return Err(Error::msg(format!(
            "{} already holds checkpoints; pass --resume to continue or choose another --out",
            run_dir.display()
        )));
    }
    on_start(step)?;

    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let bar = crate::progress::RunProgress::new(&s.label, s.steps as u64, s.quiet);
    let start = Instant::now();
    let mut timed_tokens = 0u64;
    let mut timed_secs = 0f64;
    let mut final_loss = f64::NAN;
    let mut skipped = 0usize;
    let mut stats_tail: Option<RouterStats> = None;
    let tail_from = s.steps - s.steps / 10;
    let mut ran = 0usize;
    let dev = model.backend().device().clone();

    while step < s.steps {
        if let Some(n) = s.stop_after {
            if ran >= n {
                break;
            }
        }
        let t0 = Instant::now();
        let lr = s.schedule.lr(step, s.adamw.lr);
        if let Some(r) = model.router() {
            r.set_train_step(step);
        }
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_dev: Option<Tensor> = None;
        let mut ce_dev: Option<Tensor> = None;
        // Per micro-batch, the router's output with its logged values still on the device.
        let mut router_outs: Vec<mor_router::RouterOutput> = Vec::with_capacity(accum);
        for _ in 0..accum {
            let batch = data.next_batch(s.micro_batch_seqs)?;
            let (bt_b, bt_t) = (batch.b, batch.t);
            // A device failure of the micro-step (out of memory above all) names the
            // batch size that was tried.
            let micro = |batch: TokenBatch| -> Result<(Tensor, Tensor, _)> {
                let ids = Tensor::from_vec(batch.inputs, (batch.b, batch.t), &dev)?;
                let tg = Tensor::from_vec(batch.targets, (batch.b, batch.t), &dev)?;
                let out = model.forward_loss_deferred(&ids, &tg, RouteMode::Train)?;
                let ce = out.ce.clone();
                let mut loss = (&ce / accum as f64)?;
                if let Some(rl) = &out.router.loss {
                    // L_bal and L_z are invariant to accumulation (spec §3.3); the expert BCE
                    // factor of the released code is the router parameter `aux_bce_scale`.
                    loss = (loss + (rl / accum as f64)?)?;
                }
                if let Some(al) = &out.router.aux_router_loss {
                    loss = (loss + (al / accum as f64)?)?;
                }
                Ok((loss, ce, out.router))
            };
            let (loss, ce, router_out) =
                micro(batch).map_err(|e| with_batch_size(e, s.micro_batch_seqs))?;
            // The step's loss and CE stay on the device (f64 sums, in the order of the
            // micro-batches) until the one host read of the step, below.
            let lv = loss.detach().to_dtype(candle_core::DType::F64)?;
            let cv = (ce.detach().to_dtype(candle_core::DType::F64)? / accum as f64)?;
            loss_dev = Some(match loss_dev.take() {
                Some(a) => (a + lv)?,
                None => lv,
            });
            ce_dev = Some(match ce_dev.take() {
                Some(a) => (a + cv)?,
                None => cv,
            });
            let g = loss
                .backward()
                .map_err(|e| with_batch_size(e.into(), s.micro_batch_seqs))?;
            let both: Vec<Var> = main_v.iter().chain(aux_v.iter()).cloned().collect();
            optim::accumulate(&mut grads, g, &both)?;
            // Only the logged values are kept to the end of the step: the loss tensors
            // would keep the micro-batch's autograd graph (its activations) alive.
            router_outs.push(mor_router::RouterOutput {
                loss: None,
                aux_router_loss: None,
                ..router_out
            });
            tokens += (bt_b * bt_t) as u64;
        }
        let mut grads = grads.ok_or_else(|| Error::msg("no micro-batch ran"))?;
        // Both optimisers' gradients are checked before either steps (spec §3.3: the aux
        // router trains beside the model; a non-finite update of either stops the run).
        let last = last_good
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into());
        // The one host read of the step: loss, CE, the squared gradient norms and the
        // router's logged values of every micro-batch.
        let (loss_dev, ce_dev) = match (loss_dev, ce_dev) {
            (Some(l), Some(c)) => (l, c),
            _ => return Err(Error::msg("no micro-batch ran")),
        };
        let mut logged = vec![loss_dev.reshape(1)?, ce_dev.reshape(1)?];
        let mut norm_slots = [None, None];
        for (slot, vs) in norm_slots.iter_mut().zip([&main_v, &aux_v]) {
            if let Some(sq) = optim::grad_norm_sq(&grads, vs)? {
                *slot = Some(logged.len());
                logged.push(sq.reshape(1)?);
            }
        }
        let n_own = logged.len();
        let mut router_lens = Vec::with_capacity(router_outs.len());
        for out in &router_outs {
            let v = out.pending_values(false)?;
            router_lens.push(v.as_ref().map_or(0, Tensor::elem_count));
            logged.extend(v);
        }
        let values = mor_kernels::host_sync::to_host_f64(&Tensor::cat(&logged, 0)?)?;
        let (loss_sum, ce_sum) = (values[0], values[1]);
        // The router's terms (mean over the micro-batches, summed in their order) and
        // statistics (per micro-batch).
        let mut terms: Vec<(String, f64)> = Vec::new();
        let mut step_stats: Vec<RouterStats> = Vec::with_capacity(router_outs.len());
        let mut rest = &values[n_own..];
        for (mut out, n) in router_outs.into_iter().zip(router_lens) {
            let (v, tail) = rest.split_at(n);
            rest = tail;
            out.apply_pending(v, false)?;
            for (k, v) in &out.terms {
                match terms.iter_mut().find(|(n, _)| n == k) {
                    Some((_, acc)) => *acc += v / accum as f64,
                    None => terms.push((k.clone(), v / accum as f64)),
                }
            }
            step_stats.push(out.stats);
        }
        if !loss_sum.is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                step: step + 1,
                last_good: last.clone(),
            });
        }
        let norm = |slot: Option<usize>| slot.map_or(0.0, |i| values[i].sqrt());
        let (mut gn, mut an) = (norm(norm_slots[0]), norm(norm_slots[1]));
        // A non-finite norm: the checks below name the parameter (extra reads only then).
        if !gn.is_finite() {
            gn = finite_grad_norm(&grads, &main_vars, step + 1, &last)?;
        }
        if !an.is_finite() && !aux_vars.is_empty() {
            an = finite_grad_norm(&grads, &aux_vars, step + 1, &last)?;
        }
        let spike = s.spike_action != SpikeAction::Off && guard.observe(loss_sum);
        if spike && s.spike_action == SpikeAction::Stop {
            return Err(Error::msg(format!(
                "loss spike at step {} (loss {loss_sum:.4}); last good checkpoint: {}",
                step + 1,
                last_good
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            )));
        }
        if spike {
            skipped += 1;
        } else {
            if s.grad_clip > 0.0 && gn > s.grad_clip {
                optim::scale_grads(&mut grads, &main_v, s.grad_clip / gn)?;
            }
            if !aux_v.is_empty() {
                if s.grad_clip > 0.0 && an > s.grad_clip {
                    optim::scale_grads(&mut grads, &aux_v, s.grad_clip / an)?;
                }
                aux_opt.step_with(&grads, lr * aux_mult, update)?;
            }
            opt.step_with(&grads, lr, update)?;
            if let Some(r) = model.router() {
                r.after_optimizer_step(&step_stats, step)?;
            }
            guard.push(loss_sum);
        }
        let _ = rng.next_u64();
        step += 1;
        ran += 1;
        final_loss = loss_sum;
        let dt = t0.elapsed().as_secs_f64();
        let step_tokens = (s.batch_seqs * model.config().model.seq_len) as f64;
        if ran > 1 {
            timed_tokens += step_tokens as u64;
            timed_secs += dt;
        }
        if step > tail_from {
            let acc = stats_tail.get_or_insert_with(RouterStats::default);
            for st in &step_stats {
                acc.merge(st);
            }
        }
        let rec = StepLog {
            step,
            loss: loss_sum,
            ce: ce_sum,
            router_terms: terms,
            lr,
            grad_norm: gn,
            tokens,
            flops: 3.0 * flops_per_token * tokens as f64,
            tokens_per_sec: step_tokens / dt.max(1e-9),
            elapsed: start.elapsed().as_secs_f64(),
            skipped: spike,
        };
        writeln!(
            metrics,
            "{}",
            serde_json::to_string(&rec).unwrap_or_default()
        )
        .map_err(|e| Error::io(&metrics_path, e))?;
        bar.update(step as u64, loss_sum, rec.tokens_per_sec);
        let want_ckpt =
            step == s.steps || (s.checkpoint_every > 0 && step.is_multiple_of(s.checkpoint_every));
        if want_ckpt {
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            let mut model_t: Vec<(String, Tensor)> = main_vars
                .iter()
                .chain(aux_vars.iter())
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            if let Some(r) = model.router() {
                for (n, t) in r.buffers() {
                    model_t.push((format!("buffer.{n}"), t));
                }
            }
            let mut optim_t = opt.state_tensors();
            optim_t.extend(
                aux_opt
                    .state_tensors()
                    .into_iter()
                    .map(|(n, t)| (format!("aux.{n}"), t)),
            );
            let state = TrainState {
                format_version: checkpoint::FORMAT_VERSION,
                step,
                optimizer_t: opt.t,
                aux_optimizer_t: aux_opt.t,
                tokens,
                data_cursor: data.cursor(),
                rng: rng.clone(),
                loss_window: guard.window.clone(),
                extra: serde_json::json!({ "spike_run": guard.run }),
                files: Default::default(),
            };
            let dir = checkpoint::save_checkpoint(
                &ckpt_root,
                state,
                &CheckpointTensors {
                    model: model_t,
                    optim: optim_t,
                },
                s.keep_checkpoints,
            )?;
            last_good = Some(dir);
        }
    }
    if ran == 0 {
        // Resumed at the end: the loss of the last step is in the log.
        final_loss = last_logged_loss(&metrics_path).unwrap_or(f64::NAN);
    }
    bar.finish(&format!("loss {final_loss:.4}"));
    Ok(TrainSummary {
        steps: step,
        tokens,
        final_loss,
        tokens_per_sec: if timed_secs > 0.0 {
            timed_tokens as f64 / timed_secs
        } else {
            // Too few steps ran in this invocation to time one (a resume near the end):
            // the rate of the steps logged before.
            logged_throughput(&metrics_path).unwrap_or(0.0)
        },
        wall_secs: start.elapsed().as_secs_f64(),
        skipped_steps: skipped,
        router_stats: stats_tail,
        finished: step >= s.steps,
    })
}

/// The global gradient norm of `vars`, or [`Error::NonFinite`] naming the first parameter
/// whose gradient is not finite (at optimiser step `step`, `last_good` the last checkpoint).
pub fn finite_grad_norm(
    grads: &candle_core::backprop::GradStore,
    vars: &[NamedVar],
    step: usize,
    last_good: &str,
) -> Result<f64> {
    let v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let gn = optim::grad_norm(grads, &v)?;
    if gn.is_finite() {
        return Ok(gn);
    }
    let bad = vars
        .iter()
        .find(|(_, v)| {
            grads
                .get(v.as_tensor())
                .and_then(|g| {
                    g.sqr()
                        .ok()?
                        .sum_all()
                        .ok()?
                        .to_dtype(candle_core::DType::F64)
                        .ok()?
                        .to_scalar::<f64>()
                        .ok()
                })
                .map(|x| !x.is_finite())
                .unwrap_or(false)
        })
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| "?".into());
    Err(Error::NonFinite {
        what: format!("gradient of `{bad}`"),
        step,
        last_good: last_good.to_string(),
    })
}

/// The loss of the last line of `metrics.jsonl`.
/// `e` with the batch size of the failed micro-step attached where it is a diagnosed CUDA
/// failure (an out-of-memory message then names the batch size that was tried); any other
/// error unchanged.
fn with_batch_size(e: Error, batch_size: usize) -> Error {
    let diagnose = |c: candle_core::Error| match mor_kernels::Error::from_candle(c) {
        mor_kernels::Error::Candle(c) => Err(c),
        k => Ok(k.with_batch_size(batch_size)),
    };
    match e {
        Error::Candle(c) => diagnose(c).map_or_else(Error::Candle, Error::Kernels),
        Error::Kernels(k) => Error::Kernels(k.with_batch_size(batch_size)),
        Error::Router(mor_router::Error::Kernels(k)) => {
            Error::Kernels(k.with_batch_size(batch_size))
        }
        Error::Router(mor_router::Error::Candle(c)) => diagnose(c).map_or_else(
            |c| Error::Router(mor_router::Error::Candle(c)),
            Error::Kernels,
        ),
        other => other,
    }
}

fn last_logged_loss(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .map(|r| r.loss)
}

/// The median training rate (tokens/s) of the logged steps after the first (whose time
/// includes warming up), if any.
fn logged_throughput(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut rates: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .filter(|r| r.step > 1 && r.tokens_per_sec.is_finite() && r.tokens_per_sec > 0.0)
        .map(|r| r.tokens_per_sec)
        .collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    Some(rates[rates.len() / 2])
}

/// Drops metric lines after `step` (a resumed run rewrites them).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<StepLog>(l)
                .map(|r| r.step <= step)
                .unwrap_or(false)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    checkpoint::write_atomic(path, out.as_bytes())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_device_out_of_memory_names_the_batch_size() {
        let oom = || {
            candle_core::Error::Msg(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
            )
        };
        for e in [
            Error::Candle(oom()),
            Error::Kernels(mor_kernels::Error::from_candle(oom())),
            Error::Router(mor_router::Error::Candle(oom())),
        ] {
            let msg = with_batch_size(e, 12).to_string();
            assert!(msg.contains("at batch size 12"), "{msg}");
        }
        // Anything else passes through unchanged.
        let other = with_batch_size(
            Error::Candle(candle_core::Error::Msg("bad shape".into())),
            12,
        );
        assert!(matches!(other, Error::Candle(_)), "{other:?}");
        assert_eq!(other.to_string(), "bad shape");
    }

    use super::*;

    fn guard() -> SpikeGuard {
        let mut g = SpikeGuard {
            window: Vec::new(),
            cap: 20,
            z: 6.0,
            run: 0,
        };
        // A steady loss around 5 with a little noise (sd about 0.03).
        for i in 0..20 {
            g.push(5.0 + 0.05 * ((i % 3) as f64 - 1.0));
        }
        g
    }

    #[test]
    fn a_non_finite_aux_gradient_stops_with_its_name() -> Result<()> {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let main = Var::from_tensor(&Tensor::ones(3, DType::F32, &dev)?)?;
        let aux = Var::from_tensor(&Tensor::ones(2, DType::F32, &dev)?)?;
        // d/dw of sum(w * c) is c: the main gradient is finite, the aux one holds a NaN.
        let cm = Tensor::new(&[3f32, 0.0, 4.0], &dev)?;
        let ca = Tensor::new(&[1f32, f32::NAN], &dev)?;
        let loss = ((main.as_tensor() * &cm)?.sum_all()? + (aux.as_tensor() * &ca)?.sum_all()?)?;
        let g = loss.backward()?;
        let main_vars: Vec<NamedVar> = vec![("model.w".into(), main)];
        let aux_vars: Vec<NamedVar> = vec![("aux_router.w".into(), aux)];
        assert_eq!(finite_grad_norm(&g, &main_vars, 7, "none")?, 5.0);
        let err = finite_grad_norm(&g, &aux_vars, 7, "ck/step-0000006")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gradient of `aux_router.w`")
                && err.contains("at step 7")
                && err.contains("step-0000006"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn a_lone_spike_is_flagged_once() {
        let mut g = guard();
        assert!(!g.observe(5.02));
        assert!(g.observe(9.0));
        assert_eq!(g.run, 1);
        assert!(!g.observe(5.01), "the next ordinary loss is not a spike");
        assert_eq!(g.run, 0);
    }

    #[test]
    fn a_lasting_jump_is_accepted_after_the_limit() {
        let mut g = guard();
        for k in 1..=MAX_CONSECUTIVE_SPIKES {
            assert!(g.observe(12.0), "step {k} of the jump is flagged");
        }
        // One more: the new level is accepted and the statistics restart from it.
        assert!(!g.observe(12.0));
        assert!(g.window.is_empty());
        assert_eq!(g.run, 0);
        for _ in 0..10 {
            g.push(12.0);
            assert!(!g.observe(12.0));
        }
    }
}
