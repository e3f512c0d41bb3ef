//! The computations of the fused kernels written with plain candle ops only. They run on
//! any device and are differentiable through candle's autograd. The GPU check times the
//! kernels against them, the tests use them as an independent oracle, and the `cuda`
//! backend falls back to them for dtypes the kernels do not cover (f64).

use super::host::RouterActivation;
use super::ops::RouterParams;
use crate::{Result, PAD_POS};
use candle_core::{DType, Tensor, D};

/// Flat row indices `b * l + idx[b, i]` of a `[b, k]` index tensor into `[b * l, ..]`.
fn flat_index(idx: &Tensor, l: usize) -> Result<Tensor> {
    let (b, _) = idx.dims2()?;
    let offs = (Tensor::arange(0u32, b as u32, idx.device())? * l as f64)?.unsqueeze(1)?;
    Ok(idx.broadcast_add(&offs)?.flatten_all()?)
}

/// `z = (h · w) / temp`, `g = alpha * G(z)`, in the accumulation dtype (f32, or f64).
pub fn router_scores(h: &Tensor, w: &Tensor, params: RouterParams) -> Result<(Tensor, Tensor)> {
    let acc = super::ops::acc_dtype(h.dtype());
    let d = w.dim(0)?;
    let lead = h.dims()[..h.rank() - 1].to_vec();
    let hf = h.to_dtype(acc)?.reshape(((), d))?;
    let z = (hf.matmul(&w.to_dtype(acc)?.unsqueeze(1)?)?.squeeze(1)? / params.temp)?;
    let a = match params.activation {
        RouterActivation::Sigmoid => candle_nn::ops::sigmoid(&z)?,
        RouterActivation::Tanh => z.tanh()?,
        RouterActivation::None => z.clone(),
    };
    let g = (a * params.alpha)?;
    Ok((z.reshape(lead.clone())?, g.reshape(lead)?))
}

/// Top-k by sorting each row, then the kept positions sorted ascending (`[rows, k]` u32).
/// Ties are broken by the sort, not necessarily by position.
pub fn topk_sorted(scores: &Tensor, k: usize) -> Result<Tensor> {
    let idx = scores
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let (sorted, _) = idx.sort_last_dim(true)?;
    Ok(sorted)
}

/// `x / sqrt(mean(x²) + eps) * w`, computed in f32 (f64 for f64 input).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let acc = super::ops::acc_dtype(x.dtype());
    let xf = x.to_dtype(acc)?;
    let rstd = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok(xf
        .broadcast_mul(&rstd)?
        .broadcast_mul(&w.to_dtype(acc)?)?
        .to_dtype(x.dtype())?)
}

/// RoPE at positions, with the cos/sin rows gathered by `index_select`; rows at
/// [`PAD_POS`] are returned unchanged.
pub fn rope_at(x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _h, t, dh) = x.dims4()?;
    let half = dh / 2;
    let pad = pos.eq(PAD_POS)?;
    let safe = pad.where_cond(&pos.zeros_like()?, pos)?.flatten_all()?;
    let c = cos.index_select(&safe, 0)?.reshape((b, 1, t, half))?;
    let s = sin.index_select(&safe, 0)?.reshape((b, 1, t, half))?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    let rotated = Tensor::cat(&[o1, o2], 3)?;
    let keep = pad.reshape((b, 1, t, 1))?.broadcast_as(x.shape())?;
    Ok(keep.where_cond(x, &rotated)?)
}

/// Gather of per-head rows with `index_select`, then [`rope_at`] at the gathered positions.
pub fn gather_rope(x: &Tensor, idx: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, l, dh) = x.dims4()?;
    let t = idx.dim(1)?;
    // Rows of [b * h * l, dh]: (bb * h + hh) * l + idx[bb, i].
    let per_head = idx
        .unsqueeze(1)?
        .broadcast_as((b, h, t))?
        .contiguous()?
        .reshape((b * h, t))?;
    let rows = flat_index(&per_head, l)?;
    let g = x
        .reshape((b * h * l, dh))?
        .index_select(&rows, 0)?
        .reshape((b, h, t, dh))?;
    rope_at(&g, idx, cos, sin)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// `out[b, i] = h[b, idx[b, i]]` with `index_select` over the flattened rows.
pub fn gather_rows(h: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let (b, l, d) = h.dims3()?;
    let k = idx.dim(1)?;
    Ok(h.reshape((b * l, d))?
        .index_select(&flat_index(idx, l)?, 0)?
        .reshape((b, k, d))?)
}

