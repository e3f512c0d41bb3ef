//! AdamW with decay groups, global-norm gradient clipping and learning-rate schedules
//! (spec §1.3), with state that can be saved and restored exactly.
//!
//! candle-nn's AdamW cannot save its moments, so a resumable trainer needs its own.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied to parameters of the decay group only).
    pub weight_decay: f64,
}

/// One parameter under optimisation.
#[derive(Debug)]
pub struct ParamState {
    /// Checkpoint name.
    pub name: String,
    /// The parameter.
    pub var: Var,
    /// Whether weight decay applies.
    pub decay: bool,
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
}

/// Where [`AdamW::step_with`] computes the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdatePath {
    /// The host update for f32 parameters on the CPU, the device update otherwise.
    #[default]
    Auto,
    /// The fused host update (f32 CPU parameters only).
    Host,
    /// Tensor ops on the parameters' device (any device, any float dtype).
    Device,
}

impl From<mor_core::config::UpdatePath> for UpdatePath {
    /// The path `train.update_path` names.
    fn from(p: mor_core::config::UpdatePath) -> Self {
        match p {
            mor_core::config::UpdatePath::Auto => UpdatePath::Auto,
            mor_core::config::UpdatePath::Host => UpdatePath::Host,
            mor_core::config::UpdatePath::Device => UpdatePath::Device,
        }
    }
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Parameters and moments.
    pub params: Vec<ParamState>,
    /// Steps taken (for bias correction).
    pub t: u64,
}

