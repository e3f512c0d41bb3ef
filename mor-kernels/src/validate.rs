//! Shape, dtype and index checks shared by every backend, so that all of them reject the same
//! bad input with the same message before any kernel runs.
//!
//! Each check returns the named dimensions of its op, so a backend reads them once instead of
//! re-deriving them from the tensors.

use crate::{Error, Result, PAD_POS};
use candle_core::{DType, Tensor};

fn invalid(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        op,
        msg: msg.into(),
    }
}

/// Checks that `t` is a floating-point tensor the backends support (f32 or f64).
///
/// # Errors
/// [`Error::Invalid`] for any other dtype.
pub fn float(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        other => Err(invalid(
            op,
            format!("`{name}` must be f32 or f64, got {other:?}"),
        )),
    }
}

/// Checks that `a` and `b` have the same dtype and live on the same device.
///
/// # Errors
/// [`Error::Invalid`] naming both tensors.
pub fn same_kind(
    op: &'static str,
    (na, a): (&str, &Tensor),
    (nb, b): (&str, &Tensor),
) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(invalid(
            op,
            format!(
                "`{na}` is {:?} but `{nb}` is {:?}; they must have the same dtype",
                a.dtype(),
                b.dtype()
            ),
        ));
    }
    if !a.device().same_device(b.device()) {
        return Err(invalid(
            op,
            format!("`{na}` and `{nb}` live on different devices"),
        ));
    }
    Ok(())
}

fn dims<const N: usize>(
    op: &'static str,
    name: &str,
    t: &Tensor,
    what: &str,
) -> Result<[usize; N]> {
    let d = t.dims();
    <[usize; N]>::try_from(d)
        .map_err(|_| invalid(op, format!("`{name}` must be {what}, got shape {:?}", d)))
}

fn u32_tensor(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::U32 {
        return Err(invalid(
            op,
            format!("`{name}` must be u32, got {:?}", t.dtype()),
        ));
    }
    Ok(())
}

/// Copies a u32 tensor of the expected shape to the host, row-major.
fn host_u32(op: &'static str, name: &str, t: &Tensor, expect: &[usize]) -> Result<Vec<u32>> {
    u32_tensor(op, name, t)?;
    if t.dims() != expect {
        return Err(invalid(
            op,
            format!("`{name}` must have shape {expect:?}, got {:?}", t.dims()),
        ));
    }
    Ok(t.flatten_all()?.to_vec1::<u32>()?)
}

/// Checked dims of [`Backend::rms_norm`](crate::Backend::rms_norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormDims {
    /// Number of rows (product of the leading dims of `x`).
    pub rows: usize,
    /// Normalised (last) dimension.
    pub d: usize,
}

/// Checks the inputs of `rms_norm`: `x: [.., d]`, `w: [d]`, same float dtype, `eps >= 0`.
///
/// # Errors
/// [`Error::Invalid`] on a rank-0 `x`, a `w` of the wrong shape, a dtype mismatch or a
/// negative or non-finite `eps`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<NormDims> {
    const OP: &str = "rms_norm";
    float(OP, "x", x)?;
    same_kind(OP, ("x", x), ("w", w))?;
    let d = *x
        .dims()
        .last()
        .ok_or_else(|| invalid(OP, "`x` must have at least one dimension"))?;
    if w.dims() != [d] {
        return Err(invalid(
            OP,
            format!(
                "`w` must have shape [{d}] (the last dim of x), got {:?}",
                w.dims()
            ),
        ));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(invalid(
            OP,
            format!("`eps` must be finite and >= 0, got {eps}"),
        ));
    }
    let rows = x.elem_count().checked_div(d).unwrap_or(0);
    Ok(NormDims { rows, d })
}

/// Checked dims and host positions of [`Backend::rope`](crate::Backend::rope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeDims {
    /// Batch.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Tokens.
    pub t: usize,
    /// Head dimension (even).
    pub dh: usize,
    /// Rows of the cos/sin tables.
    pub max_pos: usize,
    /// The positions `[b, t]`, row-major; each is `< max_pos` or [`PAD_POS`].
    pub pos: Vec<u32>,
}

