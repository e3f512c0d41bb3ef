//! The CPU bodies of the CUDA kernels: the same maths as `kernels/*.cu`, written plainly in
//! f64 on host slices. They are the `cpu_fwd` of the fused ops and the reference that the
//! GPU check compares the kernels against. The top-k here is the kernel's radix select,
//! step for step, so its design is tested on machines without a GPU.
//!
//! Where a kernel skips out-of-range indices (the device cannot report them without a
//! host round trip), these functions return an error instead.

use crate::{Error, Result};

fn invalid(op: &'static str, msg: String) -> Error {
    Error::Invalid { op, msg }
}

/// Router activation of the expert-choice gate (mor-spec §3.1: `g = alpha * G(z)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterActivation {
    /// `G = sigmoid` (the paper's final choice, with `alpha = 0.1`).
    #[default]
    Sigmoid,
    /// `G = tanh`.
    Tanh,
    /// No activation: raw logits.
    None,
}

impl RouterActivation {
    /// The code the kernels take (`MOR_ACT_*` in `mor_common.cuh`).
    pub fn code(self) -> i32 {
        match self {
            RouterActivation::Sigmoid => 0,
            RouterActivation::Tanh => 1,
            RouterActivation::None => 2,
        }
    }

    /// `G(z)`.
    pub fn apply(self, z: f64) -> f64 {
        match self {
            RouterActivation::Sigmoid => 1.0 / (1.0 + (-z).exp()),
            RouterActivation::Tanh => z.tanh(),
            RouterActivation::None => z,
        }
    }

    /// `G'(z)`.
    pub fn derivative(self, z: f64) -> f64 {
        match self {
            RouterActivation::Sigmoid => {
                let s = 1.0 / (1.0 + (-z).exp());
                s * (1.0 - s)
            }
            RouterActivation::Tanh => 1.0 - z.tanh().powi(2),
            RouterActivation::None => 1.0,
        }
    }
}

/// Router score and gate: for each row, `z = (h . w) * inv_temp` and `g = alpha * G(z)`.
/// `h: [n, d]`, `w: [d]` → `[n, 2]` holding `(z, g)` per row.
pub fn router_score(
    h: &[f64],
    w: &[f64],
    n: usize,
    d: usize,
    alpha: f64,
    inv_temp: f64,
    act: RouterActivation,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * n);
    for r in 0..n {
        let z = h[r * d..(r + 1) * d]
            .iter()
            .zip(w)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            * inv_temp;
        out.push(z);
        out.push(alpha * act.apply(z));
    }
    out
}

