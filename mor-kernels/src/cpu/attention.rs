//! Fused causal attention with GQA by positions, flash-style (FlashAttention-2): scores
//! exist only for one block of [`QB`] query rows at a time, never as a `[t, s]` matrix; the
//! log-sum-exp of each row is saved by the forward pass, and the backward pass recomputes
//! the probabilities from it.
//!
//! Visibility (trait contract of [`Backend::attention`](crate::Backend::attention)): query `i`
//! sees key `j` iff `k_pos[j] <= q_pos[i]`, `k_pos[j] != PAD_POS` and `q_pos[i] != PAD_POS`.
//! Per batch row, the non-padded keys are sorted by position once, so the keys visible to a
//! query are a prefix of that order whose length is found by binary search. A block computes
//! scores against the longest prefix among its rows (so causal blocks skip the keys none of
//! their rows sees) and zeroes each row's probabilities past its own prefix.
//!
//! Work is split by (batch, key/value head): each task packs its keys and values once (in
//! visibility order), runs the query heads of its group, and owns the key and value
//! gradients it accumulates, so no two threads write the same row. The products of a block
//! are single-threaded `gemm` calls with strided operands (transposes are views). When they
//! run on the own packed kernels (f32 operands at the AVX-512 tier, every bf16 product), the
//! task also packs `Kᵀ`, `V` (and for the backward pass `Vᵀ`, `K`) once into the kernels'
//! panels (bf16 pairs or f32), and every query block multiplies against a leading block of
//! them instead of packing its keys and values again.
//!
//! Per block, with the scores scaled by `1/sqrt(dh)` (spec §1.1): forward `S = Q Kᵀ`,
//! `P = softmax(S)`, `O = P V`; backward `P = exp(S − lse)`, `dP = dO Vᵀ`,
//! `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = dS K / sqrt(dh)`, `dK += dSᵀ Q`, `dV += Pᵀ dO`.

use super::block::{as_f32, matmul_scaled, Mat};
use super::gemm::{gemm_packed_b, Kernel, PackedB, Prec};
use super::simd::{dot, exp_shift_sum, max, multiversion, Float};
use super::{bail_dtype, fwd_slice, with_slices, PAR_MIN_WORK};
use crate::validate::AttnDims;
use crate::PAD_POS;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Keys visible to each query, shared by the forward and backward passes.
#[derive(Debug)]
pub(crate) struct Visibility {
    /// Per batch row `b`, `order[b * s..][..n_keys[b]]`: non-padded key indices sorted by
    /// position (ties by index).
    order: Vec<u32>,
    /// Per batch row: the number of non-padded keys.
    n_keys: Vec<u32>,
    /// Per query `(b, i)`: how many keys of `order` it sees (a prefix).
    n_vis: Vec<u32>,
}

impl Visibility {
    /// Builds the key order and visible counts from host positions.
    pub(crate) fn new(d: &AttnDims) -> Self {
        let (b, t, s) = (d.b, d.t, d.s);
        let mut order = vec![0u32; b * s];
        let mut n_keys = vec![0u32; b];
        let mut n_vis = vec![0u32; b * t];
        let mut sorted_pos = Vec::with_capacity(s);
        for bi in 0..b {
            let kp = &d.k_pos[bi * s..(bi + 1) * s];
            let mut keys: Vec<u32> = (0..s as u32)
                .filter(|&j| kp[j as usize] != PAD_POS)
                .collect();
            keys.sort_by_key(|&j| (kp[j as usize], j));
            order[bi * s..bi * s + keys.len()].copy_from_slice(&keys);
            n_keys[bi] = keys.len() as u32;
            sorted_pos.clear();
            sorted_pos.extend(keys.iter().map(|&j| kp[j as usize]));
            for i in 0..t {
                let qp = d.q_pos[bi * t + i];
                n_vis[bi * t + i] = if qp == PAD_POS {
                    0
                } else {
                    sorted_pos.partition_point(|&p| p <= qp) as u32
                };
            }
        }
        Visibility {
            order,
            n_keys,
            n_vis,
        }
    }

    /// The non-padded keys of batch row `bi`, in position order.
    fn keys(&self, bi: usize, s: usize) -> &[u32] {
        &self.order[bi * s..bi * s + self.n_keys[bi] as usize]
    }
}

