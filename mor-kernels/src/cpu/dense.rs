//! Linear layers and head layout changes as single differentiable ops.
//!
//! In candle's autograd every node of the graph costs, on the way back, one zero-filled
//! gradient buffer plus one addition into it. A projection written as
//! `reshape → matmul(wᵀ) → reshape → transpose → contiguous` therefore pays five such
//! passes over the activations for what is one matrix product. The ops here collapse each
//! chain into one node:
//!
//! - [`LinearOp`]: `x @ wᵀ` for `x: [.., in]`, `w: [out, in]`; backward `dx = g w`,
//!   `dw = gᵀ x` (two products, no transposed copies).
//! - [`HeadsOp`]: `[b, t, h·dh] ↔ [b, h, t, dh]`, whose backward is the inverse
//!   permutation.
//!
//! The products run on the `gemm` crate (the one candle's CPU matmul uses) with strided
//! operands, so no transposed copy is made.

use super::block::{act_new, matmul_new, matmul_new_pair, Mat};
use super::gemm::Prec;
use super::simd::Float;
use super::{bail_dtype, fwd_slice, rows_per_task, with_slices, PAR_MIN_WORK};
use crate::validate::{HeadDims, LinearDims};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `out[b, j, i] = src[b, i, j]` over rows of `dh` elements: swaps the two middle axes of a
/// `[b, x, y, dh]` array.
pub(crate) fn swap_middle<T: Float>(src: &[T], b: usize, x: usize, y: usize, dh: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; src.len()];
    let rows = b * x * y;
    if rows == 0 || dh == 0 {
        return out;
    }
    let fill = |first: usize, o: &mut [T]| {
        for (k, row) in o.chunks_exact_mut(dh).enumerate() {
            let r = first + k;
            let (bi, rem) = (r / (x * y), r % (x * y));
            let (yi, xi) = (rem / x, rem % x);
            let s = ((bi * x + xi) * y + yi) * dh;
            row.copy_from_slice(&src[s..s + dh]);
        }
    };
    if src.len() < PAR_MIN_WORK {
        fill(0, &mut out);
    } else {
        let per = rows_per_task(rows, dh);
        out.par_chunks_mut(per * dh)
            .enumerate()
            .for_each(|(c, o)| fill(c * per, o));
    }
    out
}

/// Splits (`[b, t, h·dh] → [b, h, t, dh]`) or merges (the inverse) attention heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadsOp {
    pub(crate) d: HeadDims,
    /// `true`: `[b, h, t, dh] → [b, t, h·dh]`.
    pub(crate) merge: bool,
}

impl HeadsOp {
    /// Input dims, output dims and the `(x, y)` of [`swap_middle`].
    fn plan(&self) -> (Vec<usize>, Vec<usize>, usize, usize) {
        let HeadDims { b, t, h, dh } = self.d;
        if self.merge {
            (vec![b, h, t, dh], vec![b, t, h * dh], h, t)
        } else {
            (vec![b, t, h * dh], vec![b, h, t, dh], t, h)
        }
    }

    /// Runs the permutation on a host slice laid out as this op's input.
    pub(crate) fn apply<T: Float>(&self, src: &[T]) -> Vec<T> {
        let (_, _, x, y) = self.plan();
        swap_middle(src, self.d.b, x, y, self.d.dh)
    }

    fn inverse(&self) -> Self {
        HeadsOp {
            d: self.d,
            merge: !self.merge,
        }
    }
}

impl CustomOp1 for HeadsOp {
    fn name(&self) -> &'static str {
        if self.merge {
            "mor-merge-heads"
        } else {
            "mor-split-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ins, outs, _, _) = self.plan();
        let out = match s {
            CpuStorage::F32(_) => {
                f32::storage(self.apply(fwd_slice::<f32>(self.name(), s, l, &ins)?))
            }
            CpuStorage::F64(_) => {
                f64::storage(self.apply(fwd_slice::<f64>(self.name(), s, l, &ins)?))
            }
            _ => return Err(bail_dtype(self.name(), s)),
        };
        Ok((out, Shape::from(outs)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.inverse())?))
    }
}

/// `x @ wᵀ` with `x: [.., in]` (contiguous), `w: [out, in]` (contiguous).
#[derive(Debug, Clone)]
pub(crate) struct LinearOp {
    pub(crate) d: LinearDims,
    /// Shape of the output: the leading dims of `x`, then `out`.
    pub(crate) out_shape: Vec<usize>,
    /// Precision of the products.
    pub(crate) prec: Prec,
}

