//! Views of the stored keys and values, and single-query decode attention over them.

use super::{BlockPool, Page};
use crate::{Error, Result, StepKv};
use candle_core::{Device, Tensor};

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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvToken<'a> {
    /// Absolute position.
    pub pos: u32,
    /// Key row `[hkv · dh]`, head-major.
    pub k: &'a [f32],
    /// Value row `[hkv · dh]`, head-major.
    pub v: &'a [f32],
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
                return Some(KvToken { pos, k, v: vv });
            }
        }
        Some(KvToken { pos, k, v: vv })
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
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of
        // `attend_avx2`.
        unsafe { attend_avx2(view, q, q_pos, hq, scale, out) };
        return Ok(());
    }
    attend_kernel(view, q, q_pos, hq, scale, out);
    Ok(())
}

/// [`attend_kernel`] compiled with AVX2 enabled (8-wide vectors for the dot products and
/// the value accumulation).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(
    view: &KvView<'_>,
    q: &[f32],
    q_pos: u32,
    hq: usize,
    scale: f32,
    out: &mut [f32],
) {
    attend_kernel(view, q, q_pos, hq, scale, out)
}

/// The body of [`attend_into`] on validated shapes.
#[inline(always)]
fn attend_kernel(view: &KvView<'_>, q: &[f32], q_pos: u32, hq: usize, scale: f32, out: &mut [f32]) {
    let (hkv, dh) = (view.num_kv_heads, view.head_dim);
    let group = hq / hkv;
    let row = hkv * dh;
    let pool = view.pool;
    let bt = pool.block_tokens();
    out.fill(0.0);
    // Running max and running sum of exp(score - max) per query head.
    let mut max = vec![f32::NEG_INFINITY; hq];
    let mut sum = vec![0f32; hq];
    // Scores of the current block, token-major: scores[t * hq + i].
    let mut scores = vec![0f32; bt * hq];
    let mut rows: Vec<(&[f32], &[f32])> = Vec::with_capacity(bt);
    let mut o = 0usize;
    let mut next_overlay = view
        .overlay
        .and_then(|ov| (!ov.is_empty()).then(|| pool.pos_at(ov, 0)));
    for b in 0..view.base.blocks().len() {
        let (pos, ks, vs) = pool.block(view.base, b);
        // The visible tokens of this block (positions ascend, so the cut is a prefix).
        let n = pos.iter().take_while(|&&p| p <= q_pos).count();
        if n == 0 {
            break;
        }
        rows.clear();
        for t in 0..n {
            match (next_overlay, view.overlay) {
                (Some(op), Some(ov)) if op == pos[t] => {
                    let (_, k, v) = pool.token(ov, o);
                    o += 1;
                    next_overlay = (o < ov.len()).then(|| pool.pos_at(ov, o));
                    rows.push((k, v));
                }
                _ => rows.push((&ks[t * row..(t + 1) * row], &vs[t * row..(t + 1) * row])),
            }
        }
        // Scores and the block maximum per head.
        for (t, (k, _)) in rows.iter().enumerate() {
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
        for (t, (_, v)) in rows.iter().enumerate() {
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
        if n < pos.len() {
            break;
        }
    }
    for i in 0..hq {
        let acc = &mut out[i * dh..(i + 1) * dh];
        if sum[i] > 0.0 {
            let inv = 1.0 / sum[i];
            acc.iter_mut().for_each(|a| *a *= inv);
        } else {
            acc.fill(0.0);
        }
    }
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