/// The attention op: inputs `q, k, v` (contiguous), positions held on the host.
#[derive(Debug)]
pub(crate) struct AttentionOp {
    pub(crate) b: usize,
    pub(crate) hq: usize,
    pub(crate) hkv: usize,
    pub(crate) t: usize,
    pub(crate) s: usize,
    pub(crate) dh: usize,
    pub(crate) vis: Visibility,
    /// Precision of the products (`QKᵀ`, `PV` and their backward).
    pub(crate) prec: Prec,
    /// Whether each (batch, key/value head) packs its keys and values once as product
    /// operands for all its query blocks (otherwise every block product packs them again;
    /// the results are the same bit for bit).
    pub(crate) prepack: bool,
    /// Log-sum-exp of the scaled scores of each query row `[b, hq, t]`, from the forward pass.
    lse: OnceLock<CpuStorage>,
}

impl AttentionOp {
    pub(crate) fn new(d: &AttnDims) -> Self {
        AttentionOp {
            b: d.b,
            hq: d.hq,
            hkv: d.hkv,
            t: d.t,
            s: d.s,
            dh: d.dh,
            vis: Visibility::new(d),
            prec: Prec::F32,
            prepack: true,
            lse: OnceLock::new(),
        }
    }

    /// The same op with products in `prec`.
    pub(crate) fn with_prec(mut self, prec: Prec) -> Self {
        self.prec = prec;
        self
    }

    fn scale(&self) -> f64 {
        1.0 / (self.dh as f64).sqrt()
    }

    /// Runs `task(bk, ..)` for every (batch, key/value head) `bk`, in parallel when the work
    /// pays for it.
    fn for_groups<I, F>(&self, it: I, task: F) -> candle_core::Result<()>
    where
        I: IndexedParallelIterator,
        F: Fn((usize, I::Item)) -> candle_core::Result<()> + Sync + Send,
    {
        let work = self.b * self.hq * self.t * self.s * self.dh;
        let it = it.enumerate();
        if work < PAR_MIN_WORK {
            it.with_min_len(usize::MAX).try_for_each(task)
        } else {
            it.with_max_len(1).try_for_each(task)
        }
    }

