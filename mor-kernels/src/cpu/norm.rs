//! Fused RMSNorm (spec §1.1): `y = x · r · w` with `r = 1 / sqrt(mean(x²) + eps)` per row.
//!
//! Backward, per row with `c = Σ_k w_k g_k x_k`:
//! `dx = r · w ⊙ g − x · r³ c / d` and `dw = Σ_rows r · g ⊙ x`.

use super::simd::{dot, fma, hsum, multiversion, Float, LANES};
use super::{bail_dtype, fwd_slice, rows_per_task, with_slices, PAR_MIN_WORK};
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The RMSNorm op: inputs `x: [.., d]` and `w: [d]`.
#[derive(Debug)]
pub(crate) struct RmsNormOp {
    pub(crate) eps: f64,
    pub(crate) rows: usize,
    pub(crate) d: usize,
}

#[inline(always)]
fn inv_rms<T: Float, const FMA: bool>(x: &[T], eps: T, inv_d: T) -> T {
    T::ONE / (dot::<T, FMA>(x, x) * inv_d + eps).sqrt()
}

multiversion! {
    pub(super) fn rows_fwd => rows_fwd_impl(x: &[T], w: &[T], eps: T, d: usize, out: &mut [T])
}

#[inline(always)]
fn rows_fwd_impl<T: Float, const FMA: bool>(x: &[T], w: &[T], eps: T, d: usize, out: &mut [T]) {
    let inv_d = T::ONE / T::from_f64(d as f64);
    let w = &w[..d];
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let r = inv_rms::<T, FMA>(xr, eps, inv_d);
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * r * wv;
        }
    }
}

multiversion! {
    pub(super) fn rows_bwd => rows_bwd_impl(x: &[T], w: &[T], g: &[T], eps: T, d: usize, dx: &mut [T], dw: &mut [T])
}

#[inline(always)]
fn rows_bwd_impl<T: Float, const FMA: bool>(
    x: &[T],
    w: &[T],
    g: &[T],
    eps: T,
    d: usize,
    dx: &mut [T],
    dw: &mut [T],
) {
    let inv_d = T::ONE / T::from_f64(d as f64);
    let (w, dw) = (&w[..d], &mut dw[..d]);
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (xr, gr, dxr) = (&xr[..d], &gr[..d], &mut dxr[..d]);
        let r = inv_rms::<T, FMA>(xr, eps, inv_d);
        // c = Σ w g x, with lane accumulators so that it vectorises.
        let mut acc = [T::ZERO; LANES];
        let full = d - d % LANES;
        let mut o = 0;
        while o < full {
            for l in 0..LANES {
                acc[l] = fma::<T, FMA>(w[o + l] * gr[o + l], xr[o + l], acc[l]);
            }
            o += LANES;
        }
        let mut c = hsum(acc);
        for k in full..d {
            c = fma::<T, FMA>(w[k] * gr[k], xr[k], c);
        }
        let coef = r * r * r * c * inv_d;
        for k in 0..d {
            dxr[k] = fma::<T, FMA>(r * w[k], gr[k], -(xr[k] * coef));
            dw[k] = fma::<T, FMA>(r * gr[k], xr[k], dw[k]);
        }
    }
}

impl RmsNormOp {
    fn fwd<T: Float>(&self, x: &[T], w: &[T]) -> candle_core::Result<Vec<T>> {
        let d = self.d;
        let mut out = vec![T::ZERO; x.len()];
        if out.is_empty() {
            return Ok(out);
        }
        let eps = T::from_f64(self.eps);
        let chunk = rows_per_task(self.rows, d) * d;
        if x.len() < PAR_MIN_WORK {
            rows_fwd(x, w, eps, d, &mut out);
        } else {
            out.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(o, x)| rows_fwd(x, w, eps, d, o));
        }
        Ok(out)
    }

    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.d;
        let eps = T::from_f64(self.eps);
        let mut dx = vec![T::ZERO; self.rows * d];
        let dw = with_slices::<T, _>(&[x, w, g], |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            if dx.is_empty() {
                return Ok(vec![T::ZERO; d]);
            }
            let chunk = rows_per_task(self.rows, d) * d;
            if x.len() < PAR_MIN_WORK {
                let mut dw = vec![T::ZERO; d];
                rows_bwd(x, w, g, eps, d, &mut dx, &mut dw);
                return Ok(dw);
            }
            Ok(dx
                .par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .map(|(dx, (x, g))| {
                    let mut dw = vec![T::ZERO; d];
                    rows_bwd(x, w, g, eps, d, dx, &mut dw);
                    dw
                })
                .reduce(
                    || vec![T::ZERO; d],
                    |mut a, b| {
                        for (a, b) in a.iter_mut().zip(b) {
                            *a += b;
                        }
                        a
                    },
                ))
        })?;
        Ok((
            Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(dw, d, &Device::Cpu)?,
        ))
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "mor-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let n = shape.elem_count();
        let (xs, ws) = (shape.dims().to_vec(), [self.d]);
        if n != self.rows * self.d {
            candle_core::bail!(
                "{}: x has {n} elements, expected {} rows of {}",
                self.name(),
                self.rows,
                self.d
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::storage(self.fwd(
                fwd_slice::<f32>(self.name(), s1, l1, &xs)?,
                fwd_slice(self.name(), s2, l2, &ws)?,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::storage(self.fwd(
                fwd_slice::<f64>(self.name(), s1, l1, &xs)?,
                fwd_slice(self.name(), s2, l2, &ws)?,
            )?),
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(x, w, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(x, w, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw)))
    }
}