impl LinearOp {
    fn fwd<T: Float>(&self, x: &[T], w: &[T]) -> candle_core::Result<Vec<T>> {
        let LinearDims { rows, inp, out } = self.d;
        matmul_new(
            self.prec,
            (rows, out, inp),
            Mat::rows(x, inp),
            Mat::rows_t(w, inp),
        )
    }

    /// `(dx, dw) = (g · w, gᵀ · x)`.
    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let LinearDims { rows, inp, out } = self.d;
        let (dx, dw) = with_slices::<T, _>(&[x, w, g], |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            matmul_new_pair(
                self.prec,
                ((rows, inp, out), Mat::rows(g, out), Mat::rows(w, inp)),
                ((out, inp, rows), Mat::rows_t(g, out), Mat::rows(x, inp)),
            )
        })?;
        Ok((
            Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(dw, w.shape(), &Device::Cpu)?,
        ))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "mor-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let LinearDims { rows, inp, out } = self.d;
        if l1.shape().elem_count() != rows * inp {
            candle_core::bail!(
                "{}: got x {:?}, expected {rows}×{inp} elements",
                self.name(),
                l1.dims()
            );
        }
        let xd = l1.dims().to_vec();
        let y = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::storage(self.fwd(
                fwd_slice::<f32>(self.name(), s1, l1, &xd)?,
                fwd_slice::<f32>(self.name(), s2, l2, &[out, inp])?,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::storage(self.fwd(
                fwd_slice::<f64>(self.name(), s1, l1, &xd)?,
                fwd_slice::<f64>(self.name(), s2, l2, &[out, inp])?,
            )?),
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        Ok((y, Shape::from(self.out_shape.clone())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() && !w.track_op() {
            return Ok((None, None));
        }
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(x, w, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(x, w, grad)?,
            other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw)))
    }
}

/// What the forward pass of [`LinearCeOp`] keeps: per row, `exp(logit − max)` in place of
/// the logits, and `1 / Σ exp(logit − max)`.
struct CeSaved<T> {
    e: Vec<T>,
    inv_sum: Vec<T>,
}

/// The language-model head and its cross-entropy as one op: inputs `x: [n, d]`,
/// `w: [V, d]`, `targets: [n]` (u32) → the mean of `logsumexp(x wᵀ)_i − (x wᵀ)_{i, t_i}`.
///
/// Forward: one product for the logits, then per row (in parallel) the target logit, the
/// max, `exp(logit − max)` in place and its sum. Backward: the kept exponentials become
/// `dlogits = (softmax − onehot) · g / n` in place, and `dx = dlogits · w`,
/// `dw = dlogitsᵀ · x` run side by side. The logits and their gradient never enter candle's
/// graph, which would zero-fill and accumulate a `[n, V]` gradient buffer on the calling
/// thread.
#[derive(Debug)]
pub(crate) struct LinearCeOp {
    pub(crate) d: LinearDims,
    keep: bool,
    /// Precision of the products (the softmax and the loss stay in the tensors' dtype).
    prec: Prec,
    saved: std::sync::Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>,
}

impl LinearCeOp {
    pub(crate) fn new(d: LinearDims, keep: bool) -> Self {
        LinearCeOp {
            d,
            keep,
            prec: Prec::F32,
            saved: std::sync::Mutex::new(None),
        }
    }

    /// The same op with products in `prec`.
    pub(crate) fn with_prec(mut self, prec: Prec) -> Self {
        self.prec = prec;
        self
    }

    /// The per-row losses (f64) and what the backward pass needs.
    fn fwd<T: Float>(&self, x: &[T], w: &[T], t: &[u32]) -> candle_core::Result<(f64, CeSaved<T>)> {
        let LinearDims { rows, inp, out } = self.d;
        let mut e = matmul_new(
            self.prec,
            (rows, out, inp),
            Mat::rows(x, inp),
            Mat::rows_t(w, inp),
        )?;
        let per_row: Vec<(f64, T)> = if out == 0 {
            vec![(f64::NAN, T::ZERO); rows]
        } else {
            e.par_chunks_mut(out)
                .zip(t.par_iter())
                .with_min_len(16)
                .map(|(row, &tg)| {
                    let lt = row[tg as usize];
                    let (m, s) = super::exp_shift_row(row);
                    let loss = m.to_f64() + s.to_f64().ln() - lt.to_f64();
                    (loss, T::ONE / s)
                })
                .collect()
        };
        let total = per_row.iter().map(|r| r.0).sum::<f64>();
        let inv_sum = per_row.into_iter().map(|r| r.1).collect();
        Ok((total / rows.max(1) as f64, CeSaved { e, inv_sum }))
    }