    fn fwd<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, lse) = self.fwd_slices(q, k, v)?;
        let _ = self.lse.set(T::storage(lse));
        Ok((
            T::storage(out),
            Shape::from((self.b, self.hq, self.t, self.dh)),
        ))
    }

    /// The output `[b, hq, t, dh]` and the log-sum-exp of each query row `[b, hq, t]`, for
    /// contiguous `q: [b, hq, t, dh]`, `k, v: [b, hkv, s, dh]`.
    pub(crate) fn fwd_slices<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let (b, hq, hkv, t, s, dh) = (self.b, self.hq, self.hkv, self.t, self.s, self.dh);
        let group = hq / hkv;
        let mut out = vec![T::ZERO; b * hq * t * dh];
        let mut lse = vec![T::NEG_INFINITY; b * hq * t];
        let scale = T::from_f64(self.scale());
        if !out.is_empty() {
            let gq = group * t * dh;
            self.for_groups(
                out.par_chunks_mut(gq).zip(lse.par_chunks_mut(group * t)),
                |(bk, (o, l))| {
                    let bi = bk / hkv;
                    let kv = bk * s * dh;
                    let packed = Packed::new(
                        &k[kv..kv + s * dh],
                        &v[kv..kv + s * dh],
                        self.vis.keys(bi, s),
                        dh,
                        self.prec,
                        (self.prepack, false),
                    )?;
                    let n_vis = &self.vis.n_vis[bi * t..(bi + 1) * t];
                    group_fwd(
                        &q[bk * gq..(bk + 1) * gq],
                        &packed,
                        n_vis,
                        (group, t, dh),
                        scale,
                        o,
                        l,
                    )
                },
            )?;
        }
        Ok((out, lse))
    }

    fn bwd_typed<T: Float>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<[Tensor; 3]> {
        let (b, hq, hkv, t, s, dh) = (self.b, self.hq, self.hkv, self.t, self.s, self.dh);
        let lse = self.lse.get().and_then(|l| T::slice(l)).ok_or_else(|| {
            candle_core::Error::Msg("attention backward ran before its forward pass".into())
        })?;
        let (dq, dk, dv) = with_slices::<T, _>(&[q, k, v, o, g], |x| {
            self.bwd_slices(x[0], x[1], x[2], x[3], x[4], lse)
        })?;
        let dev = Device::Cpu;
        Ok([
            Tensor::from_vec(dq, (b, hq, t, dh), &dev)?,
            Tensor::from_vec(dk, (b, hkv, s, dh), &dev)?,
            Tensor::from_vec(dv, (b, hkv, s, dh), &dev)?,
        ])
    }

    /// Gradients `(dq, dk, dv)` for the output gradient `g`, from the inputs, the output `o`
    /// and the log-sum-exp `lse` of [`fwd_slices`](Self::fwd_slices).
    pub(crate) fn bwd_slices<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        g: &[T],
        lse: &[T],
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let (b, hq, hkv, t, s, dh) = (self.b, self.hq, self.hkv, self.t, self.s, self.dh);
        let group = hq / hkv;
        let scale = T::from_f64(self.scale());
        let mut dq = vec![T::ZERO; b * hq * t * dh];
        let mut dk = vec![T::ZERO; b * hkv * s * dh];
        let mut dv = vec![T::ZERO; b * hkv * s * dh];
        {
            if dq.is_empty() || dk.is_empty() {
                return Ok((dq, dk, dv));
            }
            let gq = group * t * dh; // the heads of one group are contiguous in [b, hq, t, dh]
            let it = dq
                .par_chunks_mut(gq)
                .zip(dk.par_chunks_mut(s * dh))
                .zip(dv.par_chunks_mut(s * dh));
            self.for_groups(it, |(bk, ((dq, dk), dv))| {
                let bi = bk / hkv;
                let kv = bk * s * dh;
                let keys = self.vis.keys(bi, s);
                let packed = Packed::new(
                    &k[kv..kv + s * dh],
                    &v[kv..kv + s * dh],
                    keys,
                    dh,
                    self.prec,
                    (self.prepack, true),
                )?;
                let n_vis = &self.vis.n_vis[bi * t..(bi + 1) * t];
                let r = bk * gq..(bk + 1) * gq;
                let io = GroupIo {
                    q: &q[r.clone()],
                    o: &o[r.clone()],
                    g: &g[r],
                    lse: &lse[bk * group * t..(bk + 1) * group * t],
                };
                let (dkp, dvp) = group_bwd(&io, &packed, n_vis, (group, t, dh), scale, dq)?;
                // Unpack: packed row j' belongs to key keys[j']; padded keys keep zero gradient.
                for (jp, &j) in keys.iter().enumerate() {
                    let j = j as usize;
                    dk[j * dh..(j + 1) * dh].copy_from_slice(&dkp[jp * dh..(jp + 1) * dh]);
                    dv[j * dh..(j + 1) * dh].copy_from_slice(&dvp[jp * dh..(jp + 1) * dh]);
                }
                Ok(())
            })?;
        }
        Ok((dq, dk, dv))
    }
}

/// The keys and values of one (batch, key/value head), packed in visibility order:
/// `kp`, `vp: [n, dh]` row-major; for the own packed kernels (f32 operands), also packed
/// once as the right operands of the block products, which every block of queries reuses.
struct Packed<T> {
    n: usize,
    kp: Vec<T>,
    vp: Vec<T>,
    /// Precision of the products against these keys.
    prec: Prec,
    /// `Kᵀ` (`dh × n`), right operand of `S = Q Kᵀ`.
    kt: Option<PackedB>,
    /// `V` (`n × dh`), right operand of `O = P V`.
    vn: Option<PackedB>,
    /// `Vᵀ` (`dh × n`), right operand of `dP = dO Vᵀ` (backward only).
    vt: Option<PackedB>,
    /// `K` (`n × dh`), right operand of `dQ = dS K` (backward only).
    kn: Option<PackedB>,
}

