//! The feed-forward half of a decoder layer as one differentiable op.
//!
//! `out = h + A · downᵀ` with `A = silu(Z_g) ⊙ Z_u`, `Z = [Z_g | Z_u] = n · [gate; up]ᵀ` and
//! `n = rms_norm(h, w)` (spec §1.1). Written as separate ops this is six graph nodes (norm,
//! two projections, the gate, the down projection, the residual add), and candle's autograd
//! pays a zero-filled gradient buffer plus an addition for each of them, over activations
//! of up to `rows × ff` elements, on the calling thread. Here it is one node: the forward
//! keeps `n`, `Z` and `A` for the backward pass, which runs
//!
//! ```text
//! dA = G · down            dDown = Gᵀ · A
//! dZ = swiglu′(Z) ⊙ dA     d[gate; up] = dZᵀ · n     dn = dZ · [gate; up]
//! dh = G + rms_norm′(h, w; dn)                          dw = Σ_rows (r · h ⊙ dn)
//! ```
//!
//! The gate and up projections run as one product of width `2·ff`. The op's second input is
//! `[w; gate; up]` stacked (`(1 + 2·ff) × d`, built with `Tensor::cat`, whose own backward
//! hands each weight its slice of the gradient), since candle's custom ops take at most three
//! tensors. Products go straight to the `gemm` crate (the one candle uses), with strided
//! operands instead of transposed copies and the residual accumulated in place.

use super::attention::AttentionOp;
use super::norm::{rows_bwd, rows_fwd};
use super::rope::RopeOp;
use super::simd::Float;
use super::swiglu::{bwd_chunk, fwd_chunk};
use super::{bail_dtype, fwd_slice, rows_per_task, with_slices, PAR_MIN_WORK};
use crate::validate::{AttnBlockDims, AttnDims, MlpDims};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::any::Any;
use std::sync::Mutex;

/// Multiply-adds below which a product runs on the calling thread.
const GEMM_PAR_MIN: usize = 1 << 16;

/// A strided matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `[.., cols]` matrix.
    pub(crate) fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[.., cols]` matrix.
    pub(crate) fn rows_t(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether every element of an `m × n` view lies inside `data`.
    fn fits(&self, m: usize, n: usize) -> bool {
        m == 0 || n == 0 || (m - 1) * self.rs + (n - 1) * self.cs < self.data.len()
    }
}

/// `dst[i, j] (+)= Σ_k a[i, k] · b[k, j]` for an `m × n` row-major `dst` with row stride
/// `dst_rs`; adds to `dst` when `accumulate`, overwrites it otherwise.
///
/// # Errors
/// When an operand or the destination is too short for the given dims and strides.
pub(crate) fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
) -> candle_core::Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_fits = (m - 1) * dst_rs + n <= dst.len() && dst_rs >= n;
    if !(a.fits(m, k) && b.fits(k, n) && dst_fits) {
        candle_core::bail!("mor matmul: operands too short for {m}×{k} · {k}×{n}");
    }
    if k == 0 {
        if !accumulate {
            for r in dst.chunks_mut(dst_rs).take(m) {
                r[..n].fill(T::ZERO);
            }
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= GEMM_PAR_MIN {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the product reads or writes is in bounds (checked above: the last
    // element of each view lies inside its slice, and `dst` rows do not overlap since
    // `dst_rs >= n`); `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Rows per rayon task for row work `row_work`, and whether to use rayon at all.
fn blocking(rows: usize, row_work: usize) -> (usize, bool) {
    (
        rows_per_task(rows, row_work),
        rows * row_work >= PAR_MIN_WORK,
    )
}

/// `rms_norm(h, w)` of the `[rows, d]` matrix `h`.
fn norm_fwd<T: Float>(h: &[T], w: &[T], eps: T, rows: usize, d: usize) -> Vec<T> {
    let mut n = vec![T::ZERO; rows * d];
    let (per, par) = blocking(rows, d);
    if par {
        n.par_chunks_mut(per * d)
            .zip(h.par_chunks(per * d))
            .for_each(|(n, h)| rows_fwd(h, w, eps, d, n));
    } else {
        rows_fwd(h, w, eps, d, &mut n);
    }
    n
}