    /// `(dx, dw)` for the upstream gradient `g` of the mean loss.
    fn bwd_slices<T: Float>(
        &self,
        (x, w, t): (&[T], &[T], &[u32]),
        g: f64,
        mut s: CeSaved<T>,
    ) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let LinearDims { rows, inp, out } = self.d;
        let k = g / rows.max(1) as f64;
        if self.prec == Prec::Bf16 && out > 0 {
            // The logits' gradient feeds bf16 products only: written rounded to bf16 (the
            // same values, rounded where the products' packing would round them).
            let (e, inv_sum) = (&s.e, &s.inv_sum);
            let dl = act_new(true, rows, out, |r0, blk| {
                for (i, row) in blk.chunks_exact_mut(out).enumerate() {
                    let r = r0 + i;
                    let c = T::from_f64(k) * inv_sum[r];
                    for (o, &v) in row.iter_mut().zip(&e[r * out..(r + 1) * out]) {
                        *o = v * c;
                    }
                    row[t[r] as usize] -= T::from_f64(k);
                }
            });
            drop(s);
            return matmul_new_pair(
                self.prec,
                ((rows, inp, out), dl.rows(out), Mat::rows(w, inp)),
                ((out, inp, rows), dl.rows_t(out), Mat::rows(x, inp)),
            );
        }
        if out > 0 {
            s.e.par_chunks_mut(out)
                .zip(t.par_iter().zip(s.inv_sum.par_iter()))
                .with_min_len(16)
                .for_each(|(row, (&tg, &inv))| {
                    let c = T::from_f64(k) * inv;
                    for v in row.iter_mut() {
                        *v *= c;
                    }
                    row[tg as usize] -= T::from_f64(k);
                });
        }
        let dl = &s.e;
        matmul_new_pair(
            self.prec,
            ((rows, inp, out), Mat::rows(dl, out), Mat::rows(w, inp)),
            ((out, inp, rows), Mat::rows_t(dl, out), Mat::rows(x, inp)),
        )
    }

    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        g: f64,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        let saved = super::block::take_saved::<CeSaved<T>>(&self.saved);
        let (dx, dw) = with_slices::<T, _>(&[x, w], |s| {
            let saved = match saved {
                Some(b) => b,
                // Taken by an earlier backward pass through the same graph: recompute.
                None => self.fwd(s[0], s[1], &t)?.1,
            };
            self.bwd_slices((s[0], s[1], &t), g, saved)
        })?;
        Ok((
            Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(dw, w.shape(), &Device::Cpu)?,
        ))
    }
}

impl candle_core::CustomOp3 for LinearCeOp {
    fn name(&self) -> &'static str {
        "mor-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let LinearDims { rows, inp, out } = self.d;
        let t = match s3 {
            CpuStorage::U32(t) => match l3.contiguous_offsets() {
                Some((a, b)) if b - a == rows && b <= t.len() => &t[a..b],
                _ => candle_core::bail!("{}: targets must be {rows} contiguous u32", self.name()),
            },
            _ => candle_core::bail!("{}: targets must be u32", self.name()),
        };
        if let Some(bad) = t.iter().find(|&&v| v as usize >= out) {
            candle_core::bail!(
                "{}: target {bad} is outside the vocabulary of {out}",
                self.name()
            );
        }
        let loss = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (loss, saved) = self.fwd(
                    fwd_slice::<f32>(self.name(), s1, l1, &[rows, inp])?,
                    fwd_slice::<f32>(self.name(), s2, l2, &[out, inp])?,
                    t,
                )?;
                if self.keep {
                    *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
                }
                CpuStorage::F32(vec![loss as f32])
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (loss, saved) = self.fwd(
                    fwd_slice::<f64>(self.name(), s1, l1, &[rows, inp])?,
                    fwd_slice::<f64>(self.name(), s2, l2, &[out, inp])?,
                    t,
                )?;
                if self.keep {
                    *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
                }
                CpuStorage::F64(vec![loss])
            }
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() && !w.track_op() {
            return Ok((None, None, None));
        }
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(x, w, targets, g)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(x, w, targets, g)?,
            other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw), None))
    }
}