impl<T: Float> Packed<T> {
    /// Packs `keys` (indices into the rows of `k` and `v`, `[s, dh]` each); with `prepack`,
    /// also the product operands the forward pass (and with `backward`, the backward pass)
    /// needs, when the products run on the own packed kernels.
    fn new(
        k: &[T],
        v: &[T],
        keys: &[u32],
        dh: usize,
        prec: Prec,
        (prepack, backward): (bool, bool),
    ) -> candle_core::Result<Self> {
        let n = keys.len();
        let mut kp = Vec::with_capacity(n * dh);
        let mut vp = Vec::with_capacity(n * dh);
        for &j in keys {
            let r = j as usize * dh..(j as usize + 1) * dh;
            kp.extend_from_slice(&k[r.clone()]);
            vp.extend_from_slice(&v[r]);
        }
        let mut p = Packed {
            n,
            kp,
            vp,
            prec,
            kt: None,
            vn: None,
            vt: None,
            kn: None,
        };
        let kernel = Kernel::for_prec(prec);
        if let (true, Some(kern), Some(kf), Some(vf)) = (
            prepack && n > 0 && dh > 0,
            kernel,
            as_f32(Mat::rows(&p.kp, dh)),
            as_f32(Mat::rows(&p.vp, dh)),
        ) {
            let pack = |m: Mat<'_, f32>, kk, nn| {
                PackedB::new(kern, m, kk, nn).map_err(candle_core::Error::Msg)
            };
            let (kt_m, vt_m) = (
                Mat {
                    rs: 1,
                    cs: dh,
                    ..kf
                },
                Mat {
                    rs: 1,
                    cs: dh,
                    ..vf
                },
            );
            p.kt = Some(pack(kt_m, dh, n)?);
            p.vn = Some(pack(vf, n, dh)?);
            if backward {
                p.vt = Some(pack(vt_m, dh, n)?);
                p.kn = Some(pack(kf, n, dh)?);
            }
        }
        Ok(p)
    }
}

/// `dst (+)= scale · a · b` for `a: m × k`, `b: k × n` (as [`matmul_scaled`] on one
/// thread), with `b` taken from its packing `pb` when there is one (f32 operands only).
#[allow(clippy::too_many_arguments)]
fn prod<T: Float>(
    prec: Prec,
    (m, n, k): (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    pb: Option<&PackedB>,
    (dst, dst_rs): (&mut [T], usize),
    accumulate: bool,
    scale: T,
) -> candle_core::Result<()> {
    if let (Some(pb), Some(a32)) = (pb, as_f32(a)) {
        let dst_fits = m == 0
            || n == 0
            || (dst_rs >= n
                && (m - 1)
                    .checked_mul(dst_rs)
                    .and_then(|x| x.checked_add(n))
                    .is_some_and(|e| e <= dst.len()));
        if !(a32.fits(m, k) && dst_fits && k <= pb.k() && n <= pb.n()) {
            candle_core::bail!("mor attention: operands too short for {m}×{k} · {k}×{n}");
        }
        debug_assert_eq!(Some(pb.kernel()), Kernel::for_prec(prec));
        // SAFETY: bounds checked above; `T` is f32 (checked by `as_f32`); `dst` is borrowed
        // mutably, so it aliases neither operand; the packing's kernel was chosen for this
        // CPU's tier.
        unsafe {
            gemm_packed_b(
                (m, n, k),
                (dst.as_mut_ptr().cast::<f32>(), dst_rs),
                accumulate,
                a32,
                pb,
                scale.to_f64() as f32,
            )
        };
        return Ok(());
    }
    matmul_scaled(prec, (m, n, k), a, b, (dst, dst_rs), accumulate, (scale, 1))
}

/// Query rows per block: the scores of one block, `[QB, n]`, are one product, and the block
/// computes against the keys visible to its last row (causal blocks skip the rest).
const QB: usize = 64;

/// The query rows `i0 .. i0 + rows` of a block and the number of packed keys they need.
fn block_keys(n_vis: &[u32], i0: usize, rows: usize) -> usize {
    n_vis[i0..i0 + rows].iter().copied().max().unwrap_or(0) as usize
}

multiversion! {
    /// Forward pass of the `group` query heads of one (batch, key/value head), in blocks of
    /// [`QB`] query rows: `o: [group, t, dh]`, `lse: [group, t]`.
    fn group_fwd => group_fwd_impl(
        q: &[T], p: &Packed<T>, n_vis: &[u32], shape: (usize, usize, usize), scale: T,
        o: &mut [T], lse: &mut [T],
    ) -> candle_core::Result<()>
}

#[inline(always)]
fn group_fwd_impl<T: Float, const FMA: bool>(
    q: &[T],
    p: &Packed<T>,
    n_vis: &[u32],
    (group, t, dh): (usize, usize, usize),
    scale: T,
    o: &mut [T],
    lse: &mut [T],
) -> candle_core::Result<()> {
    let ld = p.n.max(1);
    let mut sc = vec![T::ZERO; QB * ld];
    for h in 0..group {
        let mut i0 = 0;
        while i0 < t {
            let rows = QB.min(t - i0);
            let nmax = block_keys(n_vis, i0, rows);
            let base = h * t + i0;
            let i_first = i0;
            i0 += rows;
            if nmax == 0 {
                continue; // zeros, lse -inf
            }
            // S = scale · Q Kᵀ over the first nmax packed keys.
            prod(
                p.prec,
                (rows, nmax, dh),
                Mat::rows(&q[base * dh..], dh),
                Mat::rows_t(&p.kp, dh),
                p.kt.as_ref(),
                (&mut sc, ld),
                false,
                scale,
            )?;
            // P = softmax over each row's visible prefix, zero past it.
            for r in 0..rows {
                let row = &mut sc[r * ld..r * ld + nmax];
                let n = n_vis[i_first + r] as usize;
                if n > 0 {
                    let m = max(&row[..n]);
                    let l = exp_shift_sum::<T, FMA>(&mut row[..n], m);
                    let inv = T::ONE / l;
                    for x in row[..n].iter_mut() {
                        *x *= inv;
                    }
                    lse[base + r] = m + l.ln();
                }
                row[n..].fill(T::ZERO);
            }
            // O = P V.
            prod(
                p.prec,
                (rows, dh, nmax),
                Mat::rows(&sc, ld),
                Mat::rows(&p.vp, dh),
                p.vn.as_ref(),
                (&mut o[base * dh..], dh),
                false,
                T::ONE,
            )?;
        }
    }
    Ok(())
}

/// Forward-pass tensors of one group, read by the backward pass.
struct GroupIo<'a, T> {
    q: &'a [T],
    o: &'a [T],
    g: &'a [T],
    lse: &'a [T],
}

