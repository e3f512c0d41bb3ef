//! Fused SwiGLU gate (spec §1.1): `y = silu(g) · u` with `silu(g) = g σ(g)`.
//!
//! Backward: `du = dy · g σ(g)` and `dg = dy · u · σ(g) (1 + g (1 − σ(g)))`.

use super::simd::{multiversion, Float, LANES};
use super::{bail_dtype, fwd_slice, with_slices, PAR_MIN_WORK, PAR_TASK_WORK};
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The SwiGLU op: inputs `gate` and `up` of one shape.
#[derive(Debug)]
pub(crate) struct SwiGluOp;

/// `σ(g)` of each lane.
#[inline(always)]
fn sigmoid_lanes<T: Float, const FMA: bool>(g: &[T]) -> [T; LANES] {
    let mut e = [T::ZERO; LANES];
    for l in 0..LANES {
        e[l] = -g[l];
    }
    T::exp_lanes::<FMA>(&mut e);
    for v in e.iter_mut() {
        *v = T::ONE / (T::ONE + *v);
    }
    e
}

multiversion! {
    pub(super) fn fwd_chunk => fwd_chunk_impl(g: &[T], u: &[T], out: &mut [T])
}

#[inline(always)]
fn fwd_chunk_impl<T: Float, const FMA: bool>(g: &[T], u: &[T], out: &mut [T]) {
    let n = out.len();
    let (g, u) = (&g[..n], &u[..n]);
    let full = n - n % LANES;
    let mut o = 0;
    while o < full {
        let (gl, ul) = (&g[o..o + LANES], &u[o..o + LANES]);
        let s = sigmoid_lanes::<T, FMA>(gl);
        let ol = &mut out[o..o + LANES];
        for l in 0..LANES {
            ol[l] = gl[l] * s[l] * ul[l];
        }
        o += LANES;
    }
    for i in full..n {
        let s = T::ONE / (T::ONE + (-g[i]).exp());
        out[i] = g[i] * s * u[i];
    }
}

multiversion! {
    pub(super) fn bwd_chunk => bwd_chunk_impl(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T])
}

#[inline(always)]
fn bwd_chunk_impl<T: Float, const FMA: bool>(
    g: &[T],
    u: &[T],
    dy: &[T],
    dg: &mut [T],
    du: &mut [T],
) {
    let n = dg.len();
    let (g, u, dy, du) = (&g[..n], &u[..n], &dy[..n], &mut du[..n]);
    let one = T::ONE;
    let full = n - n % LANES;
    let mut o = 0;
    while o < full {
        let (gl, ul, yl) = (&g[o..o + LANES], &u[o..o + LANES], &dy[o..o + LANES]);
        let s = sigmoid_lanes::<T, FMA>(gl);
        let (dgl, dul) = (&mut dg[o..o + LANES], &mut du[o..o + LANES]);
        for l in 0..LANES {
            let silu = gl[l] * s[l];
            dul[l] = yl[l] * silu;
            dgl[l] = yl[l] * ul[l] * (s[l] + silu * (one - s[l]));
        }
        o += LANES;
    }
    for i in full..n {
        let s = one / (one + (-g[i]).exp());
        let silu = g[i] * s;
        du[i] = dy[i] * silu;
        dg[i] = dy[i] * u[i] * (s + silu * (one - s));
    }
}

impl SwiGluOp {
    fn fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
        let mut out = vec![T::ZERO; g.len()];
        if g.len() < PAR_MIN_WORK {
            fwd_chunk(g, u, &mut out);
        } else {
            out.par_chunks_mut(PAR_TASK_WORK)
                .zip(g.par_chunks(PAR_TASK_WORK).zip(u.par_chunks(PAR_TASK_WORK)))
                .for_each(|(o, (g, u))| fwd_chunk(g, u, o));
        }
        out
    }

    fn bwd_typed<T: Float>(
        g: &Tensor,
        u: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = g.elem_count();
        let mut dg = vec![T::ZERO; n];
        let mut du = vec![T::ZERO; n];
        with_slices::<T, _>(&[g, u, dy], |s| {
            let (g, u, dy) = (s[0], s[1], s[2]);
            if n < PAR_MIN_WORK {
                bwd_chunk(g, u, dy, &mut dg, &mut du);
            } else {
                let c = PAR_TASK_WORK;
                dg.par_chunks_mut(c)
                    .zip(du.par_chunks_mut(c))
                    .zip(g.par_chunks(c).zip(u.par_chunks(c)).zip(dy.par_chunks(c)))
                    .for_each(|((dg, du), ((g, u), dy))| bwd_chunk(g, u, dy, dg, du));
            }
            Ok(())
        })?;
        Ok((
            Tensor::from_vec(dg, g.shape(), &Device::Cpu)?,
            Tensor::from_vec(du, u.shape(), &Device::Cpu)?,
        ))
    }
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "mor-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let dims = shape.dims().to_vec();
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::storage(Self::fwd::<f32>(
                fwd_slice(self.name(), s1, l1, &dims)?,
                fwd_slice(self.name(), s2, l2, &dims)?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::storage(Self::fwd::<f64>(
                fwd_slice(self.name(), s1, l1, &dims)?,
                fwd_slice(self.name(), s2, l2, &dims)?,
            )),
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = match g.dtype() {
            candle_core::DType::F32 => Self::bwd_typed::<f32>(g, u, grad)?,
            candle_core::DType::F64 => Self::bwd_typed::<f64>(g, u, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok((g.track_op().then_some(dg), u.track_op().then_some(du)))
    }
}
