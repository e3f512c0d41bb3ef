//! Views of the stored keys and values, and single-query decode attention over them.

use super::pool::Rows;
use super::{BlockPool, Page};
use crate::{Error, Result, StepKv};
use candle_core::{Device, Tensor};
use mor_kernels::cpu::isa::{detected, tier, Tier};
use std::borrow::Cow;

const ATTEND: &str = "attend";

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid {
        policy: ATTEND,
        msg: msg.into(),
    }
}

/// The keys and values a query attends to, borrowed from the block storage (no copy).
///
/// The entries are the tokens of the base page in position order; under hybrid, a token
/// that also has an entry in the overlay page (the step-r slot) shows that entry instead.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    pool: &'a BlockPool,
    base: &'a Page,
    overlay: Option<&'a Page>,
    num_kv_heads: usize,
    head_dim: usize,
}

/// One entry of a [`KvView`].
#[derive(Debug, Clone, PartialEq)]
pub struct KvToken<'a> {
    /// Absolute position.
    pub pos: u32,
    /// Key row `[hkv · dh]`, head-major (borrowed from an f32 pool, widened from a bf16 one).
    pub k: Cow<'a, [f32]>,
    /// Value row `[hkv · dh]`, head-major.
    pub v: Cow<'a, [f32]>,
}