/// The gradient of `h + f(rms_norm(h, w))` with respect to `h`, given `g` (the output
/// gradient, which reaches `h` through the residual) and `dn` (the gradient reaching the
/// norm's output); writes the norm weight's gradient (summed over rows) into `dw`.
fn norm_residual_bwd<T: Float>(
    h: &[T],
    w: &[T],
    dn: &[T],
    g: &[T],
    eps: T,
    dw: &mut [T],
) -> Vec<T> {
    let d = w.len();
    let rows = h.len().checked_div(d).unwrap_or(0);
    let mut dh = vec![T::ZERO; rows * d];
    let norm_rows = |dh: &mut [T], h: &[T], dn: &[T], g: &[T]| {
        let mut dw = vec![T::ZERO; d];
        rows_bwd(h, w, dn, eps, d, dh, &mut dw);
        for (o, &gv) in dh.iter_mut().zip(g) {
            *o += gv;
        }
        dw
    };
    let (per, par) = blocking(rows, d);
    let dw_sum = if par {
        let c = per * d;
        dh.par_chunks_mut(c)
            .zip(h.par_chunks(c).zip(dn.par_chunks(c)).zip(g.par_chunks(c)))
            .map(|(dh, ((h, dn), g))| norm_rows(dh, h, dn, g))
            .reduce(
                || vec![T::ZERO; d],
                |mut a, b| {
                    for (a, b) in a.iter_mut().zip(b) {
                        *a += b;
                    }
                    a
                },
            )
    } else {
        norm_rows(&mut dh, h, dn, g)
    };
    dw.copy_from_slice(&dw_sum);
    dh
}

/// Head layout of a projection: `(b, t, heads, dh)`.
type HeadShape = (usize, usize, usize, usize);

/// Copies columns `off .. off + heads·dh` of the row-major `[b·t, width]` matrix `src` into
/// head-major `[b, heads, t, dh]`.
fn heads_from_cols<T: Float>(
    src: &[T],
    width: usize,
    off: usize,
    (b, t, h, dh): HeadShape,
) -> Vec<T> {
    let mut out = vec![T::ZERO; b * h * t * dh];
    if out.is_empty() {
        return out;
    }
    let fill = |bh: usize, o: &mut [T]| {
        let (bi, hi) = (bh / h, bh % h);
        for (ti, or) in o.chunks_exact_mut(dh).enumerate() {
            let s = (bi * t + ti) * width + off + hi * dh;
            or.copy_from_slice(&src[s..s + dh]);
        }
    };
    if out.len() < PAR_MIN_WORK {
        out.chunks_mut(t * dh)
            .enumerate()
            .for_each(|(bh, o)| fill(bh, o));
    } else {
        out.par_chunks_mut(t * dh)
            .enumerate()
            .for_each(|(bh, o)| fill(bh, o));
    }
    out
}

/// The inverse of [`heads_from_cols`]: writes head-major `src: [b, heads, t, dh]` into
/// columns `off .. off + heads·dh` of the row-major `[b·t, width]` matrix `dst`.
fn heads_to_cols<T: Float>(
    src: &[T],
    dst: &mut [T],
    width: usize,
    off: usize,
    (b, t, h, dh): HeadShape,
) {
    let rows = b * t;
    if rows == 0 || h * dh == 0 {
        return;
    }
    let fill = |first: usize, d: &mut [T]| {
        for (k, dr) in d.chunks_exact_mut(width).enumerate() {
            let r = first + k;
            let (bi, ti) = (r / t, r % t);
            for hi in 0..h {
                let s = ((bi * h + hi) * t + ti) * dh;
                dr[off + hi * dh..off + (hi + 1) * dh].copy_from_slice(&src[s..s + dh]);
            }
        }
    };
    let (per, par) = blocking(rows, width);
    if par {
        dst.par_chunks_mut(per * width)
            .enumerate()
            .for_each(|(c, d)| fill(c * per, d));
    } else {
        fill(0, dst);
    }
}

/// What the forward pass keeps for the backward pass.
struct Saved<T> {
    /// `rms_norm(h)`, `[rows, d]`.
    n: Vec<T>,
    /// `[Z_g | Z_u]`, `[rows, 2·ff]`.
    z: Vec<T>,
    /// `silu(Z_g) ⊙ Z_u`, `[rows, ff]`.
    a: Vec<T>,
}