/// The kernel's order-preserving key of an f32 (`mor_float_key`): `a > b` iff
/// `key(a) > key(b)`; NaN maps to 0, below every number.
pub fn float_key32(f: f32) -> u32 {
    if f.is_nan() {
        return 0;
    }
    let u = f.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The same key for an f64 (used when the scores are f64, which only the CPU supports).
pub fn float_key64(f: f64) -> u64 {
    if f.is_nan() {
        return 0;
    }
    let u = f.to_bits();
    if u & (1 << 63) != 0 {
        !u
    } else {
        u | (1 << 63)
    }
}

/// Keys of one row of scores: the f32 key in the upper half when `exact_f64` is false (the
/// scores are f32 or bf16 values, as on the device), else the f64 key.
fn keys(row: &[f64], exact_f64: bool) -> Vec<u64> {
    row.iter()
        .map(|&v| {
            if exact_f64 {
                float_key64(v)
            } else {
                (float_key32(v as f32) as u64) << 32
            }
        })
        .collect()
}

/// Per-row top-k by the kernel's algorithm: radix select of the k-th largest key, 8 bits
/// per pass from the top, then an ordered compaction that takes every larger key and the
/// earliest positions among the keys equal to it. Returns the chosen positions of each row
/// in ascending order, `[rows, k]`.
///
/// `exact_f64` keys the f64 values themselves (8 passes); otherwise the values are keyed as
/// f32, like the device (the last four passes then see only zero bits).
pub fn topk_sorted_radix(
    scores: &[f64],
    rows: usize,
    n: usize,
    k: usize,
    exact_f64: bool,
) -> Result<Vec<u32>> {
    check_topk(scores.len(), rows, n, k)?;
    let mut out = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let keys = keys(&scores[r * n..(r + 1) * n], exact_f64);
        let (mut prefix, mut mask, mut remaining) = (0u64, 0u64, k as u64);
        for pass in 0..8 {
            let shift = 56 - 8 * pass;
            let mut hist = [0u64; 256];
            for &key in &keys {
                if key & mask == prefix {
                    hist[((key >> shift) & 255) as usize] += 1;
                }
            }
            let mut above = 0u64;
            for b in (0..256).rev() {
                if above + hist[b] >= remaining {
                    prefix |= (b as u64) << shift;
                    mask |= 255u64 << shift;
                    remaining -= above;
                    break;
                }
                above += hist[b];
            }
        }
        let (kth, take_eq) = (prefix, remaining);
        let mut eq_seen = 0u64;
        let before = out.len();
        for (i, &key) in keys.iter().enumerate() {
            let eq = key == kth;
            if key > kth || (eq && eq_seen < take_eq) {
                out.push(i as u32);
            }
            if eq {
                eq_seen += 1;
            }
        }
        if out.len() - before != k {
            return Err(invalid(
                "topk_sorted",
                format!("internal: row {r} selected {} of {k}", out.len() - before),
            ));
        }
    }
    Ok(out)
}

/// Per-row top-k written independently of the kernel: sort by (score descending, position
/// ascending) with NaN last, keep `k`, sort the positions. The oracle of
/// [`topk_sorted_radix`].
pub fn topk_sorted_naive(scores: &[f64], rows: usize, n: usize, k: usize) -> Result<Vec<u32>> {
    check_topk(scores.len(), rows, n, k)?;
    let mut out = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let row = &scores[r * n..(r + 1) * n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (row[a], row[b]);
            match (x.is_nan(), y.is_nan()) {
                (true, true) => a.cmp(&b),
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                // Descending by value; -0.0 ranks below +0.0 as in the key.
                _ => float_key64(y).cmp(&float_key64(x)).then(a.cmp(&b)),
            }
        });
        let mut kept: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
        kept.sort_unstable();
        out.extend(kept);
    }
    Ok(out)
}

fn check_topk(len: usize, rows: usize, n: usize, k: usize) -> Result<()> {
    if len != rows * n {
        return Err(invalid(
            "topk_sorted",
            format!("{len} scores for {rows} rows of {n}"),
        ));
    }
    if k == 0 || k > n {
        return Err(invalid(
            "topk_sorted",
            format!("k = {k} must be in 1..={n} (the candidates per row)"),
        ));
    }
    Ok(())
}

/// RMSNorm forward: `y = x / sqrt(mean(x²) + eps) * w` per row of `d`.
pub fn rms_norm_fwd(x: &[f64], w: &[f64], n: usize, d: usize, eps: f64) -> Vec<f64> {
    let mut y = Vec::with_capacity(n * d);
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let rstd = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        y.extend(xr.iter().zip(w).map(|(a, b)| a * rstd * b));
    }
    y
}

/// RMSNorm backward: returns `(dx [n, d], dw [d])` for the upstream gradient `g`.
pub fn rms_norm_bwd(
    x: &[f64],
    w: &[f64],
    g: &[f64],
    n: usize,
    d: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut dx = Vec::with_capacity(n * d);
    let mut dw = vec![0.0; d];
    for r in 0..n {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let rstd = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        let dot: f64 = (0..d).map(|c| gr[c] * w[c] * xr[c]).sum();
        let coef = rstd.powi(3) * dot / d as f64;
        for c in 0..d {
            dx.push(rstd * gr[c] * w[c] - xr[c] * coef);
            dw[c] += gr[c] * xr[c] * rstd;
        }
    }
    (dx, dw)
}

