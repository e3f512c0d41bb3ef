//! Fused RoPE at gathered positions, HF "rotate_half" form (spec §1.1).
//!
//! With `x = [x1, x2]` split in halves and `c, s` the table rows at the token's position:
//! `y1 = x1 c − x2 s`, `y2 = x2 c + x1 s`. The map is a rotation, so its gradient is the
//! inverse rotation (`s → −s`). Rows at `PAD_POS` pass through unchanged. When a table itself
//! needs a gradient: `dc = g1 x1 + g2 x2`, `ds = g2 x1 − g1 x2`, summed per position.

use super::dense::HeadsOp;
use super::simd::{fma, multiversion, Float};
use super::{bail_dtype, fwd_slice, with_slices};
use crate::validate::HeadDims;
use crate::PAD_POS;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};

/// The RoPE op: inputs `x: [b, h, t, dh]`, `cos`, `sin: [max_pos, dh/2]`, positions on the
/// host.
#[derive(Debug)]
pub(crate) struct RopeOp {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) t: usize,
    pub(crate) dh: usize,
    pub(crate) max_pos: usize,
    pub(crate) pos: Vec<u32>,
    /// The input is a projection `[b, t, h·dh]` whose heads are split before the rotation
    /// (and merged back in the gradient), instead of `[b, h, t, dh]`.
    pub(crate) split: bool,
}

multiversion! {
    /// Rotates rows `first_row..` of `x` into `out` by `+angle` (`sign = 1`) or `-angle`.
    fn rotate_rows => rotate_rows_impl(
        x: &[T], out: &mut [T], first_row: usize, ht: usize, t: usize, pos: &[u32], cos: &[T],
        sin: &[T], dh: usize, sign: T,
    )
}

#[inline(always)]
fn rotate_rows_impl<T: Float, const FMA: bool>(
    x: &[T],
    out: &mut [T],
    first_row: usize,
    ht: usize,
    t: usize,
    pos: &[u32],
    cos: &[T],
    sin: &[T],
    dh: usize,
    sign: T,
) {
    let half = dh / 2;
    for (r, (xr, or)) in x.chunks_exact(dh).zip(out.chunks_exact_mut(dh)).enumerate() {
        let row = first_row + r;
        let p = pos[(row / ht) * t + row % t];
        if p == PAD_POS {
            or.copy_from_slice(xr);
            continue;
        }
        let p = p as usize;
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        let (x1, x2) = xr.split_at(half);
        let (o1, o2) = or.split_at_mut(half);
        let (x2, o2) = (&x2[..half], &mut o2[..half]);
        for k in 0..half {
            let sk = sign * s[k];
            o1[k] = fma::<T, FMA>(x1[k], c[k], -(x2[k] * sk));
            o2[k] = fma::<T, FMA>(x2[k], c[k], x1[k] * sk);
        }
    }
}

impl RopeOp {
    fn heads(&self) -> HeadsOp {
        HeadsOp {
            d: HeadDims {
                b: self.b,
                t: self.t,
                h: self.h,
                dh: self.dh,
            },
            merge: false,
        }
    }

    /// `x` in `[b, h, t, dh]` order (split from `[b, t, h·dh]` when the op splits heads).
    fn head_major<'a, T: Float>(&self, x: &'a [T]) -> std::borrow::Cow<'a, [T]> {
        if self.split {
            std::borrow::Cow::Owned(self.heads().apply(x))
        } else {
            std::borrow::Cow::Borrowed(x)
        }
    }

    /// Rotates head-major rows `[b, h, t, dh]` by `+angle` (`sign = 1`) or `-angle`.
    pub(crate) fn rotate<T: Float>(&self, x: &[T], cos: &[T], sin: &[T], sign: T) -> Vec<T> {
        let (dh, t) = (self.dh, self.t);
        let ht = self.h * t;
        if x.is_empty() || dh == 0 {
            return vec![T::ZERO; x.len()];
        }
        let rows = x.len() / dh;
        super::rows_new(rows, dh, |r0, o| {
            let x = &x[r0 * dh..r0 * dh + o.len()];
            rotate_rows(x, o, r0, ht, t, &self.pos, cos, sin, dh, sign)
        })
        .0
    }

    /// Gradients of the tables: per position, `dc = g1 x1 + g2 x2`, `ds = g2 x1 − g1 x2`.
    fn table_grads<T: Float>(&self, x: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let (dh, t, ht) = (self.dh, self.t, self.h * self.t);
        let half = dh / 2;
        let mut dc = vec![T::ZERO; self.max_pos * half];
        let mut ds = vec![T::ZERO; self.max_pos * half];
        if dh == 0 {
            return (dc, ds);
        }
        for (row, (xr, gr)) in x.chunks_exact(dh).zip(g.chunks_exact(dh)).enumerate() {
            let p = self.pos[(row / ht) * t + row % t];
            if p == PAD_POS {
                continue;
            }
            let p = p as usize;
            for k in 0..half {
                let (x1, x2, g1, g2) = (xr[k], xr[half + k], gr[k], gr[half + k]);
                dc[p * half + k] += g1 * x1 + g2 * x2;
                ds[p * half + k] += g2 * x1 - g1 * x2;
            }
        }
        (dc, ds)
    }

    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let want_tables = cos.track_op() || sin.track_op();
        let (dx, tables) = with_slices::<T, _>(&[x, cos, sin, g], |s| {
            let (x, c, sn, g) = (s[0], s[1], s[2], s[3]);
            let dx = self.rotate(g, c, sn, -T::ONE);
            let tables = want_tables.then(|| self.table_grads(&self.head_major(x), g));
            let dx = if self.split {
                HeadsOp {
                    merge: true,
                    ..self.heads()
                }
                .apply(&dx)
            } else {
                dx
            };
            Ok((dx, tables))
        })?;
        let dev = Device::Cpu;
        let dx = Tensor::from_vec(dx, x.shape(), &dev)?;
        let tables = match tables {
            Some((dc, ds)) => Some((
                Tensor::from_vec(dc, cos.shape(), &dev)?,
                Tensor::from_vec(ds, sin.shape(), &dev)?,
            )),
            None => None,
        };
        Ok((dx, tables))
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        if self.split {
            "mor-rope-heads"
        } else {
            "mor-rope"
        }
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
        let xs = [self.b, self.h, self.t, self.dh];
        let ins = if self.split {
            vec![self.b, self.t, self.h * self.dh]
        } else {
            xs.to_vec()
        };
        let ts = [self.max_pos, self.dh / 2];
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::storage(self.rotate(
                    &self.head_major(fwd_slice(self.name(), s1, l1, &ins)?),
                    fwd_slice(self.name(), s2, l2, &ts)?,
                    fwd_slice(self.name(), s3, l3, &ts)?,
                    1.0,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::storage(self.rotate(
                    &self.head_major(fwd_slice(self.name(), s1, l1, &ins)?),
                    fwd_slice(self.name(), s2, l2, &ts)?,
                    fwd_slice(self.name(), s3, l3, &ts)?,
                    1.0,
                ))
            }
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        Ok((out, Shape::from(xs.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, tables) = match x.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(x, cos, sin, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(x, cos, sin, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        let (dc, ds) = match tables {
            Some((dc, ds)) => (cos.track_op().then_some(dc), sin.track_op().then_some(ds)),
            None => (None, None),
        };
        Ok((x.track_op().then_some(dx), dc, ds))
    }
}
