//! Token routing of a recursion step (spec §3.1 pseudocode): gather the selected rows, and
//! the weighted scatter-add `h[sel] += g · y` back into the full hidden state.
//!
//! Gradients: gather scatters `dout` back (adding, so repeated indices are handled);
//! scatter-add gives `dh = dout`, `dy[b, i] = w[b, i] · dout[b, idx[b, i]]` and
//! `dw[b, i] = dout[b, idx[b, i]] · y[b, i]`.

use super::simd::{axpy, dot, multiversion, Float};
use super::{bail_dtype, fwd_slice, with_slices, PAR_MIN_WORK};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The gather op: input `h: [b, l, d]`, indices `[b, k]` on the host.
#[derive(Debug)]
pub(crate) struct GatherOp {
    pub(crate) b: usize,
    pub(crate) l: usize,
    pub(crate) d: usize,
    pub(crate) k: usize,
    pub(crate) idx: Vec<u32>,
}

impl GatherOp {
    fn fwd<T: Float>(&self, h: &[T]) -> Vec<T> {
        let (l, d, k) = (self.l, self.d, self.k);
        let mut out = vec![T::ZERO; self.b * k * d];
        if out.is_empty() {
            return out;
        }
        let task = |(bi, o): (usize, &mut [T])| {
            for (i, orow) in o.chunks_exact_mut(d).enumerate() {
                let src = (bi * l + self.idx[bi * k + i] as usize) * d;
                orow.copy_from_slice(&h[src..src + d]);
            }
        };
        if out.len() < PAR_MIN_WORK {
            out.chunks_mut(k * d).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(k * d).enumerate().for_each(task);
        }
        out
    }

    /// `dh[b, idx[b, i]] += g[b, i]`.
    fn bwd_typed<T: Float>(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d, k) = (self.b, self.l, self.d, self.k);
        let mut dh = vec![T::ZERO; b * l * d];
        with_slices::<T, _>(&[g], |s| {
            let g = s[0];
            if dh.is_empty() || k == 0 {
                return Ok(());
            }
            let task = |(bi, dhb): (usize, &mut [T])| {
                for i in 0..k {
                    let dst = self.idx[bi * k + i] as usize * d;
                    let src = (bi * k + i) * d;
                    for (x, &y) in dhb[dst..dst + d].iter_mut().zip(&g[src..src + d]) {
                        *x += y;
                    }
                }
            };
            if b * k * d < PAR_MIN_WORK {
                dh.chunks_mut(l * d).enumerate().for_each(task);
            } else {
                dh.par_chunks_mut(l * d).enumerate().for_each(task);
            }
            Ok(())
        })?;
        Tensor::from_vec(dh, (b, l, d), &Device::Cpu)
    }
}

impl CustomOp1 for GatherOp {
    fn name(&self) -> &'static str {
        "mor-gather-tokens"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let hs = [self.b, self.l, self.d];
        let out = match s {
            CpuStorage::F32(_) => f32::storage(self.fwd(fwd_slice::<f32>(self.name(), s, l, &hs)?)),
            CpuStorage::F64(_) => f64::storage(self.fwd(fwd_slice::<f64>(self.name(), s, l, &hs)?)),
            _ => return Err(bail_dtype(self.name(), s)),
        };
        Ok((out, Shape::from((self.b, self.k, self.d))))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !h.track_op() {
            return Ok(None);
        }
        Ok(Some(match h.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }))
    }
}

/// The weighted scatter-add op: inputs `h: [b, l, d]`, `y: [b, k, d]` and optionally
/// `w: [b, k]` (applied as a [`CustomOp3`] with `w`, or a [`CustomOp2`] without), indices on
/// the host.
#[derive(Debug)]
pub(crate) struct ScatterAddOp {
    pub(crate) b: usize,
    pub(crate) l: usize,
    pub(crate) d: usize,
    pub(crate) k: usize,
    pub(crate) idx: Vec<u32>,
}

multiversion! {
    /// Adds `w[i] * y[i]` into row `idx[i]` of one batch row `out: [l, d]`.
    fn scatter_row => scatter_row_impl(out: &mut [T], idx: &[u32], y: &[T], w: Option<&[T]>, d: usize)
}

#[inline(always)]
fn scatter_row_impl<T: Float, const FMA: bool>(
    out: &mut [T],
    idx: &[u32],
    y: &[T],
    w: Option<&[T]>,
    d: usize,
) {
    for (i, &j) in idx.iter().enumerate() {
        let dst = j as usize * d;
        let wi = w.map_or(T::ONE, |w| w[i]);
        axpy::<T, FMA>(wi, &y[i * d..(i + 1) * d], &mut out[dst..dst + d]);
    }
}

multiversion! {
    /// Gradients of `y` and `w` for one batch row: `dy[i] = w[i] g[idx[i]]`,
    /// `dw[i] = g[idx[i]] · y[i]`.
    fn scatter_bwd_row => scatter_bwd_row_impl(
        g: &[T], idx: &[u32], y: &[T], w: Option<&[T]>, d: usize, dy: &mut [T], dw: &mut [T],
    )
}