/// Rotates one `[dh]` row by the table row `p`: `sign = -1` is the inverse rotation.
fn rotate(x: &[f64], cos: &[f64], sin: &[f64], p: usize, half: usize, sign: f64, out: &mut [f64]) {
    for j in 0..half {
        let (c, s) = (cos[p * half + j], sign * sin[p * half + j]);
        let (x1, x2) = (x[j], x[j + half]);
        out[j] = x1 * c - x2 * s;
        out[j + half] = x2 * c + x1 * s;
    }
}

/// Dimensions of a `[b, h, t, dh]` RoPE input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeDims {
    /// Batch.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Tokens (of the output).
    pub t: usize,
    /// Head dimension (even).
    pub dh: usize,
    /// Rows of the cos/sin tables.
    pub max_pos: usize,
}

/// RoPE at explicit positions (HF rotate_half form): `x: [b, h, t, dh]`, `pos: [b, t]`,
/// `cos`/`sin: [max_pos, dh/2]`. Rows at [`crate::PAD_POS`] are copied unchanged; any
/// other position past the table is an error.
pub fn rope_at(
    x: &[f64],
    pos: &[u32],
    cos: &[f64],
    sin: &[f64],
    dims: RopeDims,
    sign: f64,
) -> Result<Vec<f64>> {
    let RopeDims {
        b,
        h,
        t,
        dh,
        max_pos,
    } = dims;
    let half = dh / 2;
    let mut out = x.to_vec();
    for bb in 0..b {
        for hh in 0..h {
            for tt in 0..t {
                let p = pos[bb * t + tt];
                if p == crate::PAD_POS {
                    continue;
                }
                if p as usize >= max_pos {
                    return Err(invalid(
                        "rope",
                        format!("position {p} is past the cos/sin table of {max_pos} rows"),
                    ));
                }
                let o = ((bb * h + hh) * t + tt) * dh;
                rotate(
                    &x[o..o + dh],
                    cos,
                    sin,
                    p as usize,
                    half,
                    sign,
                    &mut out[o..o + dh],
                );
            }
        }
    }
    Ok(out)
}

/// Fused gather + RoPE: `out[b, :, i] = rope(x[b, :, idx[b, i]], position idx[b, i])`.
/// `x: [b, h, l, dh]`, `idx: [b, t]` → `[b, h, t, dh]`. [`crate::PAD_POS`] gives a zero
/// row; any other index `>= l` (or past the table) is an error.
pub fn gather_rope_fwd(
    x: &[f64],
    idx: &[u32],
    cos: &[f64],
    sin: &[f64],
    l: usize,
    dims: RopeDims,
) -> Result<Vec<f64>> {
    let RopeDims {
        b,
        h,
        t,
        dh,
        max_pos,
    } = dims;
    let half = dh / 2;
    let mut out = vec![0.0; b * h * t * dh];
    for bb in 0..b {
        for i in 0..t {
            let src = idx[bb * t + i];
            if src == crate::PAD_POS {
                continue;
            }
            let s = src as usize;
            if s >= l || s >= max_pos {
                return Err(invalid(
                    "gather_rope",
                    format!("index {src} is out of range (l = {l}, table rows = {max_pos})"),
                ));
            }
            for hh in 0..h {
                let xi = ((bb * h + hh) * l + s) * dh;
                let o = ((bb * h + hh) * t + i) * dh;
                rotate(&x[xi..xi + dh], cos, sin, s, half, 1.0, &mut out[o..o + dh]);
            }
        }
    }
    Ok(out)
}