/// A dense copy of a view.
///
/// # Shapes
/// `k, v: [hkv, n, dh]` row-major, `pos: [n]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseKv {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Positions.
    pub pos: Vec<u32>,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl<'a> KvView<'a> {
    /// The view of `base` (positions ascending) with `overlay` entries (a subset of the base
    /// positions) shown in place of the base entries at the same positions.
    pub(crate) fn new(
        pool: &'a BlockPool,
        base: &'a Page,
        overlay: Option<&'a Page>,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        KvView {
            pool,
            base,
            overlay,
            num_kv_heads,
            head_dim,
        }
    }

    /// Entries in the view.
    pub fn len(&self) -> usize {
        self.base.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The entries in position order.
    pub fn iter(&self) -> KvIter<'a> {
        KvIter {
            view: *self,
            i: 0,
            o: 0,
        }
    }

    /// Entries a query at `q_pos` sees: those at positions `<= q_pos` (positions ascend,
    /// so a prefix of the view).
    pub fn visible_len(&self, q_pos: u32) -> usize {
        let (mut lo, mut hi) = (0, self.base.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.pool.pos_at(self.base, mid) <= q_pos {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Asks the CPU to bring the K and V rows a query at `q_pos` reads (the base blocks
    /// up to `q_pos`, and the overlay's) into its second-level cache, so that a later
    /// [`attend_into`] over this view does not wait on memory. A hint: no effect on any
    /// value.
    pub fn prefetch(&self, q_pos: u32) {
        for b in 0..self.base.blocks().len() {
            let (pos, ks, vs) = self.pool.block(self.base, b);
            if pos.first().is_some_and(|&p| p > q_pos) {
                break;
            }
            ks.prefetch(false);
            vs.prefetch(false);
        }
        if let Some(ov) = self.overlay {
            for b in 0..ov.blocks().len() {
                let (_, ks, vs) = self.pool.block(ov, b);
                ks.prefetch(false);
                vs.prefetch(false);
            }
        }
    }

    /// The positions in order.
    pub fn positions(&self) -> Vec<u32> {
        self.iter().map(|t| t.pos).collect()
    }

    /// A dense copy, `[hkv, n, dh]` (for callers that want a tensor; [`attend`] needs none).
    pub fn to_dense(&self) -> DenseKv {
        let (h, dh, n) = (self.num_kv_heads, self.head_dim, self.len());
        let mut k = vec![0f32; h * n * dh];
        let mut v = vec![0f32; h * n * dh];
        let mut pos = Vec::with_capacity(n);
        for (i, t) in self.iter().enumerate() {
            for g in 0..h {
                k[(g * n + i) * dh..(g * n + i + 1) * dh]
                    .copy_from_slice(&t.k[g * dh..(g + 1) * dh]);
                v[(g * n + i) * dh..(g * n + i + 1) * dh]
                    .copy_from_slice(&t.v[g * dh..(g + 1) * dh]);
            }
            pos.push(t.pos);
        }
        DenseKv {
            k,
            v,
            pos,
            num_kv_heads: h,
            head_dim: dh,
        }
    }

    /// The view as a [`StepKv`] of batch 1 on `device`: `k, v: [1, hkv, n, dh]`,
    /// `pos: [1, n]` (u32).
    ///
    /// # Errors
    /// A candle error when the tensors cannot be created on `device`.
    pub fn to_step_kv(&self, device: &Device) -> Result<StepKv> {
        let d = self.to_dense();
        let n = d.pos.len();
        let shape = (1, d.num_kv_heads, n, d.head_dim);
        Ok(StepKv {
            k: Tensor::from_vec(d.k, shape, device)?,
            v: Tensor::from_vec(d.v, shape, device)?,
            pos: Tensor::from_vec(d.pos, (1, n), device)?,
        })
    }
}

impl<'a> IntoIterator for KvView<'a> {
    type Item = KvToken<'a>;
    type IntoIter = KvIter<'a>;
    fn into_iter(self) -> KvIter<'a> {
        self.iter()
    }
}

/// Iterator over the entries of a [`KvView`] in position order.
#[derive(Debug, Clone)]
pub struct KvIter<'a> {
    view: KvView<'a>,
    i: usize,
    o: usize,
}

impl<'a> Iterator for KvIter<'a> {
    type Item = KvToken<'a>;

    fn next(&mut self) -> Option<KvToken<'a>> {
        let v = self.view;
        if self.i >= v.base.len() {
            return None;
        }
        let (pos, k, vv) = v.pool.token(v.base, self.i);
        self.i += 1;
        if let Some(ov) = v.overlay {
            if self.o < ov.len() && v.pool.pos_at(ov, self.o) == pos {
                let (_, k, vv) = v.pool.token(ov, self.o);
                self.o += 1;
                return Some(KvToken {
                    pos,
                    k: k.to_f32(),
                    v: vv.to_f32(),
                });
            }
        }
        Some(KvToken {
            pos,
            k: k.to_f32(),
            v: vv.to_f32(),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.view.base.len() - self.i;
        (n, Some(n))
    }
}

impl ExactSizeIterator for KvIter<'_> {}

/// Single-query causal attention with GQA over `view`: query head `i` attends with kv head
/// `i / (hq / hkv)` to every entry whose position is `<= q_pos`, with scores scaled by
/// `scale` (usually `1/sqrt(dh)`). Returns `[hq · dh]`; a query with no visible key gets
/// zeros (as `mor_kernels::Backend::attention`).
///
/// # Shapes
/// `q: [hq · dh]` head-major → `[hq · dh]`.
///
/// # Errors
/// [`Error::Invalid`] when `hq` is 0 or not a multiple of `hkv`, or `q` is not `hq · dh`
/// long.
pub fn attend(view: &KvView<'_>, q: &[f32], q_pos: u32, hq: usize, scale: f32) -> Result<Vec<f32>> {
    let mut out = vec![0f32; q.len()];
    attend_into(view, q, q_pos, hq, scale, &mut out)?;
    Ok(out)
}

/// [`attend`] writing into `out` (`[hq · dh]`). One pass over the visible blocks: per
/// block, the scores of all its tokens and query heads, one rescale of the running
/// accumulators per head (online softmax), then the weighted values. Scratch is `hq ·
/// (2 + block_tokens)` floats and one row reference per block token, allocated once per call.
///
/// # Errors
/// As [`attend`], and when `out` is not `hq · dh` long.
pub fn attend_into(
    view: &KvView<'_>,
    q: &[f32],
    q_pos: u32,
    hq: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    // The run-time tier is never above the detected one.
    attend_into_tier(view, q, q_pos, hq, scale, out, tier())
}

/// [`attend_into`] at instruction-set tier `tier` instead of the one chosen at run time
/// ([`mor_kernels::cpu::isa::tier`], lowered by `MOR_CPU_TIER`), so that one process can
/// compare the versions.
///
/// The tiers agree to float rounding, not bit for bit: [`Tier::Portable`] and
/// [`Tier::Avx2`] run the same loop (multiply then add, libm `exp`) and give identical
/// results; [`Tier::Avx512`] and above (when `dh` is a multiple of 16) fuse the multiply-adds
/// and use a polynomial `exp` (relative error about `2e-7`), so their outputs differ from the
/// lower tiers by a few ulp of the weights (`|Δ| ≤ 1e-5 · (1 + |out|)` in the tests). Within
/// one tier the result depends only on the query and the view (batch-invariant).
///
/// # Errors
/// As [`attend_into`], and [`Error::Invalid`] when this CPU does not support `tier`.
pub fn attend_into_tier(
    view: &KvView<'_>,
    q: &[f32],
    q_pos: u32,
    hq: usize,
    scale: f32,
    out: &mut [f32],
    tier: Tier,
) -> Result<()> {
    if tier > detected() {
        return Err(invalid(format!(
            "tier {tier} is above what this CPU supports ({})",
            detected()
        )));
    }
    check_shapes(view, q, hq, out)?;
    let query = Query {
        q,
        pos: q_pos,
        hq,
        scale,
    };
    attend_checked(view, query, out, tier);
    Ok(())
}

/// Validates the head counts and the lengths of `q` and `out`.
fn check_shapes(view: &KvView<'_>, q: &[f32], hq: usize, out: &[f32]) -> Result<()> {
    let (hkv, dh) = (view.num_kv_heads, view.head_dim);
    if hq == 0 || !hq.is_multiple_of(hkv) {
        return Err(invalid(format!(
            "{hq} query heads are not a positive multiple of {hkv} kv heads"
        )));
    }
    if q.len() != hq * dh || out.len() != hq * dh {
        return Err(invalid(format!(
            "q and out must hold hq·dh = {hq}·{dh} floats, got {} and {}",
            q.len(),
            out.len()
        )));
    }
    Ok(())
}

/// One validated query: `q` (`[hq · dh]`), its position and the score scale.
#[derive(Clone, Copy)]
struct Query<'q> {
    q: &'q [f32],
    pos: u32,
    hq: usize,
    scale: f32,
}

/// Runs the version of `tier` on validated shapes (`tier` at most [`detected`]).
fn attend_checked(view: &KvView<'_>, query: Query<'_>, out: &mut [f32], tier: Tier) {
    #[cfg(target_arch = "x86_64")]
    {
        if tier >= Tier::Avx512 && view.head_dim.is_multiple_of(16) {
            // SAFETY: `tier` is at most the detected tier, and Tier::Avx512 implies AVX-512
            // F/BW/DQ/VL, AVX2 and FMA; `dh` is a multiple of 16 as `attend_avx512` needs.
            unsafe { attend_avx512(view, query, out) };
            return;
        }
        if tier >= Tier::Avx2 {
            // SAFETY: Tier::Avx2 (or above) implies the CPU supports AVX2.
            unsafe { attend_avx2(view, query, out) };
            return;
        }
    }
    let _ = tier;
    attend_kernel(view, query, out);
}

/// [`attend_kernel`] compiled with AVX2 enabled (8-wide vectors for the dot products and
/// the value accumulation).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(view: &KvView<'_>, query: Query<'_>, out: &mut [f32]) {
    attend_kernel(view, query, out)
}