/// Checks the inputs of `rope`: `x: [b, h, t, dh]` with even `dh`, `pos: [b, t]` u32,
/// `cos`/`sin: [max_pos, dh/2]` of one float dtype, every position `< max_pos` or
/// [`PAD_POS`]. The tables may have another float dtype than `x` (backends convert them).
///
/// # Errors
/// [`Error::Invalid`] describing the first problem.
pub fn rope(x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<RopeDims> {
    const OP: &str = "rope";
    float(OP, "x", x)?;
    float(OP, "cos", cos)?;
    same_kind(OP, ("cos", cos), ("sin", sin))?;
    if !x.device().same_device(cos.device()) || !x.device().same_device(pos.device()) {
        return Err(invalid(
            OP,
            "`x`, `pos` and the tables must live on one device",
        ));
    }
    let [b, h, t, dh] = dims::<4>(OP, "x", x, "[b, h, t, dh]")?;
    if dh % 2 != 0 {
        return Err(invalid(
            OP,
            format!("the head dimension must be even, got {dh}"),
        ));
    }
    let [max_pos, half] = dims::<2>(OP, "cos", cos, "[max_pos, dh/2]")?;
    if half != dh / 2 {
        return Err(invalid(
            OP,
            format!("`cos` must have {} columns (dh/2), got {half}", dh / 2),
        ));
    }
    if sin.dims() != cos.dims() {
        return Err(invalid(
            OP,
            format!(
                "`sin` {:?} and `cos` {:?} differ in shape",
                sin.dims(),
                cos.dims()
            ),
        ));
    }
    let pos = host_u32(OP, "pos", pos, &[b, t])?;
    if let Some(&p) = pos.iter().find(|&&p| p != PAD_POS && p as usize >= max_pos) {
        return Err(invalid(
            OP,
            format!("position {p} is outside the tables (max_pos {max_pos})"),
        ));
    }
    Ok(RopeDims {
        b,
        h,
        t,
        dh,
        max_pos,
        pos,
    })
}

/// Checked dims and host positions of [`Backend::attention`](crate::Backend::attention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads (`hq % hkv == 0`).
    pub hkv: usize,
    /// Queries per row.
    pub t: usize,
    /// Keys per row.
    pub s: usize,
    /// Head dimension.
    pub dh: usize,
    /// Query positions `[b, t]`, row-major.
    pub q_pos: Vec<u32>,
    /// Key positions `[b, s]`, row-major.
    pub k_pos: Vec<u32>,
}

/// Checks the inputs of `attention`: `q: [b, hq, t, dh]`, `k, v: [b, hkv, s, dh]` with
/// `hkv >= 1` and `hq % hkv == 0`, `q_pos: [b, t]`, `k_pos: [b, s]` u32.
///
/// # Errors
/// [`Error::Invalid`] describing the first problem.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &Tensor,
    k_pos: &Tensor,
) -> Result<AttnDims> {
    const OP: &str = "attention";
    float(OP, "q", q)?;
    same_kind(OP, ("q", q), ("k", k))?;
    same_kind(OP, ("q", q), ("v", v))?;
    let [b, hq, t, dh] = dims::<4>(OP, "q", q, "[b, hq, t, dh]")?;
    let [bk, hkv, s, dhk] = dims::<4>(OP, "k", k, "[b, hkv, s, dh]")?;
    if v.dims() != k.dims() {
        return Err(invalid(
            OP,
            format!(
                "`v` {:?} must have the shape of `k` {:?}",
                v.dims(),
                k.dims()
            ),
        ));
    }
    if bk != b || dhk != dh {
        return Err(invalid(
            OP,
            format!(
                "`k` {:?} does not match `q` {:?} in batch or head dimension",
                k.dims(),
                q.dims()
            ),
        ));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(invalid(
            OP,
            format!("query heads ({hq}) must be a multiple of key/value heads ({hkv})"),
        ));
    }
    if !q.device().same_device(q_pos.device()) || !q.device().same_device(k_pos.device()) {
        return Err(invalid(OP, "positions must live on the device of `q`"));
    }
    let q_pos = host_u32(OP, "q_pos", q_pos, &[b, t])?;
    let k_pos = host_u32(OP, "k_pos", k_pos, &[b, s])?;
    Ok(AttnDims {
        b,
        hq,
        hkv,
        t,
        s,
        dh,
        q_pos,
        k_pos,
    })
}

/// Checks the inputs of `swiglu`: `gate` and `up` of one shape and one float dtype.
///
/// # Errors
/// [`Error::Invalid`] on a shape or dtype mismatch.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<()> {
    const OP: &str = "swiglu";
    float(OP, "gate", gate)?;
    same_kind(OP, ("gate", gate), ("up", up))?;
    if gate.dims() != up.dims() {
        return Err(invalid(
            OP,
            format!(
                "`gate` {:?} and `up` {:?} differ in shape",
                gate.dims(),
                up.dims()
            ),
        ));
    }
    Ok(())
}

