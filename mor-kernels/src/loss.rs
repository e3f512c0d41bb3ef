//! Fused next-token cross-entropy with an analytic backward.
//!
//! `mean_i −log softmax(logits_i)[target_i]` over `n` rows of a `[n, V]` logits matrix.
//! Built from candle's ops, log-softmax + gather costs about a dozen `[n, V]` temporaries
//! in the backward pass (every graph node allocates and accumulates its gradient); the
//! fused op keeps one: `∂L/∂logits = (softmax − onehot(target)) / n`.

use crate::cpu::exp_shift_row_f32;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

struct FusedCe;

fn rows_f32(l: &[f32], v: usize, t: &[u32]) -> Vec<(f64, usize)> {
    l.par_chunks(v)
        .zip(t.par_iter())
        .map_init(
            || vec![0f32; v],
            |scratch, (row, &tg)| {
                scratch.copy_from_slice(row);
                let (m, s) = exp_shift_row_f32(scratch);
                (
                    m as f64 + (s as f64).ln() - row[tg as usize] as f64,
                    tg as usize,
                )
            },
        )
        .collect()
}

fn rows_f64(l: &[f64], v: usize, t: &[u32]) -> Vec<(f64, usize)> {
    l.par_chunks(v)
        .zip(t.par_iter())
        .map(|(row, &tg)| {
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|&x| (x - m).exp()).sum();
            (m + s.ln() - row[tg as usize], tg as usize)
        })
        .collect()
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused cross-entropy needs contiguous inputs"),
    }
}

impl CustomOp2 for FusedCe {
    fn name(&self) -> &'static str {
        "mor-fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = match s2 {
            CpuStorage::U32(t) => contiguous(t, l2)?,
            _ => candle_core::bail!("fused cross-entropy: targets must be u32"),
        };
        if t.len() != n {
            candle_core::bail!("fused cross-entropy: {} targets for {n} rows", t.len());
        }
        if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
            candle_core::bail!(
                "fused cross-entropy: target {bad} is outside the vocabulary of {v}"
            );
        }
        let per_row = match s1 {
            CpuStorage::F32(l) => rows_f32(contiguous(l, l1)?, v, t),
            CpuStorage::F64(l) => rows_f64(contiguous(l, l1)?, v, t),
            _ => candle_core::bail!("fused cross-entropy: logits must be f32 or f64"),
        };
        let mean = per_row.iter().map(|r| r.0).sum::<f64>() / n.max(1) as f64;
        let out = match s1 {
            CpuStorage::F64(_) => CpuStorage::F64(vec![mean]),
            _ => CpuStorage::F32(vec![mean as f32]),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? / n.max(1) as f64;
        let t = targets.to_vec1::<u32>()?;
        let out = match logits.dtype() {
            DType::F32 => {
                // Reads the logits in place (no host copy of the [n, V] matrix).
                let logits = logits.contiguous()?;
                let (storage, layout) = logits.storage_and_layout();
                let l = match &*storage {
                    candle_core::Storage::Cpu(CpuStorage::F32(l)) => contiguous(l, layout)?,
                    _ => candle_core::bail!("fused cross-entropy: expected f32 CPU logits"),
                };
                let mut d = vec![0f32; n * v];
                d.par_chunks_mut(v)
                    .zip(l.par_chunks(v))
                    .zip(t.par_iter())
                    .for_each(|((dr, row), &tg)| {
                        dr.copy_from_slice(row);
                        let (_, s) = exp_shift_row_f32(dr);
                        let k = (g as f32) / s;
                        for o in dr.iter_mut() {
                            *o *= k;
                        }
                        dr[tg as usize] -= g as f32;
                    });
                Tensor::from_vec(d, (n, v), logits.device())?
            }
            DType::F64 => {
                let l = logits.flatten_all()?.to_vec1::<f64>()?;
                let mut d = vec![0f64; n * v];
                d.par_chunks_mut(v)
                    .zip(l.par_chunks(v))
                    .zip(t.par_iter())
                    .for_each(|((dr, row), &tg)| {
                        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let mut s = 0f64;
                        for (o, &x) in dr.iter_mut().zip(row) {
                            *o = (x - m).exp();
                            s += *o;
                        }
                        for o in dr.iter_mut() {
                            *o *= g / s;
                        }
                        dr[tg as usize] -= g;
                    });
                Tensor::from_vec(d, (n, v), logits.device())?
            }
            dt => candle_core::bail!("fused cross-entropy: unsupported dtype {dt:?}"),
        };
        Ok((Some(out), None))
    }
}