/// The body of [`attend_into`] on validated shapes.
#[inline(always)]
fn attend_kernel(view: &KvView<'_>, query: Query<'_>, out: &mut [f32]) {
    let (q, q_pos, hq, scale) = (query.q, query.pos, query.hq, query.scale);
    let (hkv, dh) = (view.num_kv_heads, view.head_dim);
    let group = hq / hkv;
    let row = hkv * dh;
    let bt = view.pool.block_tokens();
    out.fill(0.0);
    // Running max and running sum of exp(score - max) per query head.
    let mut max = vec![f32::NEG_INFINITY; hq];
    let mut sum = vec![0f32; hq];
    // Scores of the current block, token-major: scores[t * hq + i].
    let mut scores = vec![0f32; bt * hq];
    walk_blocks(view, q_pos, false, |ks, vs, n| {
        let (Rows::F32(kb), Rows::F32(vb)) = (ks, vs) else {
            unreachable!("walk_blocks widens every block when asked to")
        };
        // Scores and the block maximum per head.
        for (t, k) in kb.chunks_exact(row).enumerate() {
            let st = &mut scores[t * hq..(t + 1) * hq];
            for g in 0..hkv {
                let kh = &k[g * dh..(g + 1) * dh];
                for i in g * group..(g + 1) * group {
                    st[i] = dot(&q[i * dh..(i + 1) * dh], kh) * scale;
                }
            }
        }
        for i in 0..hq {
            let m = (0..n).fold(max[i], |m, t| m.max(scores[t * hq + i]));
            if m > max[i] {
                let c = (max[i] - m).exp();
                sum[i] *= c;
                out[i * dh..(i + 1) * dh].iter_mut().for_each(|a| *a *= c);
                max[i] = m;
            }
        }
        for (t, v) in vb.chunks_exact(row).enumerate() {
            let st = &scores[t * hq..(t + 1) * hq];
            for g in 0..hkv {
                let vh = &v[g * dh..(g + 1) * dh];
                for i in g * group..(g + 1) * group {
                    let w = (st[i] - max[i]).exp();
                    sum[i] += w;
                    axpy(&mut out[i * dh..(i + 1) * dh], w, vh);
                }
            }
        }
    });
    normalize(out, &sum, dh);
}