/// Checked dims of [`Backend::mlp_block`](crate::Backend::mlp_block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpDims {
    /// Rows of `h` (product of its leading dims).
    pub rows: usize,
    /// Hidden size (last dim of `h`).
    pub d: usize,
    /// Intermediate size of the SwiGLU (first dim of `gate` and `up`).
    pub ff: usize,
}

/// Checks the inputs of `mlp_block`: `h: [.., d]`, `norm_w: [d]`, `gate`, `up: [ff, d]`,
/// `down: [d, ff]`, one float dtype, `eps` finite and `>= 0`.
///
/// # Errors
/// [`Error::Invalid`] naming the first tensor whose shape or dtype is wrong.
pub fn mlp_block(
    h: &Tensor,
    norm_w: &Tensor,
    eps: f64,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
) -> Result<MlpDims> {
    const OP: &str = "mlp_block";
    float(OP, "h", h)?;
    for (name, t) in [
        ("norm_w", norm_w),
        ("gate", gate),
        ("up", up),
        ("down", down),
    ] {
        same_kind(OP, ("h", h), (name, t))?;
    }
    let Some(&d) = h.dims().last() else {
        return Err(invalid(OP, "`h` must have at least one dimension"));
    };
    if norm_w.dims() != [d] {
        return Err(invalid(
            OP,
            format!(
                "`norm_w` must have shape [{d}] (the last dim of h), got {:?}",
                norm_w.dims()
            ),
        ));
    }
    let [ff, gd] = dims::<2>(OP, "gate", gate, "[ff, d]")?;
    if gd != d {
        return Err(invalid(
            OP,
            format!("`gate` {:?} must be [ff, {d}]", gate.dims()),
        ));
    }
    if up.dims() != [ff, d] {
        return Err(invalid(
            OP,
            format!(
                "`up` {:?} must have the shape of `gate` [{ff}, {d}]",
                up.dims()
            ),
        ));
    }
    if down.dims() != [d, ff] {
        return Err(invalid(
            OP,
            format!("`down` {:?} must be [{d}, {ff}]", down.dims()),
        ));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(invalid(
            OP,
            format!("`eps` must be finite and >= 0, got {eps}"),
        ));
    }
    Ok(MlpDims {
        rows: h.elem_count().checked_div(d).unwrap_or(0),
        d,
        ff,
    })
}

/// Checked dims and host positions of
/// [`Backend::attention_block`](crate::Backend::attention_block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnBlockDims {
    /// Batch.
    pub b: usize,
    /// Tokens per row.
    pub t: usize,
    /// Hidden size.
    pub d: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Head dimension (even).
    pub dh: usize,
    /// Rows of the RoPE tables.
    pub max_pos: usize,
    /// Token positions `[b, t]`, row-major; each `< max_pos` or [`PAD_POS`].
    pub pos: Vec<u32>,
}