multiversion! {
    /// Backward pass of one (batch, key/value head) and its `group` query heads; writes
    /// `dq: [group, t, dh]` and returns `(dk, dv)` in packed key order.
    fn group_bwd => group_bwd_impl(
        io: &GroupIo<'_, T>, p: &Packed<T>, n_vis: &[u32], shape: (usize, usize, usize),
        scale: T, dq: &mut [T],
    ) -> candle_core::Result<(Vec<T>, Vec<T>)>
}

#[inline(always)]
fn group_bwd_impl<T: Float, const FMA: bool>(
    io: &GroupIo<'_, T>,
    p: &Packed<T>,
    n_vis: &[u32],
    (group, t, dh): (usize, usize, usize),
    scale: T,
    dq: &mut [T],
) -> candle_core::Result<(Vec<T>, Vec<T>)> {
    let n = p.n;
    let ld = n.max(1);
    let mut dkp = vec![T::ZERO; n * dh];
    let mut dvp = vec![T::ZERO; n * dh];
    let mut pm = vec![T::ZERO; QB * ld]; // P
    let mut dp = vec![T::ZERO; QB * ld]; // dP, then dS
    for h in 0..group {
        let mut i0 = 0;
        while i0 < t {
            let rows = QB.min(t - i0);
            let nmax = block_keys(n_vis, i0, rows);
            let base = h * t + i0;
            let i_first = i0;
            i0 += rows;
            if nmax == 0 {
                continue; // zero gradient (dq is zero-initialised)
            }
            let (qb, gb) = (&io.q[base * dh..], &io.g[base * dh..]);
            // P = exp(S − lse), recomputed; dP = dO Vᵀ.
            prod(
                p.prec,
                (rows, nmax, dh),
                Mat::rows(qb, dh),
                Mat::rows_t(&p.kp, dh),
                p.kt.as_ref(),
                (&mut pm, ld),
                false,
                scale,
            )?;
            prod(
                p.prec,
                (rows, nmax, dh),
                Mat::rows(gb, dh),
                Mat::rows_t(&p.vp, dh),
                p.vt.as_ref(),
                (&mut dp, ld),
                false,
                T::ONE,
            )?;
            for r in 0..rows {
                let n_r = n_vis[i_first + r] as usize;
                let (prow, dprow) = (
                    &mut pm[r * ld..r * ld + nmax],
                    &mut dp[r * ld..r * ld + nmax],
                );
                if n_r > 0 {
                    let row = base + r;
                    exp_shift_sum::<T, FMA>(&mut prow[..n_r], io.lse[row]);
                    // D_i = dO_i · O_i; dS = P ⊙ (dP − D).
                    let di = dot::<T, FMA>(
                        &io.g[row * dh..(row + 1) * dh],
                        &io.o[row * dh..(row + 1) * dh],
                    );
                    for (x, &pv) in dprow[..n_r].iter_mut().zip(prow[..n_r].iter()) {
                        *x = pv * (*x - di);
                    }
                }
                prow[n_r..].fill(T::ZERO);
                dprow[n_r..].fill(T::ZERO);
            }
            // dQ = scale · dS K; dK += scale · dSᵀ Q; dV += Pᵀ dO.
            prod(
                p.prec,
                (rows, dh, nmax),
                Mat::rows(&dp, ld),
                Mat::rows(&p.kp, dh),
                p.kn.as_ref(),
                (&mut dq[base * dh..], dh),
                false,
                scale,
            )?;
            matmul_scaled(
                p.prec,
                (nmax, dh, rows),
                Mat::rows_t(&dp, ld),
                Mat::rows(qb, dh),
                (&mut dkp, dh),
                true,
                (scale, 1),
            )?;
            matmul_scaled(
                p.prec,
                (nmax, dh, rows),
                Mat::rows_t(&pm, ld),
                Mat::rows(gb, dh),
                (&mut dvp, dh),
                true,
                (T::ONE, 1),
            )?;
        }
    }
    Ok((dkp, dvp))
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "mor-attention"
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
        let (hq, hkv, b, t, s, dh) = (self.hq, self.hkv, self.b, self.t, self.s, self.dh);
        let (qs, ks) = ([b, hq, t, dh], [b, hkv, s, dh]);
        match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => self.fwd::<f32>(
                fwd_slice(self.name(), s1, l1, &qs)?,
                fwd_slice(self.name(), s2, l2, &ks)?,
                fwd_slice(self.name(), s3, l3, &ks)?,
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => self.fwd::<f64>(
                fwd_slice(self.name(), s1, l1, &qs)?,
                fwd_slice(self.name(), s2, l2, &ks)?,
                fwd_slice(self.name(), s3, l3, &ks)?,
            ),
            _ => Err(bail_dtype(self.name(), s1)),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = match q.dtype() {
            candle_core::DType::F32 => self.bwd_typed::<f32>(q, k, v, res, grad)?,
            candle_core::DType::F64 => self.bwd_typed::<f64>(q, k, v, res, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Packing the keys and values once per (batch, key/value head) for all query blocks
    /// gives the same output, log-sum-exp and gradients, bit for bit, as packing them for
    /// every block product, in both precisions: several query blocks, a partial last
    /// block, an odd number of visible keys (bf16 pairs), padded keys and queries, GQA.
    #[test]
    fn packing_once_equals_packing_per_block() {
        let (b, hq, hkv, t, s, dh) = (2, 4, 2, 150, 150, 40);
        let mut q_pos: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
        let mut k_pos = q_pos.clone();
        q_pos[3] = PAD_POS;
        k_pos[7] = PAD_POS;
        k_pos[t + 20] = PAD_POS;
        k_pos.swap(10, 11);
        let d = AttnDims {
            b,
            hq,
            hkv,
            t,
            s,
            dh,
            q_pos,
            k_pos,
        };
        let q = values(b * hq * t * dh, 1);
        let k = values(b * hkv * s * dh, 2);
        let v = values(b * hkv * s * dh, 3);
        let g = values(b * hq * t * dh, 4);
        for prec in [Prec::F32, Prec::Bf16] {
            let mut runs = Vec::new();
            for prepack in [false, true] {
                let mut op = AttentionOp::new(&d).with_prec(prec);
                op.prepack = prepack;
                let (o, lse) = op.fwd_slices(&q, &k, &v).unwrap();
                let (dq, dk, dv) = op.bwd_slices(&q, &k, &v, &o, &g, &lse).unwrap();
                runs.push([o, lse, dq, dk, dv]);
            }
            for (name, (x, y)) in ["o", "lse", "dq", "dk", "dv"]
                .iter()
                .zip(runs[0].iter().zip(runs[1].iter()))
            {
                assert!(x.iter().any(|&e| e != 0.0), "{prec:?} {name}: all zero");
                let xb: Vec<u32> = x.iter().map(|e| e.to_bits()).collect();
                let yb: Vec<u32> = y.iter().map(|e| e.to_bits()).collect();
                assert_eq!(xb, yb, "{prec:?} {name}");
            }
        }
    }
}