/// Divides each head's accumulated values by its softmax sum (zeros for a head that saw no
/// key).
#[inline(always)]
fn normalize(out: &mut [f32], sum: &[f32], dh: usize) {
    for (acc, &s) in out.chunks_exact_mut(dh).zip(sum) {
        if s > 0.0 {
            let inv = 1.0 / s;
            acc.iter_mut().for_each(|a| *a *= inv);
        } else {
            acc.fill(0.0);
        }
    }
}

/// Calls `block(k, v, n)` for each block of `view` with visible tokens (positions `<=
/// q_pos`), in position order: the K and V rows of its `n` visible tokens, with the overlay
/// entries shown in place of the base entries at the same positions. Rows come as stored
/// (borrowed) when no overlay entry replaces one and the storage is f32, or bf16 and
/// `bf16_direct`; otherwise widened to f32 in a buffer. The blocks' rows are prefetched
/// first (each block is its own place in the pool, so the hardware prefetcher cannot guess
/// the next one).
#[inline(always)]
fn walk_blocks<'a>(
    view: &KvView<'a>,
    q_pos: u32,
    bf16_direct: bool,
    mut block: impl FnMut(Rows<'_>, Rows<'_>, usize),
) {
    let pool = view.pool;
    let row = view.num_kv_heads * view.head_dim;
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    let mut o = 0usize;
    let mut next_overlay = view
        .overlay
        .and_then(|ov| (!ov.is_empty()).then(|| pool.pos_at(ov, 0)));
    let blocks = view.base.blocks().len();
    // Every block's rows are requested before the first is read, so that their loads from
    // memory overlap (the view is read once per step: at decode batches its blocks are
    // rarely still cached).
    for b in 0..blocks {
        let (pos, ks, vs) = pool.block(view.base, b);
        if pos.first().is_some_and(|&p| p > q_pos) {
            break;
        }
        ks.prefetch(true);
        vs.prefetch(true);
    }
    for b in 0..blocks {
        let (pos, ks, vs) = pool.block(view.base, b);
        // The visible tokens of this block (positions ascend, so the cut is a prefix).
        let n = pos.iter().take_while(|&&p| p <= q_pos).count();
        if n == 0 {
            break;
        }
        let last = pos[n - 1];
        let overlaid = matches!(next_overlay, Some(op) if view.overlay.is_some() && op <= last);
        match (ks, vs, overlaid) {
            (Rows::Bf16(k), Rows::Bf16(v), false) if bf16_direct => {
                block(Rows::Bf16(&k[..n * row]), Rows::Bf16(&v[..n * row]), n)
            }
            _ => {
                let (kb, vb) = block_kv(
                    view,
                    &pos[..n],
                    ks,
                    vs,
                    &mut o,
                    &mut next_overlay,
                    &mut kbuf,
                    &mut vbuf,
                );
                block(Rows::F32(kb), Rows::F32(vb), n)
            }
        }
        if n < pos.len() {
            break;
        }
    }
}