impl AdamW {
    /// An optimiser over `params` (name, var, decay?).
    pub fn new(cfg: AdamWConfig, params: Vec<(String, Var, bool)>) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var, decay)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(ParamState {
                    name,
                    var,
                    decay,
                    m,
                    v,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, t: 0 })
    }

    /// One AdamW step at learning rate `lr` with the gradients in `grads` (parameters
    /// without a gradient are left unchanged, moments included), by [`UpdatePath::Auto`].
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_with(grads, lr, UpdatePath::Auto)
    }

    /// One AdamW step through the chosen update path.
    ///
    /// [`UpdatePath::Host`] (what `Auto` takes for f32 parameters on the CPU) updates each
    /// parameter in one fused pass over host memory, in f64 arithmetic;
    /// [`UpdatePath::Device`] (what `Auto` takes anywhere else) updates on the parameter's
    /// own device, in the parameter's dtype: the fused kernel (`mor_adamw_step`, the host
    /// arithmetic) on CUDA for f32 parameters, tensor ops elsewhere; no value leaves
    /// the device and the moments stay where the parameter lives.
    ///
    /// # Errors
    /// `Host` for a parameter that is not an f32 CPU tensor; a candle error.
    pub fn step_with(&mut self, grads: &GradStore, lr: f64, path: UpdatePath) -> Result<()> {
        self.t += 1;
        let (b1, b2) = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let eps = self.cfg.eps;
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let decay = if p.decay {
                lr * self.cfg.weight_decay
            } else {
                0.0
            };
            let theta = p.var.as_tensor();
            let host = match path {
                UpdatePath::Host => true,
                UpdatePath::Device => false,
                UpdatePath::Auto => {
                    theta.device().is_cpu()
                        && [theta, g, &p.m, &p.v]
                            .iter()
                            .all(|t| t.dtype() == candle_core::DType::F32)
                }
            };
            if host {
                let shape = theta.shape().clone();
                let (w, m, v) = adamw_host(
                    [theta, g, &p.m, &p.v],
                    (b1, b2),
                    (bc1, bc2),
                    (lr, eps, decay),
                )?;
                let dev = theta.device().clone();
                p.m = Tensor::from_vec(m, &shape, &dev)?;
                p.v = Tensor::from_vec(v, &shape, &dev)?;
                p.var.set(&Tensor::from_vec(w, &shape, &dev)?)?;
                continue;
            }
            // On CUDA: the fused kernel (`mor_adamw_step`), one launch per parameter, the
            // host update's f64 arithmetic bit for bit; the moments stay on the device.
            if theta.device().is_cuda()
                && theta.dtype() == candle_core::DType::F32
                && [g, &p.m, &p.v].iter().all(|t| t.dtype() == theta.dtype())
            {
                let h = fused_hyper(&self.cfg, self.t, lr, p.decay);
                let (w, m, v) = mor_kernels::cuda::adamw_step(theta, g, &p.m, &p.v, &h)?;
                p.var.set(&w)?;
                // `w`, `m` and `v` are views of one [3, n] buffer: keep own copies of the
                // moments so that buffer is freed (two moments per parameter, as the
                // memory accounting counts), not held beside every parameter.
                p.m = m.copy()?;
                p.v = v.copy()?;
                continue;
            }
            // The same formula as `adamw_host`, as tensor ops on the parameter's device.
            let g = g.to_dtype(theta.dtype())?;
            p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&p.m / bc1)?;
            let denom = ((&p.v / bc2)?.sqrt()? + eps)?;
            let mut theta = theta.clone();
            if decay > 0.0 {
                theta = (theta * (1.0 - decay))?;
            }
            let upd = ((mhat / denom)? * lr)?;
            p.var.set(&(theta - upd)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`<name>.m`, `<name>.v`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for p in &self.params {
            out.push((format!("{}.m", p.name), p.m.clone()));
            out.push((format!("{}.v", p.name), p.v.clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`]; every moment must be present
    /// with the parameter's shape.
    pub fn load_state(
        &mut self,
        t: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        for p in &mut self.params {
            for (suffix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{}.{suffix}", p.name);
                let x = tensors
                    .get(&key)
                    .ok_or_else(|| Error::msg(format!("optimizer state misses `{key}`")))?;
                if x.dims() != p.var.as_tensor().dims() {
                    return Err(Error::msg(format!(
                        "optimizer state `{key}` has shape {:?}, parameter has {:?}",
                        x.dims(),
                        p.var.as_tensor().dims()
                    )));
                }
                // Checkpoints are read on the host: the moments go to the parameter's device.
                *slot = x.to_dtype(p.var.dtype())?.to_device(p.var.device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The f32 host update of one parameter: reads `[w, g, m, v]` in place (no copies) and
/// returns the new `(w, m, v)`, computed in f64 and written once each, over rayon chunks
/// (element-wise, so the result does not depend on the thread count).
/// The fused kernel's hyper-parameters at step `t` (1-based) for a parameter of the decay
/// group or not: the values [`AdamW::step_with`] uses on its other paths.
fn fused_hyper(
    cfg: &AdamWConfig,
    t: u64,
    lr: f64,
    decay_group: bool,
) -> mor_kernels::cuda::AdamwHyper {
    let (b1, b2) = cfg.betas;
    mor_kernels::cuda::AdamwHyper {
        lr,
        beta1: b1,
        beta2: b2,
        eps: cfg.eps,
        decay: if decay_group {
            lr * cfg.weight_decay
        } else {
            0.0
        },
        bc1: 1.0 - b1.powi(t as i32),
        bc2: 1.0 - b2.powi(t as i32),
    }
}

fn adamw_host(
    ts: [&Tensor; 4],
    (b1, b2): (f64, f64),
    (bc1, bc2): (f64, f64),
    (lr, eps, decay): (f64, f64, f64),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let owned = ts.map(|t| t.contiguous());
    let owned = owned.into_iter().collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut sl: Vec<&[f32]> = Vec::with_capacity(4);
    for (st, l) in &guards {
        let data = match &**st {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)) => d.as_slice(),
            _ => return Err(Error::msg("AdamW: expected f32 CPU tensors")),
        };
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| Error::msg("AdamW: expected contiguous tensors"))?;
        sl.push(&data[a..b]);
    }
    let (w0, g, m0, v0) = (sl[0], sl[1], sl[2], sl[3]);
    let n = w0.len();
    if g.len() != n || m0.len() != n || v0.len() != n {
        return Err(Error::msg(
            "AdamW: parameter, gradient and moments differ in size",
        ));
    }
    let (mut w, mut m, mut v) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let update = |i0: usize,
                  w: &mut [MaybeUninit<f32>],
                  m: &mut [MaybeUninit<f32>],
                  v: &mut [MaybeUninit<f32>]| {
        for k in 0..w.len() {
            let i = i0 + k;
            let gi = g[i] as f64;
            let mi = b1 * m0[i] as f64 + (1.0 - b1) * gi;
            let vi = b2 * v0[i] as f64 + (1.0 - b2) * gi * gi;
            m[k].write(mi as f32);
            v[k].write(vi as f32);
            let upd = lr * (mi / bc1) / ((vi / bc2).sqrt() + eps);
            w[k].write((w0[i] as f64 * (1.0 - decay) - upd) as f32);
        }
    };
    const CHUNK: usize = 1 << 14;
    let (ws, ms, vs) = (
        &mut w.spare_capacity_mut()[..n],
        &mut m.spare_capacity_mut()[..n],
        &mut v.spare_capacity_mut()[..n],
    );
    if n > CHUNK {
        ws.par_chunks_mut(CHUNK)
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, ((w, m), v))| update(c * CHUNK, w, m, v));
    } else {
        update(0, ws, ms, vs);
    }
    // SAFETY: `update` wrote every one of the first `n` elements of each vector.
    unsafe {
        w.set_len(n);
        m.set_len(n);
        v.set_len(n);
    }
    Ok((w, m, v))
}

/// Global L2 norm of the gradients of `vars`, read on the host once (one
/// [`mor_kernels::host_sync`] read, whatever the number of parameters).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    Ok(match grad_norm_sq(grads, vars)? {
        Some(sq) => mor_kernels::host_sync::scalar_f64(&sq)?.sqrt(),
        None => 0.0,
    })
}

/// The squared global L2 norm of the gradients of `vars` as one f64 scalar tensor on the
/// gradients' device (each gradient's sum of squares in its own dtype, summed in f64);
/// `None` when no var has a gradient.
pub fn grad_norm_sq(grads: &GradStore, vars: &[Var]) -> Result<Option<Tensor>> {
    let mut sq: Option<Tensor> = None;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let s = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
            sq = Some(match sq {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
    }
    Ok(sq)
}

/// Scales every gradient of `vars` by `s` in place of the store.
pub fn scale_grads(grads: &mut GradStore, vars: &[Var], s: f64) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * s)?);
        }
    }
    Ok(())
}

/// Adds the gradients of `src` into `acc` for `vars` (gradient accumulation).
pub fn accumulate(acc: &mut Option<GradStore>, src: GradStore, vars: &[Var]) -> Result<()> {
    match acc {
        None => *acc = Some(src),
        Some(a) => {
            for v in vars {
                if let Some(g) = src.get(v.as_tensor()) {
                    let sum = match a.remove(v.as_tensor()) {
                        Some(old) => (old + g)?,
                        None => g.clone(),
                    };
                    a.insert(v.as_tensor(), sum);
                }
            }
        }
    }
    Ok(())
}

/// Learning-rate schedules (spec §1.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Warmup–stable–decay: `t/w·η` while t < w; `η` while t < p; `η·(1−(t−p)/d)` after,
    /// with `p = total − d`.
    Trapezoid {
        /// Warm-up steps `w`.
        warmup: usize,
        /// Cooldown steps `d`.
        decay: usize,
        /// Total steps.
        total: usize,
    },
    /// Linear warm-up then cosine from η to `min_ratio·η`.
    Cosine {
        /// Warm-up steps.
        warmup: usize,
        /// Total steps.
        total: usize,
        /// Floor as a fraction of the peak.
        min_ratio: f64,
    },
    /// Linear warm-up then constant.
    Constant {
        /// Warm-up steps.
        warmup: usize,
    },
}

impl Schedule {
    /// Learning rate at 0-based step `t` for peak `lr`.
    pub fn lr(&self, t: usize, lr: f64) -> f64 {
        let warm = |w: usize| {
            if w > 0 && t < w {
                Some(lr * t as f64 / w as f64)
            } else {
                None
            }
        };
        match *self {
            Schedule::Trapezoid {
                warmup,
                decay,
                total,
            } => {
                if let Some(x) = warm(warmup) {
                    return x;
                }
                let p = total.saturating_sub(decay);
                if t < p || decay == 0 {
                    lr
                } else {
                    lr * (1.0 - (t - p) as f64 / decay as f64).max(0.0)
                }
            }
            Schedule::Cosine {
                warmup,
                total,
                min_ratio,
            } => {
                if let Some(x) = warm(warmup) {
                    return x;
                }
                let span = total.saturating_sub(warmup).max(1);
                let prog = ((t - warmup) as f64 / span as f64).min(1.0);
                let c = 0.5 * (1.0 + (std::f64::consts::PI * prog).cos());
                lr * (min_ratio + (1.0 - min_ratio) * c)
            }
            Schedule::Constant { warmup } => warm(warmup).unwrap_or(lr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A separately written scalar AdamW, the oracle of the tensor implementation.
    fn scalar_adamw(p: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9, 0.95, 1e-8);
        let (mut m, mut v, mut p) = (0.0, 0.0, p);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t));
            let vh = v / (1.0 - b2.powi(t));
            p = p * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps);
        }
        p
    }

    #[test]
    fn adamw_matches_scalar_reference() -> Result<()> {
        let dev = Device::Cpu;
        let init = [0.5f64, -1.0, 2.0];
        let var = Var::from_tensor(&Tensor::new(&init, &dev)?)?;
        let cfg = AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, vec![("w".into(), var.clone(), true)])?;
        let gs = [[0.3, -0.2, 0.1], [0.1, 0.4, -0.5], [-0.2, 0.0, 0.3]];
        for g in gs {
            // loss = sum(c * w) has gradient c.
            let c = Tensor::new(&g, &dev)?;
            let loss = (var.as_tensor() * &c)?.sum_all()?;
            let grads = loss.backward()?;
            opt.step(&grads, 1e-2)?;
        }
        let got = var.as_tensor().to_vec1::<f64>()?;
        for i in 0..3 {
            let want = scalar_adamw(
                init[i],
                &gs.iter().map(|g| g[i]).collect::<Vec<_>>(),
                1e-2,
                0.1,
            );
            assert!(
                (got[i] - want).abs() < 1e-12,
                "param {i}: {} vs {want}",
                got[i]
            );
        }
        let _ = DType::F64;
        Ok(())
    }

    #[test]
    fn adamw_f32_host_path_matches_scalar_reference() -> Result<()> {
        let dev = Device::Cpu;
        let init = [0.5f32, -1.0, 2.0];
        let var = Var::from_tensor(&Tensor::new(&init, &dev)?)?;
        let cfg = AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, vec![("w".into(), var.clone(), true)])?;
        let gs = [[0.3f32, -0.2, 0.1], [0.1, 0.4, -0.5], [-0.2, 0.0, 0.3]];
        for g in gs {
            let loss = (var.as_tensor() * &Tensor::new(&g, &dev)?)?.sum_all()?;
            opt.step(&loss.backward()?, 1e-2)?;
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        for i in 0..3 {
            let gi: Vec<f64> = gs.iter().map(|g| g[i] as f64).collect();
            let want = scalar_adamw(init[i] as f64, &gi, 1e-2, 0.1);
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "param {i}: {} vs {want}",
                got[i]
            );
        }
        Ok(())
    }

    /// A parameter larger than the host update's chunk (split across threads, with a short
    /// last chunk): every element still follows the scalar formula.
    #[test]
    fn adamw_f32_host_path_is_exact_across_chunks() -> Result<()> {
        let dev = Device::Cpu;
        let n = 40_003usize;
        let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let grad: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos()).collect();
        let var = Var::from_tensor(&Tensor::from_vec(init.clone(), n, &dev)?)?;
        let cfg = AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, vec![("w".into(), var.clone(), true)])?;
        let g = Tensor::from_vec(grad.clone(), n, &dev)?;
        for _ in 0..2 {
            let loss = (var.as_tensor() * &g)?.sum_all()?;
            opt.step(&loss.backward()?, 1e-2)?;
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        for i in [0, 1, 16_383, 16_384, 32_767, 32_768, n - 1] {
            let want = scalar_adamw(init[i] as f64, &[grad[i] as f64; 2], 1e-2, 0.1);
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "element {i}: {} vs {want}",
                got[i]
            );
        }
        Ok(())
    }

    /// The device update (tensor ops, what a GPU run takes) against the host update over
    /// several steps with weight decay, an undecayed group and global-norm clipping: the
    /// same parameters and moments to 1e-6 relative.
    #[test]
    fn adamw_device_update_matches_host_update() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = AdamWConfig {
            lr: 3e-2,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let make = || -> Result<(Vec<Var>, AdamW)> {
            let a: Vec<f32> = (0..300).map(|i| ((i as f32) * 0.37).sin() + 1.5).collect();
            let b: Vec<f32> = (0..7).map(|i| 1.0 + i as f32 * 0.25).collect();
            let va = Var::from_tensor(&Tensor::from_vec(a, (20, 15), &dev)?)?;
            let vb = Var::from_tensor(&Tensor::from_vec(b, 7, &dev)?)?;
            let opt = AdamW::new(
                cfg.clone(),
                vec![
                    ("a".into(), va.clone(), true),
                    ("b".into(), vb.clone(), false),
                ],
            )?;
            Ok((vec![va, vb], opt))
        };
        let (host_vars, mut host) = make()?;
        let (dev_vars, mut device) = make()?;
        let clip = 1.0;
        let mut clipped = 0;
        for step in 0..6 {
            for (vars, opt, path) in [
                (&host_vars, &mut host, UpdatePath::Host),
                (&dev_vars, &mut device, UpdatePath::Device),
            ] {
                // loss = Σ c·w² with step-dependent c: gradients 2·c·w, norm well above
                // the clip on most steps.
                let c = (step as f64 + 1.0) * 0.05;
                let loss = ((vars[0].as_tensor().sqr()?.sum_all()? * c)?
                    + (vars[1].as_tensor().sqr()?.sum_all()? * (2.0 * c))?)?;
                let mut g = loss.backward()?;
                let n = grad_norm(&g, vars)?;
                if n > clip {
                    scale_grads(&mut g, vars, clip / n)?;
                    clipped += usize::from(path == UpdatePath::Host);
                }
                opt.step_with(&g, 1e-2 * (step as f64 + 1.0), path)?;
            }
        }
        assert!(
            clipped >= 3,
            "the test must exercise clipping ({clipped} clipped steps)"
        );
        let close = |what: &str, x: &Tensor, y: &Tensor| -> Result<()> {
            let (x, y) = (
                x.flatten_all()?.to_vec1::<f32>()?,
                y.flatten_all()?.to_vec1::<f32>()?,
            );
            assert_eq!(x.len(), y.len());
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let tol = 1e-6 * b.abs().max(1e-6);
                assert!((a - b).abs() <= tol, "{what}[{i}]: device {a} vs host {b}");
            }
            Ok(())
        };
        for (ph, pd) in host.params.iter().zip(&device.params) {
            close(&ph.name, pd.var.as_tensor(), ph.var.as_tensor())?;
            close("m", &pd.m, &ph.m)?;
            close("v", &pd.v, &ph.v)?;
            // The parameters moved (the comparison is not of untouched values).
            assert_ne!(ph.m.flatten_all()?.to_vec1::<f32>()?[0], 0.0);
        }
        Ok(())
    }

    /// The host update refuses what it cannot read (f64 parameters) with an error.
    #[test]
    fn adamw_host_path_refuses_f64() -> Result<()> {
        let var = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu)?)?;
        let cfg = AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(cfg, vec![("w".into(), var.clone(), false)])?;
        let g = var.as_tensor().sum_all()?.backward()?;
        let e = opt.step_with(&g, 1e-2, UpdatePath::Host).unwrap_err();
        assert!(e.to_string().contains("f32 CPU"), "{e}");
        opt.step_with(&g, 1e-2, UpdatePath::Device)?;
        Ok(())
    }

    /// The fused AdamW that the update takes on CUDA (`mor_kernels::cuda::adamw_step`, whose
    /// CPU body runs the kernel's arithmetic on host tensors) gives the host update's bits,
    /// over three steps with weight decay, so switching a CUDA run to it changes no value.
    #[test]
    fn fused_cuda_adamw_matches_the_host_update_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let w0: Vec<f32> = (0..257).map(|i| ((i as f32) * 0.37).sin()).collect();
        let var = Var::from_tensor(&Tensor::new(w0.as_slice(), &dev)?)?;
        let cfg = AdamWConfig {
            lr: 3e-3,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg.clone(), vec![("w".into(), var.clone(), true)])?;
        let (mut w, mut m, mut v) = (
            var.as_tensor().copy()?,
            var.as_tensor().zeros_like()?,
            var.as_tensor().zeros_like()?,
        );
        for t in 1..=3i32 {
            let lr = 3e-3 * f64::from(t);
            // A gradient that depends on the weights: (w³ summed)' = 3w².
            let g = var.as_tensor().powf(3.0)?.sum_all()?.backward()?;
            let grad = g.get(var.as_tensor()).expect("gradient").copy()?;
            // The mapping the CUDA branch of `step_with` takes.
            let h = fused_hyper(&cfg, t as u64, lr, true);
            (w, m, v) = mor_kernels::cuda::adamw_step(&w, &grad, &m, &v, &h)?;
            opt.step_with(&g, lr, UpdatePath::Host)?;
            let bits = |x: &Tensor| -> Result<Vec<u32>> {
                Ok(x.to_vec1::<f32>()?.iter().map(|f| f.to_bits()).collect())
            };
            assert_eq!(bits(&w)?, bits(var.as_tensor())?, "weights after step {t}");
            assert_eq!(bits(&m)?, bits(&opt.params[0].m)?, "m after step {t}");
            assert_eq!(bits(&v)?, bits(&opt.params[0].v)?, "v after step {t}");
        }
        assert_ne!(var.as_tensor().to_vec1::<f32>()?, w0, "the weights moved");
        Ok(())
    }

    /// The global gradient norm costs one host read, whatever the number of parameters.
    #[test]
    fn grad_norm_reads_the_host_once() -> Result<()> {
        let dev = Device::Cpu;
        let vars: Vec<Var> = (0..5)
            .map(|i| Var::from_tensor(&Tensor::new(&[i as f32, 1.0], &dev)?))
            .collect::<candle_core::Result<_>>()?;
        let mut loss = vars[0].as_tensor().sqr()?.sum_all()?;
        for v in &vars[1..] {
            loss = (loss + v.as_tensor().sqr()?.sum_all()?)?;
        }
        let g = loss.backward()?;
        let scope = mor_kernels::host_sync::Scope::start();
        let n = grad_norm(&g, &vars)?;
        assert_eq!(scope.counts().reads, 1);
        // Gradients 2·w: Σ 4·(i² + 1) over i = 0..5 = 4·(30 + 5) = 140.
        assert!((n - 140f64.sqrt()).abs() < 1e-9, "{n}");
        Ok(())
    }

    #[test]
    fn trapezoid_matches_spec_formula() {
        // spec §1.3: vanilla 360M, 9438 steps, warmup 57, cooldown 1888.
        let s = Schedule::Trapezoid {
            warmup: 57,
            decay: 1888,
            total: 9438,
        };
        assert_eq!(s.lr(0, 3e-3), 0.0);
        assert!((s.lr(28, 3e-3) - 3e-3 * 28.0 / 57.0).abs() < 1e-15);
        assert_eq!(s.lr(57, 3e-3), 3e-3);
        assert_eq!(s.lr(7549, 3e-3), 3e-3);
        let p = 9438 - 1888;
        assert!((s.lr(p + 944, 3e-3) - 3e-3 * (1.0 - 944.0 / 1888.0)).abs() < 1e-15);
        assert!(s.lr(9437, 3e-3) > 0.0 && s.lr(9437, 3e-3) < 3e-3 * 0.001);
    }

    #[test]
    fn cosine_ends_at_floor() {
        let s = Schedule::Cosine {
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert!((s.lr(10, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr(60, 1.0) - 0.55).abs() < 1e-12);
        assert!((s.lr(110, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[3f32], &dev)?)?;
        let c1 = Tensor::new(&[3f32, 4.0], &dev)?;
        let c2 = Tensor::new(&[12f32], &dev)?;
        let loss = ((a.as_tensor() * &c1)?.sum_all()? + (b.as_tensor() * &c2)?.sum_all()?)?;
        let mut g = loss.backward()?;
        let vars = vec![a.clone(), b.clone()];
        let n = grad_norm(&g, &vars)?;
        assert!((n - 13.0).abs() < 1e-5);
        scale_grads(&mut g, &vars, 1.0 / n)?;
        assert!((grad_norm(&g, &vars)? - 1.0).abs() < 1e-6);
        Ok(())
    }
}