/// `out = h; out[b, idx[b, i]] += w[b, i] * y[b, i]` with `index_add` over the flattened
/// rows (`w = 1` when `None`).
pub fn scatter_add_rows(
    h: &Tensor,
    idx: &Tensor,
    y: &Tensor,
    w: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, d) = h.dims3()?;
    let k = idx.dim(1)?;
    let upd = match w {
        Some(w) => y.broadcast_mul(&w.unsqueeze(2)?)?,
        None => y.clone(),
    };
    let out =
        h.reshape((b * l, d))?
            .index_add(&flat_index(idx, l)?, &upd.reshape((b * k, d))?, 0)?;
    Ok(out.reshape((b, l, d))?)
}

/// Decode attention over a paged cache: gather every block of the table, mask the tokens
/// past each request's length, repeat the KV heads for GQA, softmax attention. Every table
/// entry must be a valid block id, and every request must have at least one token.
pub fn paged_decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seq_lens: &Tensor,
) -> Result<Tensor> {
    let (b, hq, dh) = q.dims3()?;
    let (_, bt, hkv, _) = k_cache.dims4()?;
    let max_blocks = block_table.dim(1)?;
    let cap = max_blocks * bt;
    let acc = super::ops::acc_dtype(q.dtype());
    let gather = |cache: &Tensor| -> Result<Tensor> {
        let g = cache.index_select(&block_table.flatten_all()?, 0)?; // [b * max_blocks, bt, hkv, dh]
        let g = g.reshape((b, cap, hkv, dh))?.transpose(1, 2)?; // [b, hkv, cap, dh]
        let g = g
            .unsqueeze(2)?
            .broadcast_as((b, hkv, hq / hkv, cap, dh))?
            .reshape((b, hq, cap, dh))?;
        Ok(g.to_dtype(acc)?)
    };
    let (k, v) = (gather(k_cache)?, gather(v_cache)?);
    let qf = q.to_dtype(acc)?.unsqueeze(2)?; // [b, hq, 1, dh]
    let att = (qf.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?; // [b, hq, 1, cap]
    let t = Tensor::arange(0u32, cap as u32, q.device())?.reshape((1, cap))?;
    let valid = t
        .broadcast_lt(&seq_lens.reshape((b, 1))?)?
        .reshape((b, 1, 1, cap))?
        .broadcast_as(att.shape())?;
    let neg = Tensor::full(f32::NEG_INFINITY, att.shape(), q.device())?.to_dtype(acc)?;
    let att = candle_nn::ops::softmax(&valid.where_cond(&att, &neg)?, D::Minus1)?;
    Ok(att.matmul(&v)?.squeeze(2)?.to_dtype(q.dtype())?)
}

/// Causal attention with GQA by positions (the contract of [`crate::Backend::attention`]):
/// query i sees key j iff `k_pos[j] <= q_pos[i]` and `k_pos[j] != PAD_POS`; a query with
/// no visible key returns zeros. Differentiable.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &Tensor,
    k_pos: &Tensor,
) -> Result<Tensor> {
    let (b, hq, t, dh) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let group = hq / hkv;
    let expand = |x: &Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, hkv, group, s, dh))?
            .reshape((b, hq, s, dh))?)
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let att = (q.contiguous()?.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?; // [b, hq, t, s]
    let qp = q_pos.reshape((b, 1, t, 1))?;
    let kp = k_pos.reshape((b, 1, 1, s))?;
    let k_visible = kp.ne(PAD_POS)?;
    let q_visible = qp.ne(PAD_POS)?;
    let allowed = kp
        .broadcast_le(&qp)?
        .broadcast_mul(&k_visible)?
        .broadcast_mul(&q_visible)?;
    let allowed = allowed.broadcast_as((b, hq, t, s))?.contiguous()?;
    let neg = Tensor::full(f64::NEG_INFINITY, (b, hq, t, s), q.device())?.to_dtype(q.dtype())?;
    let masked = allowed.where_cond(&att, &neg)?;
    // Rows with no visible key: softmax of all -inf is NaN; zero them instead.
    let any = allowed.to_dtype(DType::F32)?.max_keepdim(D::Minus1)?; // [b, hq, t, 1]
    let any_mask = any.ne(0f32)?.broadcast_as((b, hq, t, s))?;
    let zeros = att.zeros_like()?;
    let safe = any_mask.where_cond(&masked, &zeros)?;
    let p = candle_nn::ops::softmax(&safe, D::Minus1)?;
    let p = any_mask.where_cond(&p, &zeros)?;
    Ok(p.matmul(&v.contiguous()?)?)
}