/// The K and V rows of the visible tokens `pos` of one base block (`ks`, `vs`) as
/// contiguous f32 (`[n · row]` each), with the overlay entries (cursor `o`, next overlay
/// position `next_overlay`) shown in place of the base entries at the same positions.
/// Borrowed from an f32 pool when the block has no overlay entry, else assembled in
/// `kbuf`/`vbuf` (widening bf16 storage).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_kv<'a: 'b, 'b>(
    view: &KvView<'a>,
    pos: &[u32],
    ks: Rows<'a>,
    vs: Rows<'a>,
    o: &mut usize,
    next_overlay: &mut Option<u32>,
    kbuf: &'b mut Vec<f32>,
    vbuf: &'b mut Vec<f32>,
) -> (&'b [f32], &'b [f32]) {
    let pool = view.pool;
    let row = view.num_kv_heads * view.head_dim;
    let len = pos.len() * row;
    let last = pos.last().copied().unwrap_or(0);
    let overlaid = matches!(*next_overlay, Some(op) if view.overlay.is_some() && op <= last);
    if let (Rows::F32(k), Rows::F32(v), false) = (ks, vs, overlaid) {
        return (&k[..len], &v[..len]);
    }
    if kbuf.len() < len {
        kbuf.resize(len, 0.0);
        vbuf.resize(len, 0.0);
    }
    ks.copy_to(&mut kbuf[..len]);
    vs.copy_to(&mut vbuf[..len]);
    if let Some(ov) = view.overlay {
        for (t, &p) in pos.iter().enumerate() {
            if *next_overlay == Some(p) {
                let (_, k, v) = pool.token(ov, *o);
                k.copy_to(&mut kbuf[t * row..(t + 1) * row]);
                v.copy_to(&mut vbuf[t * row..(t + 1) * row]);
                *o += 1;
                *next_overlay = (*o < ov.len()).then(|| pool.pos_at(ov, *o));
            }
        }
    }
    (&kbuf[..len], &vbuf[..len])
}

/// The AVX-512 version of [`attend_kernel`] for `dh` a multiple of 16: 16-wide fused
/// multiply-adds for the scores and the weighted values (each output chunk stays in a
/// register across the tokens of a block), and a vectorised `exp` over each head's block
/// scores. Same block order and online-softmax rescaling as [`attend_kernel`]; bf16
/// storage is read directly (widened in registers) where no overlay entry replaces a row.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, AVX2 and FMA, and `view.head_dim` must be a
/// multiple of 16; shapes as validated by [`check_shapes`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn attend_avx512(view: &KvView<'_>, query: Query<'_>, out: &mut [f32]) {
    let (q, q_pos, hq, scale) = (query.q, query.pos, query.hq, query.scale);
    let (hkv, dh) = (view.num_kv_heads, view.head_dim);
    let bt = view.pool.block_tokens();
    let mut st = Avx512State {
        hq,
        hkv,
        dh,
        scale,
        // Per-head score rows padded to whole vectors: scores[i * bs + t].
        bs: bt.div_ceil(16) * 16,
        max: vec![f32::NEG_INFINITY; hq],
        sum: vec![0f32; hq],
        scores: vec![0f32; hq * bt.div_ceil(16) * 16],
    };
    out.fill(0.0);
    walk_blocks(view, q_pos, true, |ks, vs, n| match (ks, vs) {
        // SAFETY: AVX-512 (this function's contract); rows of `row` elements.
        (Rows::Bf16(k), Rows::Bf16(v)) => unsafe { st.block(k, v, n, q, out) },
        // SAFETY: as above.
        (Rows::F32(k), Rows::F32(v)) => unsafe { st.block(k, v, n, q, out) },
        _ => unreachable!("K and V rows share a precision"),
    });
    normalize(out, &st.sum, dh);
}