#[inline(always)]
fn scatter_bwd_row_impl<T: Float, const FMA: bool>(
    g: &[T],
    idx: &[u32],
    y: &[T],
    w: Option<&[T]>,
    d: usize,
    dy: &mut [T],
    dw: &mut [T],
) {
    for (i, &j) in idx.iter().enumerate() {
        let gr = &g[j as usize * d..(j as usize + 1) * d];
        let wi = w.map_or(T::ONE, |w| w[i]);
        for (o, &x) in dy[i * d..(i + 1) * d].iter_mut().zip(gr) {
            *o = wi * x;
        }
        if w.is_some() {
            dw[i] = dot::<T, FMA>(gr, &y[i * d..(i + 1) * d]);
        }
    }
}

impl ScatterAddOp {
    fn fwd<T: Float>(&self, h: &[T], y: &[T], w: Option<&[T]>) -> Vec<T> {
        let (l, d, k) = (self.l, self.d, self.k);
        let mut out = h.to_vec();
        if out.is_empty() || k == 0 {
            return out;
        }
        let task = |(bi, o): (usize, &mut [T])| {
            let w = w.map(|w| &w[bi * k..(bi + 1) * k]);
            scatter_row(
                o,
                &self.idx[bi * k..(bi + 1) * k],
                &y[bi * k * d..(bi + 1) * k * d],
                w,
                d,
            );
        };
        if self.b * k * d < PAR_MIN_WORK {
            out.chunks_mut(l * d).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(l * d).enumerate().for_each(task);
        }
        out
    }

    /// `(dy, dw)`; `dw` is `None` when there is no `w`.
    fn bwd_typed<T: Float>(
        &self,
        y: &Tensor,
        w: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (b, l, d, k) = (self.b, self.l, self.d, self.k);
        let mut dy = vec![T::ZERO; b * k * d];
        let mut dw = vec![T::ZERO; b * k];
        let mut inputs = vec![g, y];
        inputs.extend(w);
        with_slices::<T, _>(&inputs, |s| {
            let (g, y, w) = (s[0], s[1], s.get(2).copied());
            if dy.is_empty() {
                return Ok(());
            }
            let task = |(bi, (dyb, dwb)): (usize, (&mut [T], &mut [T]))| {
                let w = w.map(|w| &w[bi * k..(bi + 1) * k]);
                let (idx, yb) = (
                    &self.idx[bi * k..(bi + 1) * k],
                    &y[bi * k * d..(bi + 1) * k * d],
                );
                scatter_bwd_row(&g[bi * l * d..(bi + 1) * l * d], idx, yb, w, d, dyb, dwb);
            };
            if b * k * d < PAR_MIN_WORK {
                dy.chunks_mut(k * d)
                    .zip(dw.chunks_mut(k))
                    .enumerate()
                    .for_each(task);
            } else {
                dy.par_chunks_mut(k * d)
                    .zip(dw.par_chunks_mut(k))
                    .enumerate()
                    .for_each(task);
            }
            Ok(())
        })?;
        let dev = Device::Cpu;
        let dy = Tensor::from_vec(dy, (b, k, d), &dev)?;
        let dw = match w {
            Some(_) => Some(Tensor::from_vec(dw, (b, k), &dev)?),
            None => None,
        };
        Ok((dy, dw))
    }

    fn fwd_storage(
        &self,
        (sh, lh): (&CpuStorage, &Layout),
        (sy, ly): (&CpuStorage, &Layout),
        w: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "mor-scatter-add-tokens";
        let (hs, ys, ws) = (
            [self.b, self.l, self.d],
            [self.b, self.k, self.d],
            [self.b, self.k],
        );
        let out = match (sh, sy) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let w = w
                    .map(|(s, l)| fwd_slice::<f32>(name, s, l, &ws))
                    .transpose()?;
                f32::storage(self.fwd(
                    fwd_slice(name, sh, lh, &hs)?,
                    fwd_slice(name, sy, ly, &ys)?,
                    w,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let w = w
                    .map(|(s, l)| fwd_slice::<f64>(name, s, l, &ws))
                    .transpose()?;
                f64::storage(self.fwd(
                    fwd_slice(name, sh, lh, &hs)?,
                    fwd_slice(name, sy, ly, &ys)?,
                    w,
                ))
            }
            _ => return Err(bail_dtype(name, sh)),
        };
        Ok((out, Shape::from(hs.to_vec())))
    }

    fn bwd_any(
        &self,
        h: &Tensor,
        y: &Tensor,
        w: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let dh = h.track_op().then(|| grad.clone());
        if !y.track_op() && !w.is_some_and(|w| w.track_op()) {
            return Ok([dh, None, None]);
        }
        let (dy, dw) = match h.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(y, w, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(y, w, grad)?,
            dt => candle_core::bail!("mor-scatter-add-tokens: unsupported dtype {dt:?}"),
        };
        let dw = dw.filter(|_| w.is_some_and(|w| w.track_op()));
        Ok([dh, y.track_op().then_some(dy), dw])
    }
}

impl CustomOp2 for ScatterAddOp {
    fn name(&self) -> &'static str {
        "mor-scatter-add-tokens"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd_storage((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        h: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [dh, dy, _] = self.bwd_any(h, y, None, grad)?;
        Ok((dh, dy))
    }
}

impl CustomOp3 for ScatterAddOp {
    fn name(&self) -> &'static str {
        "mor-scatter-add-tokens"
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
        self.fwd_storage((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        y: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dh, dy, dw] = self.bwd_any(h, y, Some(w), grad)?;
        Ok((dh, dy, dw))
    }
}