/// Mean cross-entropy of `logits: [n, V]` against `targets: [n]` (u32). Fused on CPU
/// (f32/f64); plain candle ops elsewhere.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, FusedCe)
    } else {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = logp.gather(&targets.unsqueeze(1)?.contiguous()?, 1)?;
        picked.mean_all()? * -1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn reference(logits: &Tensor, targets: &Tensor) -> Tensor {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
        let picked = logp
            .gather(&targets.unsqueeze(1).unwrap().contiguous().unwrap(), 1)
            .unwrap();
        (picked.mean_all().unwrap() * -1.0).unwrap()
    }

    #[test]
    fn matches_candle_ops_and_finite_differences() {
        let dev = Device::Cpu;
        let mut r = mor_core::rng::Rng::new(3);
        let (n, v) = (5usize, 37usize); // rows span full SIMD lanes and a remainder
        let data: Vec<f64> = (0..n * v).map(|_| r.normal() * 2.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(data.clone(), (n, v), &dev).unwrap()).unwrap();
        let t = Tensor::from_vec(
            (0..n as u32)
                .map(|i| (i * 3) % v as u32)
                .collect::<Vec<_>>(),
            n,
            &dev,
        )
        .unwrap();
        let a = cross_entropy(x.as_tensor(), &t).unwrap();
        let b = reference(x.as_tensor(), &t);
        let (a0, b0) = (a.to_scalar::<f64>().unwrap(), b.to_scalar::<f64>().unwrap());
        assert!((a0 - b0).abs() < 1e-12, "{a0} vs {b0}");
        let grad = |loss: &Tensor| {
            loss.backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (ga, gb) = (grad(&a), grad(&b));
        for i in 0..n * v {
            assert!(
                (ga[i] - gb[i]).abs() < 1e-12,
                "grad {i}: {} vs {}",
                ga[i],
                gb[i]
            );
            // Central finite difference of the fused forward.
            let eps = 1e-6;
            let mut p = data.clone();
            p[i] += eps;
            let lp = cross_entropy(&Tensor::from_vec(p.clone(), (n, v), &dev).unwrap(), &t)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            p[i] -= 2.0 * eps;
            let lm = cross_entropy(&Tensor::from_vec(p, (n, v), &dev).unwrap(), &t)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let num = (lp - lm) / (2.0 * eps);
            assert!((num - ga[i]).abs() < 1e-8, "fd {i}: {num} vs {}", ga[i]);
        }
        // f32 agrees with f64 within f32 tolerance.
        let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
        let c = cross_entropy(&x32, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!((c as f64 - a0).abs() < 1e-5);
        // ... and so does its gradient (the vectorised f32 softmax of the backward pass).
        let v32 = Var::from_tensor(&x32).unwrap();
        let g32 = cross_entropy(v32.as_tensor(), &t)
            .unwrap()
            .backward()
            .unwrap()
            .get(v32.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..n * v {
            assert!((g32[i] as f64 - ga[i]).abs() < 1e-6, "f32 grad {i}");
        }
        // A target outside the vocabulary is an error, not a panic.
        let bad = Tensor::from_vec(vec![0u32, 1, 2, 3, 99], n, &dev).unwrap();
        assert!(cross_entropy(x.as_tensor(), &bad).is_err());
    }
}