/// A stored K/V element type the AVX-512 kernel loads 16 at a time as f32.
#[cfg(target_arch = "x86_64")]
trait Lane16: Copy {
    /// Loads 16 consecutive elements at `p` widened to f32.
    ///
    /// # Safety
    /// AVX-512 F; `p` points at 16 readable elements.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl Lane16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lane16 for u16 {
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 u16 = 32 bytes readable). A bf16 value is the
        // high half of its f32: zero-extend and shift left by 16 (exact).
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// Running state of [`attend_avx512`]: online-softmax maximum and sum per query head and
/// the padded score rows of the current block.
#[cfg(target_arch = "x86_64")]
struct Avx512State {
    hq: usize,
    hkv: usize,
    dh: usize,
    scale: f32,
    bs: usize,
    max: Vec<f32>,
    sum: Vec<f32>,
    scores: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl Avx512State {
    /// One block of `n` visible tokens with K and V rows `kb`, `vb` (`[n · hkv · dh]`):
    /// scores, rescale of the running accumulators in `out`, weights, weighted values.
    ///
    /// # Safety
    /// AVX-512 F/BW/DQ/VL, AVX2 and FMA; `dh` a multiple of 16; `kb`, `vb` hold `n` rows.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn block<E: Lane16>(
        &mut self,
        kb: &[E],
        vb: &[E],
        n: usize,
        q: &[f32],
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let (hq, hkv, dh, bs) = (self.hq, self.hkv, self.dh, self.bs);
        let group = hq / hkv;
        let row = hkv * dh;
        debug_assert!(kb.len() >= n * row && vb.len() >= n * row);
        // Scores: q_i · k_t for every query head i of the group of kv head g, each K chunk
        // loaded once per group.
        for g in 0..hkv {
            let heads = g * group..(g + 1) * group;
            let q0 = &q[heads.start * dh..heads.end * dh];
            let s0 = &mut self.scores[heads.start * bs..heads.end * bs];
            let kg = &kb[g * dh..];
            // SAFETY: (every call) AVX-512; the group's queries and score rows, and `n` K rows
            // of stride `row` holding this head's `dh` elements.
            match group {
                1 => unsafe { group_scores::<E, 1>(s0, bs, q0, dh, kg, row, n, self.scale) },
                2 => unsafe { group_scores::<E, 2>(s0, bs, q0, dh, kg, row, n, self.scale) },
                4 => unsafe { group_scores::<E, 4>(s0, bs, q0, dh, kg, row, n, self.scale) },
                _ => {
                    for h in 0..group {
                        let (qh, sh) = (&q0[h * dh..(h + 1) * dh], &mut s0[h * bs..(h + 1) * bs]);
                        unsafe { group_scores::<E, 1>(sh, bs, qh, dh, kg, row, n, self.scale) }
                    }
                }
            }
        }
        for i in 0..hq {
            let s = &mut self.scores[i * bs..(i + 1) * bs];
            let m = s[..n].iter().fold(self.max[i], |m, &x| m.max(x));
            let acc = &mut out[i * dh..(i + 1) * dh];
            if m > self.max[i] {
                let c = (self.max[i] - m).exp();
                self.sum[i] *= c;
                acc.iter_mut().for_each(|a| *a *= c);
                self.max[i] = m;
            }
            // Weights exp(s - max) over whole vectors (the padding lanes are not used).
            let mv = _mm512_set1_ps(self.max[i]);
            for ch in s.chunks_exact_mut(16).take(n.div_ceil(16)) {
                // SAFETY: `ch` holds 16 floats.
                unsafe {
                    let x = _mm512_loadu_ps(ch.as_ptr());
                    _mm512_storeu_ps(ch.as_mut_ptr(), exp512(_mm512_sub_ps(x, mv)));
                }
            }
            self.sum[i] += s[..n].iter().sum::<f32>();
        }
        // Weighted values: each V chunk loaded once per group, four (one or two heads) or
        // two (four heads) chunks' chains at a time; each lane's chain still runs over t in
        // order, so every head's result is the one it would get alone.
        for g in 0..hkv {
            let heads = g * group..(g + 1) * group;
            let w = &self.scores[heads.start * bs..heads.end * bs];
            let acc = &mut out[heads.start * dh..heads.end * dh];
            let vg = &vb[g * dh..];
            // SAFETY: (every call) AVX-512; chunks `c..c + C` lie inside each head of the
            // group (`c·16 + 16·C <= dh`) and inside each of the `n` V rows.
            match group {
                1 => unsafe { group_values::<E, 4, 1>(acc, dh, vg, row, w, bs, n) },
                2 => unsafe { group_values::<E, 4, 2>(acc, dh, vg, row, w, bs, n) },
                4 => unsafe { group_values::<E, 2, 4>(acc, dh, vg, row, w, bs, n) },
                _ => {
                    for h in 0..group {
                        let (ah, wh) = (&mut acc[h * dh..(h + 1) * dh], &w[h * bs..(h + 1) * bs]);
                        unsafe { group_values::<E, 4, 1>(ah, dh, vg, row, wh, bs, n) }
                    }
                }
            }
        }
    }
}