/// The fused feed-forward half: inputs `h: [.., d]`, `[w; gate; up]: [1 + 2·ff, d]`,
/// `down: [d, ff]`.
pub(crate) struct MlpOp {
    dims: MlpDims,
    eps: f64,
    out_shape: Vec<usize>,
    /// Whether to keep the intermediates (only when a gradient can flow).
    keep: bool,
    saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for MlpOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlpOp")
            .field("dims", &self.dims)
            .field("eps", &self.eps)
            .finish()
    }
}

impl MlpOp {
    pub(crate) fn new(dims: MlpDims, eps: f64, out_shape: Vec<usize>, keep: bool) -> Self {
        MlpOp {
            dims,
            eps,
            out_shape,
            keep,
            saved: Mutex::new(None),
        }
    }

    fn forward<T: Float>(
        &self,
        h: &[T],
        pack: &[T],
        down: &[T],
    ) -> candle_core::Result<(Vec<T>, Saved<T>)> {
        let MlpDims { rows, d, ff } = self.dims;
        let (f2, eps) = (2 * ff, T::from_f64(self.eps));
        let (w, wgu) = pack.split_at(d);
        let n = norm_fwd(h, w, eps, rows, d);
        // Z = n · [gate; up]ᵀ
        let mut z = vec![T::ZERO; rows * f2];
        matmul(
            (rows, f2, d),
            Mat::rows(&n, d),
            Mat::rows_t(wgu, d),
            &mut z,
            f2,
            false,
        )?;
        // A = silu(Z_g) ⊙ Z_u
        let mut a = vec![T::ZERO; rows * ff];
        let gate_rows = |a: &mut [T], z: &[T]| {
            for (ar, zr) in a.chunks_exact_mut(ff).zip(z.chunks_exact(f2)) {
                let (g, u) = zr.split_at(ff);
                fwd_chunk(g, u, ar);
            }
        };
        let (per, par) = blocking(rows, f2);
        if par {
            a.par_chunks_mut(per * ff)
                .zip(z.par_chunks(per * f2))
                .for_each(|(a, z)| gate_rows(a, z));
        } else {
            gate_rows(&mut a, &z);
        }
        // out = h + A · downᵀ
        let mut out = h.to_vec();
        matmul(
            (rows, d, ff),
            Mat::rows(&a, ff),
            Mat::rows_t(down, ff),
            &mut out,
            d,
            true,
        )?;
        Ok((out, Saved { n, z, a }))
    }

    /// Gradients of `(h, [w; gate; up], down)` for the output gradient `g`.
    fn backward<T: Float>(
        &self,
        h: &[T],
        pack: &[T],
        down: &[T],
        g: &[T],
        s: &Saved<T>,
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let MlpDims { rows, d, ff } = self.dims;
        let (f2, eps) = (2 * ff, T::from_f64(self.eps));
        let (w, wgu) = pack.split_at(d);
        // dDown = Gᵀ · A
        let mut d_down = vec![T::ZERO; d * ff];
        matmul(
            (d, ff, rows),
            Mat::rows_t(g, d),
            Mat::rows(&s.a, ff),
            &mut d_down,
            ff,
            false,
        )?;
        // dA = G · down, then dZ = swiglu′(Z) ⊙ dA
        let mut da = vec![T::ZERO; rows * ff];
        matmul(
            (rows, ff, d),
            Mat::rows(g, d),
            Mat::rows(down, ff),
            &mut da,
            ff,
            false,
        )?;
        let mut dz = vec![T::ZERO; rows * f2];
        let gate_rows = |dz: &mut [T], z: &[T], da: &[T]| {
            for ((dzr, zr), dar) in dz
                .chunks_exact_mut(f2)
                .zip(z.chunks_exact(f2))
                .zip(da.chunks_exact(ff))
            {
                let (zg, zu) = zr.split_at(ff);
                let (dg, du) = dzr.split_at_mut(ff);
                bwd_chunk(zg, zu, dar, dg, du);
            }
        };
        let (per, par) = blocking(rows, f2);
        if par {
            dz.par_chunks_mut(per * f2)
                .zip(s.z.par_chunks(per * f2).zip(da.par_chunks(per * ff)))
                .for_each(|(dz, (z, da))| gate_rows(dz, z, da));
        } else {
            gate_rows(&mut dz, &s.z, &da);
        }
        drop(da);
        // d[gate; up] = dZᵀ · n, written below the norm weight's row of the packed gradient
        let mut d_pack = vec![T::ZERO; (1 + f2) * d];
        let (dw, dgu) = d_pack.split_at_mut(d);
        matmul(
            (f2, d, rows),
            Mat::rows_t(&dz, f2),
            Mat::rows(&s.n, d),
            dgu,
            d,
            false,
        )?;
        // dn = dZ · [gate; up]
        let mut dn = vec![T::ZERO; rows * d];
        matmul(
            (rows, d, f2),
            Mat::rows(&dz, f2),
            Mat::rows(wgu, d),
            &mut dn,
            d,
            false,
        )?;
        drop(dz);
        let dh = norm_residual_bwd(h, w, &dn, g, eps, dw);
        Ok((dh, d_pack, d_down))
    }