/// Checks the inputs of `attention_block`: `h: [b, t, d]`, `w.norm: [d]`,
/// `w.q: [heads·dh, d]`, `w.k`, `w.v: [kv_heads·dh, d]`, `w.o: [d, heads·dh]` with `dh` even
/// and `heads % kv_heads == 0`, one float dtype; `pos: [b, t]` u32, `cos`/`sin:
/// [max_pos, dh/2]`, every position `< max_pos` or [`PAD_POS`]; `eps` finite and `>= 0`.
///
/// # Errors
/// [`Error::Invalid`] naming the first tensor whose shape, dtype or values are wrong.
pub fn attention_block(
    h: &Tensor,
    w: &crate::AttentionWeights<'_>,
    pos: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<AttnBlockDims> {
    const OP: &str = "attention_block";
    float(OP, "h", h)?;
    for (name, t) in [
        ("norm", w.norm),
        ("q", w.q),
        ("k", w.k),
        ("v", w.v),
        ("o", w.o),
    ] {
        same_kind(OP, ("h", h), (name, t))?;
    }
    let [b, t, d] = dims::<3>(OP, "h", h, "[b, t, d]")?;
    let (hq, hkv) = (w.heads, w.kv_heads);
    if hq == 0 || hkv == 0 || hq % hkv != 0 {
        return Err(invalid(
            OP,
            format!("heads ({hq}) must be a positive multiple of kv_heads ({hkv})"),
        ));
    }
    if w.norm.dims() != [d] {
        return Err(invalid(
            OP,
            format!("`norm` must have shape [{d}], got {:?}", w.norm.dims()),
        ));
    }
    let [nq, qd] = dims::<2>(OP, "q", w.q, "[heads·dh, d]")?;
    if qd != d || nq % hq != 0 || (nq / hq) % 2 != 0 {
        return Err(invalid(
            OP,
            format!(
                "`q` {:?} must be [heads·dh, {d}] with an even dh ({hq} heads)",
                w.q.dims()
            ),
        ));
    }
    let dh = nq / hq;
    for (name, t) in [("k", w.k), ("v", w.v)] {
        if t.dims() != [hkv * dh, d] {
            return Err(invalid(
                OP,
                format!("`{name}` {:?} must be [{}, {d}]", t.dims(), hkv * dh),
            ));
        }
    }
    if w.o.dims() != [d, nq] {
        return Err(invalid(
            OP,
            format!("`o` {:?} must be [{d}, {nq}]", w.o.dims()),
        ));
    }
    if !(w.eps.is_finite() && w.eps >= 0.0) {
        return Err(invalid(
            OP,
            format!("`eps` must be finite and >= 0, got {}", w.eps),
        ));
    }
    float(OP, "cos", cos)?;
    same_kind(OP, ("cos", cos), ("sin", sin))?;
    let [max_pos, half] = dims::<2>(OP, "cos", cos, "[max_pos, dh/2]")?;
    if half != dh / 2 || sin.dims() != cos.dims() {
        return Err(invalid(
            OP,
            format!(
                "`cos` {:?} and `sin` {:?} must both be [max_pos, {}]",
                cos.dims(),
                sin.dims(),
                dh / 2
            ),
        ));
    }
    if !h.device().same_device(pos.device()) || !h.device().same_device(cos.device()) {
        return Err(invalid(
            OP,
            "`h`, `pos` and the tables must live on one device",
        ));
    }
    let pos = host_u32(OP, "pos", pos, &[b, t])?;
    if let Some(&p) = pos.iter().find(|&&p| p != PAD_POS && p as usize >= max_pos) {
        return Err(invalid(
            OP,
            format!("position {p} is outside the tables (max_pos {max_pos})"),
        ));
    }
    Ok(AttnBlockDims {
        b,
        t,
        d,
        hq,
        hkv,
        dh,
        max_pos,
        pos,
    })
}

/// Checked dims and host indices of the token routing ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDims {
    /// Batch.
    pub b: usize,
    /// Tokens of the full sequence.
    pub l: usize,
    /// Hidden size.
    pub d: usize,
    /// Selected tokens per row.
    pub k: usize,
    /// Indices `[b, k]`, row-major, each `< l`.
    pub idx: Vec<u32>,
}

fn token_idx(op: &'static str, h: &Tensor, idx: &Tensor) -> Result<TokenDims> {
    float(op, "h", h)?;
    let [b, l, d] = dims::<3>(op, "h", h, "[b, l, d]")?;
    if !h.device().same_device(idx.device()) {
        return Err(invalid(op, "`idx` must live on the device of `h`"));
    }
    u32_tensor(op, "idx", idx)?;
    let [bi, k] = dims::<2>(op, "idx", idx, "[b, k]")?;
    if bi != b {
        return Err(invalid(
            op,
            format!("`idx` has batch {bi} but `h` has batch {b}"),
        ));
    }
    let idx = idx.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&i) = idx.iter().find(|&&i| i as usize >= l) {
        return Err(invalid(
            op,
            format!("index {i} is out of range for {l} tokens"),
        ));
    }
    Ok(TokenDims { b, l, d, k, idx })
}

/// Checks the inputs of `gather_tokens`: `h: [b, l, d]`, `idx: [b, k]` u32 with every index
/// `< l`.
///
/// # Errors
/// [`Error::Invalid`] describing the first problem.
pub fn gather_tokens(h: &Tensor, idx: &Tensor) -> Result<TokenDims> {
    token_idx("gather_tokens", h, idx)
}

/// Checks the inputs of `scatter_add_tokens`: `h: [b, l, d]`, `idx: [b, k]` u32 with every
/// index `< l`, `y: [b, k, d]` and `w: [b, k]` of the dtype of `h`.
///
/// # Errors
/// [`Error::Invalid`] describing the first problem.
pub fn scatter_add_tokens(
    h: &Tensor,
    idx: &Tensor,
    y: &Tensor,
    w: Option<&Tensor>,
) -> Result<TokenDims> {
    const OP: &str = "scatter_add_tokens";
    let td = token_idx(OP, h, idx)?;
    same_kind(OP, ("h", h), ("y", y))?;
    if y.dims() != [td.b, td.k, td.d] {
        return Err(invalid(
            OP,
            format!(
                "`y` must have shape {:?}, got {:?}",
                [td.b, td.k, td.d],
                y.dims()
            ),
        ));
    }
    if let Some(w) = w {
        same_kind(OP, ("h", h), ("w", w))?;
        if w.dims() != [td.b, td.k] {
            return Err(invalid(
                OP,
                format!("`w` must have shape {:?}, got {:?}", [td.b, td.k], w.dims()),
            ));
        }
    }
    Ok(td)
}

