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
//! The products themselves run through candle's CPU matmul (the `gemm` crate).

use super::simd::Float;
use super::{bail_dtype, fwd_slice, rows_per_task, PAR_MIN_WORK};
use crate::validate::{HeadDims, LinearDims};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
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
        if !l1.is_contiguous() || !l2.is_contiguous() {
            candle_core::bail!("{}: inputs must be contiguous", self.name());
        }
        if l2.dims() != [out, inp] || l1.shape().elem_count() != rows * inp {
            candle_core::bail!(
                "{}: got x {:?} and w {:?}, expected {rows}×{inp} and [{out}, {inp}]",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let lhs = Layout::contiguous_with_offset((rows, inp), l1.start_offset());
        let rhs = Layout::contiguous_with_offset((out, inp), l2.start_offset()).transpose(0, 1)?;
        let y = s1.matmul(s2, (1, rows, out, inp), &lhs, &rhs)?;
        Ok((y, Shape::from(self.out_shape.clone())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let LinearDims { rows, inp, out } = self.d;
        let g = grad.contiguous()?.reshape((rows, out))?;
        let dx = if x.track_op() {
            Some(g.matmul(&w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(g.t()?.matmul(&x.detach().reshape((rows, inp))?)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}