    fn cpu_fwd_typed<T: Float>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let MlpDims { rows, d, ff } = self.dims;
        let name = self.name();
        let h = fwd_slice::<T>(name, s1, l1, &self.out_shape)?;
        let pack = fwd_slice::<T>(name, s2, l2, &[1 + 2 * ff, d])?;
        let down = fwd_slice::<T>(name, s3, l3, &[d, ff])?;
        if h.len() != rows * d {
            candle_core::bail!("{name}: h has {} elements, expected {rows}×{d}", h.len());
        }
        let (out, saved) = self.forward(h, pack, down)?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
        }
        Ok(T::storage(out))
    }

    fn bwd_typed<T: Float>(
        &self,
        h: &Tensor,
        pack: &Tensor,
        down: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dh, dp, dd) = with_slices::<T, _>(&[h, pack, down, g], |s| {
            let (h, pack, down, g) = (s[0], s[1], s[2], s[3]);
            let guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref().and_then(|b| b.downcast_ref::<Saved<T>>()) {
                Some(saved) => self.backward(h, pack, down, g, saved),
                None => {
                    // Not kept (or taken by another dtype): recompute the forward.
                    drop(guard);
                    let (_, saved) = self.forward(h, pack, down)?;
                    self.backward(h, pack, down, g, &saved)
                }
            }
        })?;
        Ok((
            Tensor::from_vec(dh, h.shape(), &Device::Cpu)?,
            Tensor::from_vec(dp, pack.shape(), &Device::Cpu)?,
            Tensor::from_vec(dd, down.shape(), &Device::Cpu)?,
        ))
    }
}

impl CustomOp3 for MlpOp {
    fn name(&self) -> &'static str {
        "mor-mlp-block"
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
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.cpu_fwd_typed::<f32>(args.0, args.1, args.2)?
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.cpu_fwd_typed::<f64>(args.0, args.1, args.2)?
            }
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        Ok((out, Shape::from(self.out_shape.clone())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        pack: &Tensor,
        down: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, dp, dd) = match h.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(h, pack, down, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(h, pack, down, grad)?,
            other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        Ok((
            h.track_op().then_some(dh),
            pack.track_op().then_some(dp),
            down.track_op().then_some(dd),
        ))
    }
}

/// What the attention half keeps for its backward pass.
struct AttnSaved<T> {
    /// `rms_norm(h)`, `[rows, d]`.
    n: Vec<T>,
    /// Rotated queries `[b, hq, t, dh]`.
    q: Vec<T>,
    /// Rotated keys `[b, hkv, t, dh]`.
    k: Vec<T>,
    /// Values `[b, hkv, t, dh]`.
    v: Vec<T>,
    /// Attention output `[b, hq, t, dh]`.
    o: Vec<T>,
    /// Log-sum-exp of each query row `[b, hq, t]`.
    lse: Vec<T>,
    /// The output with heads merged, `[rows, hq·dh]`.
    merged: Vec<T>,
}