/// Backward of [`gather_rope_fwd`]: `dx [b, h, l, dh]` with `dx[b, :, idx[b, i]] +=
/// rope⁻¹(dout[b, :, i])`.
pub fn gather_rope_bwd(
    dout: &[f64],
    idx: &[u32],
    cos: &[f64],
    sin: &[f64],
    l: usize,
    dims: RopeDims,
) -> Result<Vec<f64>> {
    let RopeDims {
        b,
        h,
        t,
        dh,
        max_pos,
    } = dims;
    let half = dh / 2;
    let mut dx = vec![0.0; b * h * l * dh];
    let mut row = vec![0.0; dh];
    for bb in 0..b {
        for i in 0..t {
            let src = idx[bb * t + i];
            if src == crate::PAD_POS {
                continue;
            }
            let s = src as usize;
            if s >= l || s >= max_pos {
                return Err(invalid(
                    "gather_rope",
                    format!("index {src} is out of range (l = {l}, table rows = {max_pos})"),
                ));
            }
            for hh in 0..h {
                let o = ((bb * h + hh) * t + i) * dh;
                rotate(&dout[o..o + dh], cos, sin, s, half, -1.0, &mut row);
                let xi = ((bb * h + hh) * l + s) * dh;
                for c in 0..dh {
                    dx[xi + c] += row[c];
                }
            }
        }
    }
    Ok(dx)
}

fn sigmoid(a: f64) -> f64 {
    1.0 / (1.0 + (-a).exp())
}

/// SwiGLU forward: `silu(gate) * up`.
pub fn swiglu_fwd(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(&a, &u)| a * sigmoid(a) * u)
        .collect()
}

/// SwiGLU backward: `[2, n]`, the gate gradient then the up gradient.
pub fn swiglu_bwd(gate: &[f64], up: &[f64], dy: &[f64]) -> Vec<f64> {
    let n = gate.len();
    let mut out = vec![0.0; 2 * n];
    for i in 0..n {
        let (a, u, g) = (gate[i], up[i], dy[i]);
        let s = sigmoid(a);
        out[i] = g * u * s * (1.0 + a * (1.0 - s));
        out[n + i] = g * a * s;
    }
    out
}

fn check_index(op: &'static str, v: u32, l: usize) -> Result<usize> {
    if (v as usize) < l {
        Ok(v as usize)
    } else {
        Err(invalid(
            op,
            format!("token index {v} is out of range for a sequence of {l}"),
        ))
    }
}

/// Gather: `out[b, i] = h[b, idx[b, i]]`; `h: [b, l, d]`, `idx: [b, k]` → `[b, k, d]`.
pub fn gather_rows(
    h: &[f64],
    idx: &[u32],
    b: usize,
    l: usize,
    k: usize,
    d: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(b * k * d);
    for bb in 0..b {
        for i in 0..k {
            let s = check_index("gather_tokens", idx[bb * k + i], l)?;
            let o = (bb * l + s) * d;
            out.extend_from_slice(&h[o..o + d]);
        }
    }
    Ok(out)
}

/// In place: `out[b, idx[b, i]] += w[b, i] * y[b, i]` (`w = 1` when `None`). With
/// `distinct`, a repeated index within a row is an error (the kernel's non-atomic mode
/// requires distinct indices); otherwise repeats accumulate.
pub fn index_add_rows(
    out: &mut [f64],
    idx: &[u32],
    y: &[f64],
    w: Option<&[f64]>,
    dims: (usize, usize, usize, usize),
    distinct: bool,
) -> Result<()> {
    let (b, l, k, d) = dims;
    let mut seen = vec![false; if distinct { l } else { 0 }];
    for bb in 0..b {
        if distinct {
            seen.iter_mut().for_each(|s| *s = false);
        }
        for i in 0..k {
            let s = check_index("scatter_add_tokens", idx[bb * k + i], l)?;
            if distinct {
                if seen[s] {
                    return Err(invalid("scatter_add_tokens", format!("token index {s} appears twice in row {bb}; the indices of a row must be distinct")));
                }
                seen[s] = true;
            }
            let wv = w.map_or(1.0, |w| w[bb * k + i]);
            let (o, yi) = ((bb * l + s) * d, (bb * k + i) * d);
            for c in 0..d {
                out[o + c] += wv * y[yi + c];
            }
        }
    }
    Ok(())
}