/// Scores of the `G` query heads of one kv head over `n` tokens: `s[h·bs + t] = scale ·
/// (q_h · k_t)`, `q_h = q[h·dh..][..dh]`, `k_t = k[t·row..][..dh]`. Each dot product is one
/// 16-lane fused multiply-add chain over the chunks of the head, then a reduction (as for
/// a head alone); each K chunk is loaded once for the `G` heads.
///
/// # Safety
/// AVX-512 F; `dh` a multiple of 16; `q` holds `G·dh` floats, `s` `G·bs` with `bs >= n`,
/// `k` `(n - 1)·row + dh` elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn group_scores<E: Lane16, const G: usize>(
    s: &mut [f32],
    bs: usize,
    q: &[f32],
    dh: usize,
    k: &[E],
    row: usize,
    n: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() >= G * dh && s.len() >= (G - 1) * bs + n);
    debug_assert!(n == 0 || k.len() >= (n - 1) * row + dh);
    for t in 0..n {
        // SAFETY: (every `unsafe` below) the caller's contract.
        let mut acc = [unsafe { _mm512_setzero_ps() }; G];
        for c in 0..dh / 16 {
            let kk = unsafe { E::load16(k.as_ptr().add(t * row + c * 16)) };
            for (h, a) in acc.iter_mut().enumerate() {
                let qv = unsafe { _mm512_loadu_ps(q.as_ptr().add(h * dh + c * 16)) };
                *a = unsafe { _mm512_fmadd_ps(qv, kk, *a) };
            }
        }
        for (h, a) in acc.iter().enumerate() {
            s[h * bs + t] = unsafe { _mm512_reduce_add_ps(*a) } * scale;
        }
    }
}