/// The fused attention half of a decoder layer: inputs `h: [b, t, d]`,
/// `[w; q; k; v]: [1 + (hq + 2·hkv)·dh, d]`, `o: [d, hq·dh]`; positions and RoPE tables held
/// by the op.
///
/// Forward: `n = rms_norm(h)`, one product `n · [q; k; v]ᵀ`, heads split and rotated, the
/// flash-style attention of [`AttentionOp`], heads merged, `out = h + merged · oᵀ`. Backward
/// runs the same steps in reverse (RoPE's gradient is the inverse rotation), writing the
/// three projection gradients into one `[rows, (hq + 2·hkv)·dh]` matrix so that the weight
/// gradient and the gradient of `n` are one product each.
#[derive(Debug)]
pub(crate) struct AttnBlockOp {
    dims: AttnBlockDims,
    eps: f64,
    attn: AttentionOp,
    rope_q: RopeOp,
    rope_k: RopeOp,
    /// RoPE tables in the dtype of `h`, contiguous.
    cos: Tensor,
    sin: Tensor,
    keep: bool,
    saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

impl AttnBlockOp {
    pub(crate) fn new(dims: AttnBlockDims, eps: f64, cos: Tensor, sin: Tensor, keep: bool) -> Self {
        let AttnBlockDims {
            b, t, hq, hkv, dh, ..
        } = dims;
        let attn = AttentionOp::new(&AttnDims {
            b,
            hq,
            hkv,
            t,
            s: t,
            dh,
            q_pos: dims.pos.clone(),
            k_pos: dims.pos.clone(),
        });
        let rope = |h: usize| RopeOp {
            b,
            h,
            t,
            dh,
            max_pos: dims.max_pos,
            pos: dims.pos.clone(),
            split: false,
        };
        AttnBlockOp {
            rope_q: rope(hq),
            rope_k: rope(hkv),
            attn,
            dims,
            eps,
            cos,
            sin,
            keep,
            saved: Mutex::new(None),
        }
    }

    /// `(rows, d, hq·dh, hkv·dh)`.
    fn sizes(&self) -> (usize, usize, usize, usize) {
        let AttnBlockDims {
            b,
            t,
            d,
            hq,
            hkv,
            dh,
            ..
        } = self.dims;
        (b * t, d, hq * dh, hkv * dh)
    }

    fn forward<T: Float>(
        &self,
        h: &[T],
        pack: &[T],
        wo: &[T],
        (cos, sin): (&[T], &[T]),
    ) -> candle_core::Result<(Vec<T>, AttnSaved<T>)> {
        let AttnBlockDims {
            b, t, hq, hkv, dh, ..
        } = self.dims;
        let (rows, d, nq, nk) = self.sizes();
        let width = nq + 2 * nk;
        let (w, wqkv) = pack.split_at(d);
        let n = norm_fwd(h, w, T::from_f64(self.eps), rows, d);
        let mut qkv = vec![T::ZERO; rows * width];
        matmul(
            (rows, width, d),
            Mat::rows(&n, d),
            Mat::rows_t(wqkv, d),
            &mut qkv,
            width,
            false,
        )?;
        let q = self.rope_q.rotate(
            &heads_from_cols(&qkv, width, 0, (b, t, hq, dh)),
            cos,
            sin,
            T::ONE,
        );
        let k = self.rope_k.rotate(
            &heads_from_cols(&qkv, width, nq, (b, t, hkv, dh)),
            cos,
            sin,
            T::ONE,
        );
        let v = heads_from_cols(&qkv, width, nq + nk, (b, t, hkv, dh));
        drop(qkv);
        let (o, lse) = self.attn.fwd_slices(&q, &k, &v);
        let mut merged = vec![T::ZERO; rows * nq];
        heads_to_cols(&o, &mut merged, nq, 0, (b, t, hq, dh));
        let mut out = h.to_vec();
        matmul(
            (rows, d, nq),
            Mat::rows(&merged, nq),
            Mat::rows_t(wo, nq),
            &mut out,
            d,
            true,
        )?;
        let saved = AttnSaved {
            n,
            q,
            k,
            v,
            o,
            lse,
            merged,
        };
        Ok((out, saved))
    }