/// Backward of the weighted scatter-add: `[b * k, d + 1]` rows of `(dy, dw)` with
/// `dy[b, i] = w[b, i] * dout[b, idx[b, i]]` and `dw[b, i] = dout[b, idx[b, i]] · y[b, i]`.
pub fn scatter_add_bwd(
    dout: &[f64],
    idx: &[u32],
    y: &[f64],
    w: &[f64],
    dims: (usize, usize, usize, usize),
) -> Result<Vec<f64>> {
    let (b, l, k, d) = dims;
    let mut out = Vec::with_capacity(b * k * (d + 1));
    for bb in 0..b {
        for i in 0..k {
            let s = check_index("scatter_add_tokens", idx[bb * k + i], l)?;
            let (o, yi) = ((bb * l + s) * d, (bb * k + i) * d);
            let wv = w[bb * k + i];
            let mut acc = 0.0;
            for c in 0..d {
                out.push(wv * dout[o + c]);
                acc += dout[o + c] * y[yi + c];
            }
            out.push(acc);
        }
    }
    Ok(out)
}

/// Decode attention over a paged KV cache, one query per request, written as plain
/// softmax attention over the gathered tokens (no split-K).
/// `q: [b, hq, dh]`, caches `[num_blocks, block_tokens, hkv, dh]`, `block_table:
/// [b, max_blocks]`, `seq_lens: [b]` → `[b, hq, dh]`. A request with no cached token gets
/// zeros; a block id past the pool is an error.
pub fn paged_decode_attention(
    q: &[f64],
    k_cache: &[f64],
    v_cache: &[f64],
    block_table: &[u32],
    seq_lens: &[u32],
    shape: super::launch::DecodeShape,
) -> Result<Vec<f64>> {
    let s = shape;
    let (hq, hkv, dh, bt) = (s.q_heads, s.kv_heads, s.head_dim, s.block_tokens);
    let group = hq / hkv;
    let scale = 1.0 / (dh as f64).sqrt();
    let mut out = vec![0.0; s.batch * hq * dh];
    for bb in 0..s.batch {
        let len = (seq_lens[bb] as usize).min(s.max_blocks * bt);
        for head in 0..hq {
            let kvh = head / group;
            let qv = &q[(bb * hq + head) * dh..(bb * hq + head + 1) * dh];
            let mut rows = Vec::with_capacity(len);
            for tok in 0..len {
                let blk = block_table[bb * s.max_blocks + tok / bt] as usize;
                if blk >= s.num_blocks {
                    return Err(invalid(
                        "paged_decode_attention",
                        format!(
                            "block id {blk} of request {bb} is past the pool of {} blocks",
                            s.num_blocks
                        ),
                    ));
                }
                rows.push(((blk * bt + tok % bt) * hkv + kvh) * dh);
            }
            if rows.is_empty() {
                continue;
            }
            let scores: Vec<f64> = rows
                .iter()
                .map(|&r| (0..dh).map(|c| qv[c] * k_cache[r + c]).sum::<f64>() * scale)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let o = &mut out[(bb * hq + head) * dh..(bb * hq + head + 1) * dh];
            for (p, &r) in e.iter().zip(&rows) {
                for c in 0..dh {
                    o[c] += p / z * v_cache[r + c];
                }
            }
        }
    }
    Ok(out)
}

/// Whether a query at position `qp` sees a key at position `kp` (the contract of
/// [`crate::Backend::attention`]).
fn visible(qp: u32, kp: u32) -> bool {
    qp != crate::PAD_POS && kp != crate::PAD_POS && kp <= qp
}