/// Checked dims of [`Backend::linear`](crate::Backend::linear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows of `x` (product of its leading dims).
    pub rows: usize,
    /// Input features (last dim of `x`, second dim of `w`).
    pub inp: usize,
    /// Output features (first dim of `w`).
    pub out: usize,
}

/// Checks the inputs of `linear`: `x: [.., in]` (rank ≥ 1), `w: [out, in]`, one float dtype.
///
/// # Errors
/// [`Error::Invalid`] on a rank-0 `x`, a `w` that is not `[out, in]`, or a dtype mismatch.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<LinearDims> {
    linear_dims("linear", x, w, "[out, in]")
}

/// The shape checks of [`linear`] under the name `op` (`w_shape` names `w`'s expected dims
/// in the error).
fn linear_dims(op: &'static str, x: &Tensor, w: &Tensor, w_shape: &str) -> Result<LinearDims> {
    float(op, "x", x)?;
    same_kind(op, ("x", x), ("w", w))?;
    let Some((&inp, lead)) = x.dims().split_last() else {
        return Err(invalid(op, "`x` must have at least one dimension"));
    };
    let [out, w_in] = dims::<2>(op, "w", w, w_shape)?;
    if w_in != inp {
        return Err(invalid(
            op,
            format!(
                "`w` {:?} does not match the last dim of `x` {:?}",
                w.dims(),
                x.dims()
            ),
        ));
    }
    Ok(LinearDims {
        rows: lead.iter().product(),
        inp,
        out,
    })
}

/// Checks the inputs of `linear_cross_entropy`: `x: [.., d]`, `w: [V, d]` as for
/// [`linear`], and `targets` u32 with one element per row of `x`, each `< V`.
///
/// # Errors
/// [`Error::Invalid`] naming the first problem (the op is called `linear_cross_entropy`).
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<LinearDims> {
    const OP: &str = "linear_cross_entropy";
    let LinearDims { rows, inp, out } = linear_dims(OP, x, w, "[vocab, d]")?;
    u32_tensor(OP, "targets", targets)?;
    if targets.elem_count() != rows {
        return Err(invalid(
            OP,
            format!(
                "{} targets for {rows} rows of `x` {:?}",
                targets.elem_count(),
                x.dims()
            ),
        ));
    }
    let host = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(bad) = host.iter().find(|&&t| t as usize >= out) {
        return Err(invalid(
            OP,
            format!("target {bad} is outside the vocabulary of {out}"),
        ));
    }
    Ok(LinearDims { rows, inp, out })
}

/// Checked dims of [`Backend::split_heads`](crate::Backend::split_heads) and
/// [`Backend::merge_heads`](crate::Backend::merge_heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadDims {
    /// Batch.
    pub b: usize,
    /// Tokens.
    pub t: usize,
    /// Heads.
    pub h: usize,
    /// Head dimension.
    pub dh: usize,
}

/// Checks the input of `split_heads`: a float `x: [b, t, heads * dh]` with `heads ≥ 1`.
///
/// # Errors
/// [`Error::Invalid`] on another rank, `heads = 0`, or a last dim not divisible by `heads`.
pub fn split_heads(op: &'static str, x: &Tensor, heads: usize) -> Result<HeadDims> {
    float(op, "x", x)?;
    let [b, t, hd] = dims::<3>(op, "x", x, "[b, t, heads * head_dim]")?;
    if heads == 0 || hd % heads != 0 {
        return Err(invalid(
            op,
            format!("the last dim of `x` ({hd}) must be a positive multiple of heads ({heads})"),
        ));
    }
    Ok(HeadDims {
        b,
        t,
        h: heads,
        dh: hd / heads,
    })
}

/// Checks the input of `merge_heads`: a float `x: [b, h, t, dh]`.
///
/// # Errors
/// [`Error::Invalid`] on another rank or dtype.
pub fn merge_heads(x: &Tensor) -> Result<HeadDims> {
    const OP: &str = "merge_heads";
    float(OP, "x", x)?;
    let [b, h, t, dh] = dims::<4>(OP, "x", x, "[b, heads, t, head_dim]")?;
    Ok(HeadDims { b, t, h, dh })
}
