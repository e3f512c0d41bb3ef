//! The training-cost benchmark behind `cargo xtask bench train`: for one model, the time of
//! a training step (forward with the LM head and loss as one op, router losses, backward,
//! AdamW) at the model's `train.batch_seqs × model.seq_len` tokens, its tokens/s and the
//! process's peak resident memory over the steps.
//!
//! Peak memory is the kernel's high-water mark of the process (`VmHWM`), reset before the
//! model is built (`/proc/self/clear_refs`), so it is only meaningful for one model per
//! process: `cargo xtask bench train` runs each model in a process of its own. On a system
//! without `/proc` the memory fields are absent.

use candle_core::{Device, Tensor};
use mor_core::config::{Precision, ResolvedConfig};
use mor_models::optim::{AdamW, AdamWConfig};
use mor_models::{MorModel, Result};
use std::time::Instant;

/// One model's training cost.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainModelReport {
    /// Run name (of the grid).
    pub name: String,
    /// `train.precision`.
    pub precision: Precision,
    /// Parameters (aux router included).
    pub params: usize,
    /// Tokens per step (`batch_seqs · seq_len`).
    pub tokens_per_step: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Median step time.
    pub step_seconds: f64,
    /// `tokens_per_step / step_seconds`.
    pub tokens_per_s: f64,
    /// Peak resident bytes of the process during model build and steps.
    pub peak_rss_bytes: Option<u64>,
    /// The peak above the resident bytes before the model was built: the model, its
    /// optimiser state and the step's activations.
    pub peak_rss_above_start_bytes: Option<u64>,
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Times `steps` training steps of the model of `cfg` (one more untimed first).
///
/// # Errors
/// A config the model or its backend refuses (e.g. a precision it does not implement), or
/// a failing step.
pub fn time_training(cfg: &ResolvedConfig, name: &str, steps: usize) -> Result<TrainModelReport> {
    let _ = mor_models::builtin::link();
    // Resets the high-water mark to the current resident size ("5", Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let start = rss();
    let model = MorModel::new(cfg)?;
    let mut vars: Vec<(String, candle_core::Var, bool)> = model
        .named_vars()
        .into_iter()
        .chain(model.aux_named_vars())
        .map(|(n, v)| (n, v, true))
        .collect();
    vars.dedup_by(|a, b| a.0 == b.0);
    let params = vars
        .iter()
        .map(|(_, v, _)| v.as_tensor().elem_count())
        .sum();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        },
        vars,
    )?;
    let (b, t, vocab) = (
        cfg.train.batch_seqs,
        cfg.model.seq_len,
        cfg.model.vocab_size,
    );
    let mut rng = mor_core::rng::Rng::new(cfg.seed);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(vocab) as u32).collect();
    let tg: Vec<u32> = ids.iter().map(|i| (i + 1) % vocab as u32).collect();
    let dev = Device::Cpu;
    let x = Tensor::from_vec(ids, (b, t), &dev)?;
    let y = Tensor::from_vec(tg, (b, t), &dev)?;
    // `RouteMode::Train` (mor-router's training selection), named by its serde name: this
    // crate reaches the router crate only through mor-models.
    let train_mode = serde_json::from_str("\"train\"")
        .map_err(|e| mor_models::Error::msg(format!("the training route mode: {e}")))?;
    let mut times = Vec::with_capacity(steps);
    for s in 0..=steps {
        let t0 = Instant::now();
        let out = model.forward_loss(&x, &y, train_mode)?;
        let mut loss = out.ce;
        if let Some(rl) = &out.router.loss {
            loss = (loss + rl)?;
        }
        if let Some(al) = &out.router.aux_router_loss {
            loss = (loss + al)?;
        }
        let _ = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3)?;
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let step_seconds = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let end = rss();
    Ok(TrainModelReport {
        name: name.to_string(),
        precision: cfg.train.precision,
        params,
        tokens_per_step: b * t,
        steps,
        step_seconds,
        tokens_per_s: (b * t) as f64 / step_seconds.max(1e-12),
        peak_rss_bytes: end.map(|e| e.1),
        peak_rss_above_start_bytes: start.zip(end).map(|(s, e)| e.1.saturating_sub(s.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mor_core::config::Config;

    #[test]
    fn a_step_is_timed_and_its_memory_counted() {
        let _ = mor_models::builtin::link();
        let cfg = Config::from_toml_str(
            "[model]\npreset = \"micro\"\nnum_layers = 4\nseq_len = 16\n[recursion]\nnum_recursions = 2\nsharing = { kind = \"middle_cycle\" }\n[router]\nkind = \"expert_choice\"\n[train]\nbudget = { steps = 1 }\nbatch_seqs = 2\nmicro_batch_seqs = 2\n",
        )
        .unwrap();
        let r = time_training(&cfg, "mor", 2).unwrap();
        assert_eq!((r.tokens_per_step, r.steps), (32, 2));
        assert!(r.step_seconds > 0.0);
        assert!((r.tokens_per_s - 32.0 / r.step_seconds).abs() < 1e-6 * r.tokens_per_s);
        let want: usize = MorModel::new(&cfg)
            .unwrap()
            .named_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        assert!(r.params >= want, "{} < {want}", r.params);
        #[cfg(target_os = "linux")]
        {
            let (peak, above) = (
                r.peak_rss_bytes.unwrap(),
                r.peak_rss_above_start_bytes.unwrap(),
            );
            assert!(peak >= above && peak > 0);
        }
    }
}