/// The scaled scores of one query row against every key of its key/value head, `None`
/// for keys it does not see.
fn score_row(q: &[f64], k: &[f64], qp: u32, kp: &[u32], dh: usize, scale: f64) -> Vec<Option<f64>> {
    kp.iter()
        .enumerate()
        .map(|(j, &p)| {
            visible(qp, p).then(|| {
                let kr = &k[j * dh..(j + 1) * dh];
                q.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() * scale
            })
        })
        .collect()
}

/// Causal attention by positions with GQA (the maths of `mor_flash_attn_fwd`): the output
/// `[b, hq, t, dh]` and the log-sum-exp of each row's scaled scores `[b, hq, t]`
/// (`-inf`, with a zero output row, for a query that sees no key).
/// `q: [b, hq, t, dh]`, `k, v: [b, hkv, s, dh]`, `q_pos: [b, t]`, `k_pos: [b, s]`.
pub fn flash_attention_fwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    q_pos: &[u32],
    k_pos: &[u32],
    shape: super::launch::FlashShape,
) -> (Vec<f64>, Vec<f64>) {
    let super::launch::FlashShape {
        batch,
        q_heads: hq,
        kv_heads: hkv,
        t,
        s,
        head_dim: dh,
    } = shape;
    let scale = 1.0 / (dh as f64).sqrt();
    let group = hq / hkv.max(1);
    let mut out = vec![0.0; batch * hq * t * dh];
    let mut lse = vec![f64::NEG_INFINITY; batch * hq * t];
    for bb in 0..batch {
        let kp = &k_pos[bb * s..(bb + 1) * s];
        for head in 0..hq {
            let kv0 = (bb * hkv + head / group) * s * dh;
            let (kh, vh) = (&k[kv0..kv0 + s * dh], &v[kv0..kv0 + s * dh]);
            for i in 0..t {
                let row = (bb * hq + head) * t + i;
                let qr = &q[row * dh..(row + 1) * dh];
                let sc = score_row(qr, kh, q_pos[bb * t + i], kp, dh, scale);
                let m = sc
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = sc.iter().flatten().map(|x| (x - m).exp()).sum();
                lse[row] = m + z.ln();
                let o = &mut out[row * dh..(row + 1) * dh];
                for (j, x) in sc.iter().enumerate() {
                    if let Some(x) = x {
                        let p = (x - m).exp() / z;
                        for c in 0..dh {
                            o[c] += p * vh[j * dh + c];
                        }
                    }
                }
            }
        }
    }
    (out, lse)
}