    /// Gradients of `(h, [w; q; k; v], o)` for the output gradient `g`.
    fn backward<T: Float>(
        &self,
        (h, pack, wo, g): (&[T], &[T], &[T], &[T]),
        (cos, sin): (&[T], &[T]),
        s: &AttnSaved<T>,
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let AttnBlockDims {
            b, t, hq, hkv, dh, ..
        } = self.dims;
        let (rows, d, nq, nk) = self.sizes();
        let width = nq + 2 * nk;
        let (w, wqkv) = pack.split_at(d);
        // d o-proj = Gᵀ · merged, d merged = G · o-proj
        let mut d_wo = vec![T::ZERO; d * nq];
        matmul(
            (d, nq, rows),
            Mat::rows_t(g, d),
            Mat::rows(&s.merged, nq),
            &mut d_wo,
            nq,
            false,
        )?;
        let mut d_merged = vec![T::ZERO; rows * nq];
        matmul(
            (rows, nq, d),
            Mat::rows(g, d),
            Mat::rows(wo, nq),
            &mut d_merged,
            nq,
            false,
        )?;
        let d_o = heads_from_cols(&d_merged, nq, 0, (b, t, hq, dh));
        drop(d_merged);
        let (dq, dk, dv) = self.attn.bwd_slices(&s.q, &s.k, &s.v, &s.o, &d_o, &s.lse);
        drop(d_o);
        // RoPE's gradient is the inverse rotation; the three projections' gradients go side
        // by side into one matrix.
        let mut d_qkv = vec![T::ZERO; rows * width];
        let dq = self.rope_q.rotate(&dq, cos, sin, -T::ONE);
        heads_to_cols(&dq, &mut d_qkv, width, 0, (b, t, hq, dh));
        drop(dq);
        let dk = self.rope_k.rotate(&dk, cos, sin, -T::ONE);
        heads_to_cols(&dk, &mut d_qkv, width, nq, (b, t, hkv, dh));
        heads_to_cols(&dv, &mut d_qkv, width, nq + nk, (b, t, hkv, dh));
        drop((dk, dv));
        let mut d_pack = vec![T::ZERO; (1 + width) * d];
        let (dw, d_wqkv) = d_pack.split_at_mut(d);
        matmul(
            (width, d, rows),
            Mat::rows_t(&d_qkv, width),
            Mat::rows(&s.n, d),
            d_wqkv,
            d,
            false,
        )?;
        let mut dn = vec![T::ZERO; rows * d];
        matmul(
            (rows, d, width),
            Mat::rows(&d_qkv, width),
            Mat::rows(wqkv, d),
            &mut dn,
            d,
            false,
        )?;
        drop(d_qkv);
        let dh = norm_residual_bwd(h, w, &dn, g, T::from_f64(self.eps), dw);
        Ok((dh, d_pack, d_wo))
    }

    fn cpu_fwd_typed<T: Float>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let AttnBlockDims { b, t, .. } = self.dims;
        let (_, d, nq, nk) = self.sizes();
        let name = self.name();
        let h = fwd_slice::<T>(name, s1, l1, &[b, t, d])?;
        let pack = fwd_slice::<T>(name, s2, l2, &[1 + nq + 2 * nk, d])?;
        let wo = fwd_slice::<T>(name, s3, l3, &[d, nq])?;
        let (out, saved) = with_slices::<T, _>(&[&self.cos, &self.sin], |cs| {
            self.forward(h, pack, wo, (cs[0], cs[1]))
        })?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
        }
        Ok(T::storage(out))
    }

    fn bwd_typed<T: Float>(
        &self,
        h: &Tensor,
        pack: &Tensor,
        wo: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dh, dp, dwo) = with_slices::<T, _>(&[h, pack, wo, g, &self.cos, &self.sin], |s| {
            let inputs = (s[0], s[1], s[2], s[3]);
            let tables = (s[4], s[5]);
            let guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
            match guard
                .as_ref()
                .and_then(|b| b.downcast_ref::<AttnSaved<T>>())
            {
                Some(saved) => self.backward(inputs, tables, saved),
                None => {
                    drop(guard);
                    let (_, saved) = self.forward(s[0], s[1], s[2], tables)?;
                    self.backward(inputs, tables, &saved)
                }
            }
        })?;
        Ok((
            Tensor::from_vec(dh, h.shape(), &Device::Cpu)?,
            Tensor::from_vec(dp, pack.shape(), &Device::Cpu)?,
            Tensor::from_vec(dwo, wo.shape(), &Device::Cpu)?,
        ))
    }
}

impl CustomOp3 for AttnBlockOp {
    fn name(&self) -> &'static str {
        "mor-attention-block"
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
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.cpu_fwd_typed::<f32>(args.0, args.1, args.2)?
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.cpu_fwd_typed::<f64>(args.0, args.1, args.2)?
            }
            _ => return Err(bail_dtype(self.name(), s1)),
        };
        let AttnBlockDims { b, t, d, .. } = self.dims;
        Ok((out, Shape::from((b, t, d))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        pack: &Tensor,
        wo: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, dp, dwo) = match h.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(h, pack, wo, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(h, pack, wo, grad)?,
            other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        Ok((
            h.track_op().then_some(dh),
            pack.track_op().then_some(dp),
            wo.track_op().then_some(dwo),
        ))
    }
}