/// `acc[h·dh + j..][..16] += Σ_t w[h·bs + t] · v[t·row + j..][..16]` for the `G` heads `h`
/// and every chunk `j` of the head, `C` chunks at a time: one fused multiply-add chain per
/// lane over the tokens `t < n` in order (as for a head alone), each V chunk loaded once
/// for the `G` heads.
///
/// # Safety
/// AVX-512 F; `dh` a multiple of 16; `acc` holds `G·dh` values, `w` `(G - 1)·bs + n`, `v`
/// `(n - 1)·row + dh` elements.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_values<E: Lane16, const C: usize, const G: usize>(
    acc: &mut [f32],
    dh: usize,
    v: &[E],
    row: usize,
    w: &[f32],
    bs: usize,
    n: usize,
) {
    let nc = dh / 16;
    let mut c = 0;
    while c + C <= nc {
        // SAFETY: chunks c..c + C lie inside the head; the caller's contract otherwise.
        unsafe { weighted_values::<E, C, G>(&mut acc[c * 16..], dh, &v[c * 16..], row, w, bs, n) };
        c += C;
    }
    while c < nc {
        // SAFETY: chunk c lies inside the head.
        unsafe { weighted_values::<E, 1, G>(&mut acc[c * 16..], dh, &v[c * 16..], row, w, bs, n) };
        c += 1;
    }
}

/// `acc[h·dh + j·16..][..16] += Σ_t w[h·bs + t] · v[t·row + j·16..][..16]` for the `G`
/// heads `h` and the `C` chunks `j`, the tokens `t < n` in order (one fused multiply-add
/// chain per lane, `G·C` chains in flight, each V chunk loaded once).
///
/// # Safety
/// AVX-512 F; `acc` holds `(G - 1)·dh + 16·C` values, `w` `(G - 1)·bs + n` and `v`
/// `(n - 1)·row + 16·C` elements.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weighted_values<E: Lane16, const C: usize, const G: usize>(
    acc: &mut [f32],
    dh: usize,
    v: &[E],
    row: usize,
    w: &[f32],
    bs: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(acc.len() >= (G - 1) * dh + 16 * C);
    debug_assert!(w.len() >= (G - 1) * bs + n);
    debug_assert!(n == 0 || v.len() >= (n - 1) * row + 16 * C);
    // SAFETY: (every `unsafe` below) the caller's contract.
    let mut a = [[unsafe { _mm512_setzero_ps() }; C]; G];
    for (h, ah) in a.iter_mut().enumerate() {
        for (j, aj) in ah.iter_mut().enumerate() {
            *aj = unsafe { _mm512_loadu_ps(acc.as_ptr().add(h * dh + j * 16)) };
        }
    }
    for t in 0..n {
        let mut vv = [unsafe { _mm512_setzero_ps() }; C];
        for (j, x) in vv.iter_mut().enumerate() {
            *x = unsafe { E::load16(v.as_ptr().add(t * row + j * 16)) };
        }
        for (h, ah) in a.iter_mut().enumerate() {
            let wb = unsafe { _mm512_set1_ps(*w.get_unchecked(h * bs + t)) };
            for (aj, x) in ah.iter_mut().zip(&vv) {
                *aj = unsafe { _mm512_fmadd_ps(wb, *x, *aj) };
            }
        }
    }
    for (h, ah) in a.iter().enumerate() {
        for (j, aj) in ah.iter().enumerate() {
            unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(h * dh + j * 16), *aj) };
        }
    }
}

/// 16-lane `expf` (Cephes: range reduction by `ln 2`, degree-6 polynomial; inputs clamped to
/// `[-87, 88]`, a NaN lane becomes `exp(-87)`), relative error about `2e-7`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let xc = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let shift = _mm512_set1_ps(12_582_912.0); // 1.5 · 2^23: adding it rounds to an integer.
    let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), shift);
    let n = _mm512_sub_ps(t, shift);
    let r = _mm512_fmadd_ps(
        n,
        _mm512_set1_ps(2.121_944_4e-4),
        _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), xc),
    );
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    // 2^n from the integer in the low mantissa bits of t.
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000)),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(y, _mm512_castsi512_ps(e))
}

/// `y += a · x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Dot product with eight independent accumulators (vectorises without fast-math).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, xi), yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s + acc.iter().sum::<f32>()
}