/// The backward pass of [`flash_attention_fwd`] (the maths of `mor_flash_attn_bwd_dq` and
/// `_dkv`): from the output gradient `dout: [b, hq, t, dh]` and `stats: [b, hq, t, 2]`
/// (per row the log-sum-exp and `D = rowsum(dout ⊙ out)`), with `P = exp(S − lse)` and
/// `dS = P ⊙ (dout Vᵀ − D)`, returns `dq = dS K / sqrt(dh)`, `dk = dSᵀ Q / sqrt(dh)` and
/// `dv = Pᵀ dout`, the key gradients summed over each GQA group.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_bwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    q_pos: &[u32],
    k_pos: &[u32],
    dout: &[f64],
    stats: &[f64],
    shape: super::launch::FlashShape,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let super::launch::FlashShape {
        batch,
        q_heads: hq,
        kv_heads: hkv,
        t,
        s,
        head_dim: dh,
    } = shape;
    let scale = 1.0 / (dh as f64).sqrt();
    let group = hq / hkv.max(1);
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for bb in 0..batch {
        let kp = &k_pos[bb * s..(bb + 1) * s];
        for head in 0..hq {
            let kv0 = (bb * hkv + head / group) * s * dh;
            for i in 0..t {
                let row = (bb * hq + head) * t + i;
                let qr = &q[row * dh..(row + 1) * dh];
                let dr = &dout[row * dh..(row + 1) * dh];
                let (lse, d) = (stats[2 * row], stats[2 * row + 1]);
                let sc = score_row(qr, &k[kv0..kv0 + s * dh], q_pos[bb * t + i], kp, dh, scale);
                for (j, x) in sc.iter().enumerate() {
                    let Some(x) = x else { continue };
                    let (kr, vr) = (kv0 + j * dh, kv0 + j * dh);
                    let p = (x - lse).exp();
                    let dp: f64 = (0..dh).map(|c| dr[c] * v[vr + c]).sum();
                    let ds = p * (dp - d);
                    for c in 0..dh {
                        dq[row * dh + c] += ds * k[kr + c] * scale;
                        dk[kr + c] += ds * qr[c] * scale;
                        dv[vr + c] += p * dr[c];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Per-row statistics of one vocabulary chunk of the LM-head cross-entropy (the maths of
/// `mor_ce_chunk_stats`): for `logits: [n, cols]` of the columns `col0..col0 + cols`,
/// `[n, 3]` rows of (max logit, `Σ exp(logit − max)`, the target's logit when the target
/// falls in the chunk, else 0). Logits of `-inf` are skipped.
pub fn ce_chunk_stats(
    logits: &[f64],
    targets: &[u32],
    n: usize,
    cols: usize,
    col0: usize,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(3 * n);
    for (row, &t) in logits.chunks_exact(cols.max(1)).take(n).zip(targets) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s = if m == f64::NEG_INFINITY {
            0.0
        } else {
            row.iter().map(|x| (x - m).exp()).sum()
        };
        let t = t as usize;
        let tl = if t >= col0 && t - col0 < cols {
            row[t - col0]
        } else {
            0.0
        };
        out.extend([m, s, tl]);
    }
    out
}

/// The logits gradient of one vocabulary chunk (the maths of `mor_ce_chunk_grad`):
/// `(exp(logit − lse[row]) − [target == col0 + c]) · g` for `logits: [n, cols]`.
pub fn ce_chunk_grad(
    logits: &[f64],
    targets: &[u32],
    lse: &[f64],
    g: f64,
    cols: usize,
    col0: usize,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for ((row, &t), &l) in logits.chunks_exact(cols.max(1)).zip(targets).zip(lse) {
        for (c, &x) in row.iter().enumerate() {
            let onehot = if t as usize == col0 + c { 1.0 } else { 0.0 };
            out.push(((x - l).exp() - onehot) * g);
        }
    }
    out
}

/// The hyper-parameters of one AdamW step of one parameter (mor-spec §1.3), as the host
/// update of the trainer takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwHyper {
    /// Learning rate of this step.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// `lr · weight_decay` for a parameter of the decay group, else 0.
    pub decay: f64,
    /// Bias correction `1 − β₁ᵗ`.
    pub bc1: f64,
    /// Bias correction `1 − β₂ᵗ`.
    pub bc2: f64,
}

/// One AdamW step (the maths of `mor_adamw_step`, and of the trainer's host update, in the
/// same order of f64 operations): `[3 · n]`, the new weights, first and second moments.
pub fn adamw_step(w: &[f64], g: &[f64], m: &[f64], v: &[f64], h: &AdamwHyper) -> Vec<f64> {
    let n = w.len();
    let (b1, b2) = (h.beta1, h.beta2);
    let mut out = vec![0.0; 3 * n];
    for i in 0..n {
        let gi = g[i];
        let mi = b1 * m[i] + (1.0 - b1) * gi;
        let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        let upd = h.lr * (mi / h.bc1) / ((vi / h.bc2).sqrt() + h.eps);
        out[i] = w[i] * (1.0 - h.decay) - upd;
        out[n + i] = mi;
        out[2 * n + i] = vi;
    }
    out
}
