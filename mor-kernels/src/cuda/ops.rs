//! The fused kernels as candle custom ops, and the public functions that validate their
//! input and apply them.
//!
//! Each op runs its kernel on CUDA tensors (`cuda_fwd`) and the same maths from
//! [`super::host`] on CPU tensors (`cpu_fwd`), so every op, and its backward, is tested on
//! CPU against finite differences and against plain candle ops. A backward is a
//! composition of other ops of this file (themselves kernels on CUDA) and plain candle ops,
//! so gradients never leave the device. Second-order gradients are not supported.

use super::host::{self, RopeDims, RouterActivation};
use super::imp;
use super::launch::{self, DecodeShape};
use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor,
    WithDType,
};

type CResult<T> = candle_core::Result<T>;

fn invalid(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        op,
        msg: msg.into(),
    }
}

fn cerr(e: Error) -> candle_core::Error {
    candle_core::Error::msg(e)
}

/// The f64 values of a contiguous CPU storage.
fn host_f64(s: &CpuStorage, l: &Layout, op: &str) -> CResult<Vec<f64>> {
    fn conv<T: WithDType>(v: &[T], o1: usize, o2: usize) -> Vec<f64> {
        v[o1..o2].iter().map(|x| x.to_f64()).collect()
    }
    let Some((o1, o2)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => conv(v, o1, o2),
        CpuStorage::F64(v) => conv(v, o1, o2),
        CpuStorage::BF16(v) => conv(v, o1, o2),
        CpuStorage::F16(v) => conv(v, o1, o2),
        other => candle_core::bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// A CPU storage of the dtype of `witness`, rounded once from f64.
fn host_like(witness: &CpuStorage, v: Vec<f64>) -> CResult<CpuStorage> {
    fn conv<T: WithDType>(_: &[T], v: Vec<f64>) -> CpuStorage {
        T::to_cpu_storage_owned(v.into_iter().map(T::from_f64).collect())
    }
    Ok(match witness {
        CpuStorage::F32(w) => conv(w, v),
        CpuStorage::F64(w) => conv(w, v),
        CpuStorage::BF16(w) => conv(w, v),
        CpuStorage::F16(w) => conv(w, v),
        other => candle_core::bail!("unsupported dtype {:?}", other.dtype()),
    })
}

/// The accumulation dtype of outputs kept in full precision: f64 for f64 inputs, else f32.
pub(crate) fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn host_acc(dtype: DType, v: Vec<f64>) -> CpuStorage {
    if dtype == DType::F64 {
        CpuStorage::F64(v)
    } else {
        CpuStorage::F32(v.into_iter().map(|x| x as f32).collect())
    }
}

fn host_u32(t: &Tensor) -> CResult<Vec<u32>> {
    t.flatten_all()?.to_vec1::<u32>()
}

fn check_float(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::BF16 | DType::F64 | DType::F16 => Ok(()),
        d => Err(invalid(
            op,
            format!("{what} must be a float tensor, got {d:?}"),
        )),
    }
}

fn check_same(op: &'static str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    if a.1.dtype() != b.1.dtype() {
        return Err(invalid(
            op,
            format!(
                "{} is {:?} but {} is {:?}",
                a.0,
                a.1.dtype(),
                b.0,
                b.1.dtype()
            ),
        ));
    }
    if !a.1.device().same_device(b.1.device()) {
        return Err(invalid(
            op,
            format!("{} and {} are on different devices", a.0, b.0),
        ));
    }
    Ok(())
}

fn check_index_tensor(
    op: &'static str,
    what: &str,
    idx: &Tensor,
    like: &Tensor,
    dims: &[usize],
) -> Result<()> {
    if idx.dtype() != DType::U32 {
        return Err(invalid(
            op,
            format!("{what} must be u32, got {:?}", idx.dtype()),
        ));
    }
    if idx.dims() != dims {
        return Err(invalid(
            op,
            format!("{what} has shape {:?}, expected {dims:?}", idx.dims()),
        ));
    }
    if !idx.device().same_device(like.device()) {
        return Err(invalid(
            op,
            format!("{what} is on another device than the data"),
        ));
    }
    Ok(())
}

fn rank<const N: usize>(op: &'static str, what: &str, t: &Tensor) -> Result<[usize; N]> {
    t.dims().try_into().map_err(|_| {
        invalid(
            op,
            format!("{what} must have rank {N}, got shape {:?}", t.dims()),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Router score and gate.

/// Parameters of the router score (mor-spec §3.1: `z = θᵀ(h / temp)`, `g = alpha * G(z)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterParams {
    /// Gate scale `alpha` (0.1 in the final expert-choice recipe).
    pub alpha: f64,
    /// Temperature (1.0 in the paper).
    pub temp: f64,
    /// The activation `G`.
    pub activation: RouterActivation,
}

impl Default for RouterParams {
    fn default() -> Self {
        RouterParams {
            alpha: 0.1,
            temp: 1.0,
            activation: RouterActivation::Sigmoid,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RouterScoreOp {
    pub(crate) alpha: f64,
    pub(crate) inv_temp: f64,
    pub(crate) act: RouterActivation,
}

impl CustomOp2 for RouterScoreOp {
    fn name(&self) -> &'static str {
        "mor-router-score"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let h = host_f64(s1, l1, self.name())?;
        let w = host_f64(s2, l2, self.name())?;
        let out = host::router_score(&h, &w, n, d, self.alpha, self.inv_temp, self.act);
        Ok((host_acc(s1.dtype(), out), Shape::from((n, 2))))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::router_score(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // d loss / d z, through both outputs: z itself and g = alpha * G(z).
        let z = res.narrow(1, 0, 1)?.squeeze(1)?;
        let act_grad = match self.act {
            RouterActivation::Sigmoid => {
                let s = (z.neg()?.exp()? + 1.0)?.recip()?;
                (&s - s.sqr()?)?
            }
            RouterActivation::Tanh => (1.0 - z.tanh()?.sqr()?)?,
            RouterActivation::None => z.ones_like()?,
        };
        let gz = grad.narrow(1, 0, 1)?.squeeze(1)?;
        let gg = grad.narrow(1, 1, 1)?.squeeze(1)?;
        let dz = ((gz + (gg * act_grad)?.affine(self.alpha, 0.0)?)? * self.inv_temp)?;
        let acc = dz.dtype();
        let dh = dz
            .unsqueeze(1)?
            .broadcast_mul(&w.to_dtype(acc)?.unsqueeze(0)?)?
            .to_dtype(h.dtype())?;
        let dw = dz
            .unsqueeze(0)?
            .matmul(&h.to_dtype(acc)?)?
            .squeeze(0)?
            .to_dtype(w.dtype())?;
        Ok((Some(dh), Some(dw)))
    }
}

/// Router score and gate of a recursion step, fused: `z = (h · w) / temp` and
/// `g = alpha * G(z)`, with the dot product and activation in f32 (f64 for f64 input).
/// Differentiable with respect to `h` and `w` through both outputs.
///
/// # Shapes
/// `h: [.., d]`, `w: [d]` → `(z, g)`, each `[..]`, dtype f32 (f64 for f64 input).
///
/// # Errors
/// Mismatched shapes, dtypes or devices; a non-positive temperature.
pub fn router_scores(h: &Tensor, w: &Tensor, params: RouterParams) -> Result<(Tensor, Tensor)> {
    const OP: &str = "router_scores";
    check_float(OP, "h", h)?;
    check_same(OP, ("h", h), ("w", w))?;
    let d = h
        .dims()
        .last()
        .copied()
        .ok_or_else(|| invalid(OP, "h must have at least one dimension"))?;
    if w.dims() != [d] {
        return Err(invalid(
            OP,
            format!("w has shape {:?}, expected [{d}]", w.dims()),
        ));
    }
    if !(params.temp > 0.0 && params.temp.is_finite()) {
        return Err(invalid(
            OP,
            format!("temp = {} must be positive and finite", params.temp),
        ));
    }
    let lead = h.dims()[..h.rank() - 1].to_vec();
    let n = h.elem_count() / d.max(1);
    let acc = acc_dtype(h.dtype());
    if n == 0 || d == 0 {
        let z = Tensor::zeros(lead.clone(), acc, h.device())?;
        let g = (z.ones_like()? * (params.alpha * params.activation.apply(0.0)))?;
        return Ok((z, g));
    }
    let op = RouterScoreOp {
        alpha: params.alpha,
        inv_temp: 1.0 / params.temp,
        act: params.activation,
    };
    let out = h
        .reshape((n, d))?
        .contiguous()?
        .apply_op2(&w.contiguous()?, op)?;
    let z = out.narrow(1, 0, 1)?.reshape(lead.clone())?;
    let g = out.narrow(1, 1, 1)?.reshape(lead)?;
    Ok((z, g))
}

// ---------------------------------------------------------------------------------------
// Per-sequence top-k.

#[derive(Debug, Clone)]
pub(crate) struct TopkOp {
    pub(crate) k: usize,
    pub(crate) map: Option<Tensor>,
}

impl CustomOp1 for TopkOp {
    fn name(&self) -> &'static str {
        "mor-topk-sorted"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (rows, n) = l.shape().dims2()?;
        let scores = host_f64(s, l, self.name())?;
        let keep = host::topk_sorted_radix(&scores, rows, n, self.k, s.dtype() == DType::F64)
            .map_err(cerr)?;
        let sel = match &self.map {
            Some(map) => {
                let map = host_u32(map)?;
                keep.iter()
                    .enumerate()
                    .map(|(j, &i)| map[(j / self.k) * n + i as usize])
                    .collect()
            }
            None => keep.clone(),
        };
        let mut out = keep;
        out.extend(sel);
        Ok((CpuStorage::U32(out), Shape::from((2, rows, self.k))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        imp::topk_sorted(self, s, l)
    }
}

/// The result of [`topk_sorted`].
#[derive(Debug, Clone)]
pub struct TopK {
    /// Positions of the kept candidates within each row, ascending: `[rows, k]` u32.
    pub keep: Tensor,
    /// `map[keep]` when a map was given (the absolute token positions), else `keep`:
    /// `[rows, k]` u32, ascending when the map is.
    pub sel: Tensor,
}

/// Per-sequence top-k on the device, with no host round trip, for rows of any length: the
/// `k` largest scores of each row, ties going to the earlier position, NaN ranked last; the
/// positions come out sorted ascending (causal order, mor-spec §3.1). `map` gives the
/// absolute positions of the candidates (hierarchical filtering: the candidates of step r
/// are the tokens selected at step r−1), and `sel = map[keep]`.
///
/// # Shapes
/// `scores: [rows, n]` (f32 or bf16 on CUDA; f32, bf16 or f64 on CPU), `map: [rows, n]`
/// u32 → [`TopK`] of `[rows, k]` u32 tensors.
///
/// # Errors
/// `k` outside `1..=n`, a bad shape or dtype.
pub fn topk_sorted(scores: &Tensor, k: usize, map: Option<&Tensor>) -> Result<TopK> {
    const OP: &str = "topk_sorted";
    check_float(OP, "scores", scores)?;
    let [rows, n] = rank::<2>(OP, "scores", scores)?;
    launch::TopkPlan::new(rows as u64, n as u64, k as u64)?;
    let map = match map {
        Some(m) => {
            check_index_tensor(OP, "map", m, scores, &[rows, n])?;
            Some(m.contiguous()?)
        }
        None => None,
    };
    let out = scores.contiguous()?.apply_op1_no_bwd(&TopkOp { k, map })?;
    Ok(TopK {
        keep: out.get(0)?,
        sel: out.get(1)?,
    })
}

// ---------------------------------------------------------------------------------------
// RMSNorm.

#[derive(Debug, Clone)]
pub(crate) struct RmsNormOp {
    pub(crate) eps: f64,
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
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let y = host::rms_norm_fwd(
            &host_f64(s1, l1, self.name())?,
            &host_f64(s2, l2, self.name())?,
            n,
            d,
            self.eps,
        );
        Ok((host_like(s1, y)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::rms_norm_fwd(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = x.dims2()?;
        let parts = if x.device().is_cuda() {
            launch::rms_norm_bwd(n as u64, d as u64)
                .map_err(cerr)?
                .grid
                .0 as usize
        } else {
            1
        };
        let op = RmsNormBwdOp {
            eps: self.eps,
            parts,
        };
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let dx = flat
            .narrow(0, 0, n * d)?
            .reshape((n, d))?
            .to_dtype(x.dtype())?;
        let dw = flat
            .narrow(0, n * d, parts * d)?
            .reshape((parts, d))?
            .sum(0)?
            .to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Backward of RMSNorm: a flat accumulation-dtype buffer holding `dx [n, d]` and then
/// `parts` partial rows of `dw`.
#[derive(Debug, Clone)]
pub(crate) struct RmsNormBwdOp {
    pub(crate) eps: f64,
    pub(crate) parts: usize,
}

impl CustomOp3 for RmsNormBwdOp {
    fn name(&self) -> &'static str {
        "mor-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (mut dx, dw) = host::rms_norm_bwd(
            &host_f64(s1, l1, self.name())?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
            n,
            d,
            self.eps,
        );
        // The CPU writes its whole sum as the first partial row.
        dx.extend(dw);
        dx.resize(n * d + self.parts * d, 0.0);
        Ok((
            host_acc(s1.dtype(), dx),
            Shape::from(n * d + self.parts * d),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::rms_norm_bwd(self, s1, l1, s2, l2, s3, l3)
    }
}

/// RMSNorm, fused: `x / sqrt(mean(x²) + eps) * w` (mor-spec §1.1), with an analytic
/// backward (one fused kernel for `dx` and the partial sums of `dw`).
///
/// # Shapes
/// `x: [.., d]`, `w: [d]` → `[.., d]`.
///
/// # Errors
/// Mismatched shapes, dtypes or devices; `eps` negative or not finite.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    check_float(OP, "x", x)?;
    check_same(OP, ("x", x), ("w", w))?;
    let d = x
        .dims()
        .last()
        .copied()
        .ok_or_else(|| invalid(OP, "x must have at least one dimension"))?;
    if w.dims() != [d] {
        return Err(invalid(
            OP,
            format!("w has shape {:?}, expected [{d}]", w.dims()),
        ));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(invalid(
            OP,
            format!("eps = {eps} must be non-negative and finite"),
        ));
    }
    if x.elem_count() == 0 {
        return Ok(x.zeros_like()?);
    }
    let y = x
        .reshape((x.elem_count() / d, d))?
        .contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps })?;
    Ok(y.reshape(x.shape())?)
}

// ---------------------------------------------------------------------------------------
// RoPE at explicit positions, and fused gather + RoPE.

#[derive(Debug, Clone)]
pub(crate) struct RopeOp {
    pub(crate) pos: Tensor,
    pub(crate) sign: f64,
}

fn rope_dims(x: &Layout, cos: &Layout, t_out: usize) -> CResult<RopeDims> {
    let (b, h, _, dh) = x.shape().dims4()?;
    let (max_pos, _) = cos.shape().dims2()?;
    Ok(RopeDims {
        b,
        h,
        t: t_out,
        dh,
        max_pos,
    })
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "mor-rope-at"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let dims = rope_dims(l1, l2, l1.shape().dims()[2])?;
        let out = host::rope_at(
            &host_f64(s1, l1, self.name())?,
            &host_u32(&self.pos)?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
            dims,
            self.sign,
        )
        .map_err(cerr)?;
        Ok((host_like(s1, out)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::rope_at(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The inverse rotation is the transpose; the tables are constants.
        let inv = RopeOp {
            pos: self.pos.clone(),
            sign: -self.sign,
        };
        Ok((
            Some(grad.contiguous()?.apply_op3(cos, sin, inv)?),
            None,
            None,
        ))
    }
}

/// Checks the tables and converts them to the dtype of `x` (a no-op when they match).
fn rope_tables_for(
    op: &'static str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    dh: usize,
) -> Result<(Tensor, Tensor)> {
    if !dh.is_multiple_of(2) || dh == 0 {
        return Err(invalid(
            op,
            format!("the head dimension {dh} must be even and positive"),
        ));
    }
    check_float(op, "cos", cos)?;
    check_float(op, "sin", sin)?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    check_same(op, ("x", x), ("cos", &cos))?;
    check_same(op, ("x", x), ("sin", &sin))?;
    let [max_pos, half] = rank::<2>(op, "cos", &cos)?;
    if half != dh / 2 || sin.dims() != cos.dims() {
        return Err(invalid(
            op,
            format!(
                "cos {:?} and sin {:?} must both be [max_pos, {}]",
                cos.dims(),
                sin.dims(),
                dh / 2
            ),
        ));
    }
    launch::to_u32(op, "max_pos", max_pos)?;
    Ok((cos.contiguous()?, sin.contiguous()?))
}

/// RoPE at explicit positions, fused: the cos/sin rows are gathered by each token's
/// absolute position inside the kernel (HF rotate_half form, mor-spec §1.1). Rows at
/// [`crate::PAD_POS`] are returned unchanged. Differentiable with respect to `x` (the
/// backward is the inverse rotation).
///
/// # Shapes
/// `x: [b, h, t, dh]`, `pos: [b, t]` u32, `cos`/`sin: [max_pos, dh/2]` (converted to the
/// dtype of `x`) → `[b, h, t, dh]`.
///
/// # Errors
/// Bad shapes or dtypes. On CPU, a position past the table other than `PAD_POS`; the
/// kernel leaves such rows unchanged.
pub fn rope_at(x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope";
    check_float(OP, "x", x)?;
    let [b, _h, t, dh] = rank::<4>(OP, "x", x)?;
    let (cos, sin) = rope_tables_for(OP, x, cos, sin, dh)?;
    check_index_tensor(OP, "pos", pos, x, &[b, t])?;
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let op = RopeOp {
        pos: pos.contiguous()?,
        sign: 1.0,
    };
    Ok(x.contiguous()?.apply_op3(&cos, &sin, op)?)
}

#[derive(Debug, Clone)]
pub(crate) struct GatherRopeOp {
    pub(crate) idx: Tensor,
}

impl CustomOp3 for GatherRopeOp {
    fn name(&self) -> &'static str {
        "mor-gather-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let t = self.idx.dims()[1];
        let dims = rope_dims(l1, l2, t)?;
        let l = l1.shape().dims()[2];
        let out = host::gather_rope_fwd(
            &host_f64(s1, l1, self.name())?,
            &host_u32(&self.idx)?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
            l,
            dims,
        )
        .map_err(cerr)?;
        Ok((
            host_like(s1, out)?,
            Shape::from((dims.b, dims.h, t, dims.dh)),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::gather_rope_fwd(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GatherRopeBwdOp {
            idx: self.idx.clone(),
            l: x.dims()[2],
        };
        Ok((
            Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &op)?),
            None,
            None,
        ))
    }
}

/// Backward of the fused gather + RoPE: scatters the inverse rotation of each row back to
/// its source position in a zeroed `[b, h, l, dh]`.
#[derive(Debug, Clone)]
pub(crate) struct GatherRopeBwdOp {
    pub(crate) idx: Tensor,
    pub(crate) l: usize,
}

impl CustomOp3 for GatherRopeBwdOp {
    fn name(&self) -> &'static str {
        "mor-gather-rope-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let dims = rope_dims(l1, l2, l1.shape().dims()[2])?;
        let dx = host::gather_rope_bwd(
            &host_f64(s1, l1, self.name())?,
            &host_u32(&self.idx)?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
            self.l,
            dims,
        )
        .map_err(cerr)?;
        Ok((
            host_like(s1, dx)?,
            Shape::from((dims.b, dims.h, self.l, dims.dh)),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::gather_rope_bwd(self, s1, l1, s2, l2, s3, l3)
    }
}

/// Fused gather + RoPE: `out[b, :, i] = rope(x[b, :, idx[b, i]], position idx[b, i])`,
/// i.e. the selected tokens of a full-length per-head tensor, rotated at their original
/// positions (mor-spec §3.1), without materialising the gathered rows or tables. An index
/// of [`crate::PAD_POS`] gives a zero row. Differentiable with respect to `x`.
///
/// # Shapes
/// `x: [b, h, l, dh]`, `idx: [b, t]` u32, `cos`/`sin: [max_pos, dh/2]` → `[b, h, t, dh]`.
///
/// # Errors
/// Bad shapes or dtypes. On CPU, an index `>= l` other than `PAD_POS`; the kernel writes a
/// zero row for it.
pub fn gather_rope(x: &Tensor, idx: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_rope";
    check_float(OP, "x", x)?;
    let [b, h, l, dh] = rank::<4>(OP, "x", x)?;
    let (cos, sin) = rope_tables_for(OP, x, cos, sin, dh)?;
    let [_, t] = rank::<2>(OP, "idx", idx)?;
    check_index_tensor(OP, "idx", idx, x, &[b, t])?;
    launch::to_u32(OP, "l", l)?;
    if b * h * t * dh == 0 {
        return Ok(Tensor::zeros((b, h, t, dh), x.dtype(), x.device())?);
    }
    let op = GatherRopeOp {
        idx: idx.contiguous()?,
    };
    Ok(x.contiguous()?.apply_op3(&cos, &sin, op)?)
}

// ---------------------------------------------------------------------------------------
// SwiGLU.

#[derive(Debug, Clone)]
pub(crate) struct SwigluOp;

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "mor-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = host::swiglu_fwd(
            &host_f64(s1, l1, self.name())?,
            &host_f64(s2, l2, self.name())?,
        );
        Ok((host_like(s1, y)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::swiglu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBwdOp)?;
        let dg = both.get(0)?.reshape(gate.shape())?;
        let du = both.get(1)?.reshape(up.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// Backward of SwiGLU: `[2, n]`, the gate gradient then the up gradient.
#[derive(Debug, Clone)]
pub(crate) struct SwigluBwdOp;

impl CustomOp3 for SwigluBwdOp {
    fn name(&self) -> &'static str {
        "mor-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let out = host::swiglu_bwd(
            &host_f64(s1, l1, self.name())?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
        );
        Ok((
            host_like(s1, out)?,
            Shape::from((2, l1.shape().elem_count())),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::swiglu_bwd(s1, l1, s2, l2, s3, l3)
    }
}

/// SwiGLU gate, fused: `silu(gate) * up` (mor-spec §1.1), with a fused analytic backward.
///
/// # Shapes
/// `gate, up: [.., di]` → `[.., di]`.
///
/// # Errors
/// Mismatched shapes, dtypes or devices.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu";
    check_float(OP, "gate", gate)?;
    check_same(OP, ("gate", gate), ("up", up))?;
    if gate.dims() != up.dims() {
        return Err(invalid(
            OP,
            format!(
                "gate {:?} and up {:?} differ in shape",
                gate.dims(),
                up.dims()
            ),
        ));
    }
    if gate.elem_count() == 0 {
        return Ok(gate.zeros_like()?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluOp)?)
}

// ---------------------------------------------------------------------------------------
// Gather and weighted scatter-add of token rows.

#[derive(Debug, Clone)]
pub(crate) struct GatherRowsOp {
    pub(crate) idx: Tensor,
}

impl CustomOp1 for GatherRowsOp {
    fn name(&self) -> &'static str {
        "mor-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (b, len, d) = l.shape().dims3()?;
        let k = self.idx.dims()[1];
        let out = host::gather_rows(
            &host_f64(s, l, self.name())?,
            &host_u32(&self.idx)?,
            b,
            len,
            k,
            d,
        )
        .map_err(cerr)?;
        Ok((host_like(s, out)?, Shape::from((b, k, d))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        imp::gather_rows(self, s, l)
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // Indices may repeat in a plain gather, so the backward accumulates (atomics).
        let op = IndexAddOp {
            idx: self.idx.clone(),
            w: None,
            atomic: true,
        };
        Ok(Some(
            h.zeros_like()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

/// `out = base; out[b, idx[b, i]] += w[b, i] * y[b, i]`, with atomics when `atomic`.
#[derive(Debug, Clone)]
pub(crate) struct IndexAddOp {
    pub(crate) idx: Tensor,
    pub(crate) w: Option<Tensor>,
    pub(crate) atomic: bool,
}

impl CustomOp2 for IndexAddOp {
    fn name(&self) -> &'static str {
        "mor-index-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, len, d) = l1.shape().dims3()?;
        let k = self.idx.dims()[1];
        let mut out = host_f64(s1, l1, self.name())?;
        let w = match &self.w {
            Some(w) => Some(w.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            None => None,
        };
        let y = host_f64(s2, l2, self.name())?;
        host::index_add_rows(
            &mut out,
            &host_u32(&self.idx)?,
            &y,
            w.as_deref(),
            (b, len, k, d),
            !self.atomic,
        )
        .map_err(cerr)?;
        Ok((host_like(s1, out)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::index_add_rows(self, s1, l1, s2, l2)
    }
}

/// Gathers token rows, fused: `out[b, i] = h[b, idx[b, i]]`. Differentiable with respect to
/// `h` (the backward accumulates, so repeated indices are fine).
///
/// # Shapes
/// `h: [b, l, d]`, `idx: [b, k]` u32 → `[b, k, d]`.
///
/// # Errors
/// Bad shapes or dtypes. On CPU, an index `>= l`; the kernel writes a zero row for it.
pub fn gather_rows(h: &Tensor, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_tokens";
    check_float(OP, "h", h)?;
    let [b, l, d] = rank::<3>(OP, "h", h)?;
    let [_, k] = rank::<2>(OP, "idx", idx)?;
    check_index_tensor(OP, "idx", idx, h, &[b, k])?;
    for (what, v) in [("b", b), ("l", l), ("k", k), ("d", d)] {
        launch::to_u32(OP, what, v)?;
    }
    if b * k * d == 0 {
        return Ok(Tensor::zeros((b, k, d), h.dtype(), h.device())?);
    }
    Ok(h.contiguous()?.apply_op1(GatherRowsOp {
        idx: idx.contiguous()?,
    })?)
}

#[derive(Debug, Clone)]
pub(crate) struct ScatterAddOp {
    pub(crate) idx: Tensor,
}

impl CustomOp3 for ScatterAddOp {
    fn name(&self) -> &'static str {
        "mor-scatter-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, len, d) = l1.shape().dims3()?;
        let k = self.idx.dims()[1];
        let mut out = host_f64(s1, l1, self.name())?;
        let y = host_f64(s2, l2, self.name())?;
        let w = host_f64(s3, l3, self.name())?;
        host::index_add_rows(
            &mut out,
            &host_u32(&self.idx)?,
            &y,
            Some(&w),
            (b, len, k, d),
            true,
        )
        .map_err(cerr)?;
        Ok((host_like(s1, out)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::scatter_add_fwd(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _h: &Tensor,
        y: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, k, d) = y.dims3()?;
        let op = ScatterAddBwdOp {
            idx: self.idx.clone(),
        };
        let packed = grad.contiguous()?.apply_op3_no_bwd(y, w, &op)?;
        let dy = packed.narrow(1, 0, d)?.reshape((b, k, d))?;
        let dw = packed.narrow(1, d, 1)?.reshape((b, k))?;
        Ok((Some(grad.clone()), Some(dy), Some(dw)))
    }
}

/// Backward of the weighted scatter-add: `[b * k, d + 1]` rows of `(dy, dw)`.
#[derive(Debug, Clone)]
pub(crate) struct ScatterAddBwdOp {
    pub(crate) idx: Tensor,
}

impl CustomOp3 for ScatterAddBwdOp {
    fn name(&self) -> &'static str {
        "mor-scatter-add-rows-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, len, d) = l1.shape().dims3()?;
        let k = self.idx.dims()[1];
        let out = host::scatter_add_bwd(
            &host_f64(s1, l1, self.name())?,
            &host_u32(&self.idx)?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
            (b, len, k, d),
        )
        .map_err(cerr)?;
        Ok((host_like(s1, out)?, Shape::from((b * k, d + 1))))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::scatter_add_bwd(self, s1, l1, s2, l2, s3, l3)
    }
}

/// The weighted scatter-add of a recursion step, fused: `out = h; out[b, idx[b, i]] +=
/// w[b, i] * y[b, i]` (mor-spec §3.1, Eq. 2.1: `H ← H + g · f(H)` on the selected tokens;
/// `w = 1` when `None`). The indices of a row must be distinct (the top-k output is).
/// Differentiable with respect to `h`, `y` and `w`.
///
/// # Shapes
/// `h: [b, l, d]`, `idx: [b, k]` u32, `y: [b, k, d]`, `w: [b, k]` → `[b, l, d]`.
///
/// # Errors
/// Bad shapes or dtypes. On CPU, an index `>= l` or repeated within a row; the kernel
/// ignores an out-of-range index and requires distinct ones.
pub fn scatter_add_rows(
    h: &Tensor,
    idx: &Tensor,
    y: &Tensor,
    w: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "scatter_add_tokens";
    check_float(OP, "h", h)?;
    check_same(OP, ("h", h), ("y", y))?;
    let [b, l, d] = rank::<3>(OP, "h", h)?;
    let [_, k] = rank::<2>(OP, "idx", idx)?;
    check_index_tensor(OP, "idx", idx, h, &[b, k])?;
    if y.dims() != [b, k, d] {
        return Err(invalid(
            OP,
            format!("y has shape {:?}, expected [{b}, {k}, {d}]", y.dims()),
        ));
    }
    for (what, v) in [("b", b), ("l", l), ("k", k), ("d", d)] {
        launch::to_u32(OP, what, v)?;
    }
    let w = match w {
        Some(w) => {
            check_same(OP, ("h", h), ("w", w))?;
            if w.dims() != [b, k] {
                return Err(invalid(
                    OP,
                    format!("w has shape {:?}, expected [{b}, {k}]", w.dims()),
                ));
            }
            w.contiguous()?
        }
        None => Tensor::ones((b, k), h.dtype(), h.device())?,
    };
    if b * k * d == 0 {
        return Ok(h.clone());
    }
    let op = ScatterAddOp {
        idx: idx.contiguous()?,
    };
    Ok(h.contiguous()?.apply_op3(&y.contiguous()?, &w, op)?)
}

// ---------------------------------------------------------------------------------------
// Paged decode attention.

#[derive(Debug, Clone)]
pub(crate) struct PagedDecodeOp {
    pub(crate) block_table: Tensor,
    pub(crate) seq_lens: Tensor,
    pub(crate) plan: launch::DecodePlan,
}

impl CustomOp3 for PagedDecodeOp {
    fn name(&self) -> &'static str {
        "mor-paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let out = host::paged_decode_attention(
            &host_f64(s1, l1, self.name())?,
            &host_f64(s2, l2, self.name())?,
            &host_f64(s3, l3, self.name())?,
            &host_u32(&self.block_table)?,
            &host_u32(&self.seq_lens)?,
            self.plan.shape,
        )
        .map_err(cerr)?;
        Ok((host_like(s1, out)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        imp::paged_decode(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        candle_core::bail!("paged decode attention is inference-only: it has no backward")
    }
}

/// Decode attention, fused: one query token per request attends over that request's
/// variable-length paged KV cache, with GQA (query head `h` reads KV head
/// `h / (hq / hkv)`) and scale `1/sqrt(dh)`. The request's tokens are
/// `block_table[b, 0..]` blocks of `block_tokens` tokens, of which the first
/// `seq_lens[b]` count. On CUDA it runs split-K: parts of `part_tokens` tokens (default
/// [`launch::DECODE_DEFAULT_PART_TOKENS`]) are reduced with an online softmax, then merged.
/// A request with no cached token gets zeros. Inference-only: the backward is an error.
///
/// # Shapes
/// `q: [b, hq, dh]`, `k_cache, v_cache: [num_blocks, block_tokens, hkv, dh]`,
/// `block_table: [b, max_blocks]` u32, `seq_lens: [b]` u32 → `[b, hq, dh]`.
///
/// # Errors
/// Bad shapes or dtypes, `hq % hkv != 0`, `dh > 256`. On CPU, a block id past the pool;
/// the kernel skips such tokens.
pub fn paged_decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seq_lens: &Tensor,
    part_tokens: Option<usize>,
) -> Result<Tensor> {
    const OP: &str = "paged_decode_attention";
    check_float(OP, "q", q)?;
    check_same(OP, ("q", q), ("k_cache", k_cache))?;
    check_same(OP, ("q", q), ("v_cache", v_cache))?;
    let [batch, q_heads, head_dim] = rank::<3>(OP, "q", q)?;
    let [num_blocks, block_tokens, kv_heads, dh] = rank::<4>(OP, "k_cache", k_cache)?;
    if v_cache.dims() != k_cache.dims() {
        return Err(invalid(
            OP,
            format!(
                "v_cache {:?} differs from k_cache {:?}",
                v_cache.dims(),
                k_cache.dims()
            ),
        ));
    }
    if dh != head_dim {
        return Err(invalid(
            OP,
            format!("q has head dim {head_dim} but the cache has {dh}"),
        ));
    }
    let [_, max_blocks] = rank::<2>(OP, "block_table", block_table)?;
    check_index_tensor(OP, "block_table", block_table, q, &[batch, max_blocks])?;
    check_index_tensor(OP, "seq_lens", seq_lens, q, &[batch])?;
    let shape = DecodeShape {
        batch,
        q_heads,
        kv_heads,
        head_dim,
        block_tokens,
        max_blocks,
        num_blocks,
    };
    let plan = launch::DecodePlan::new(
        shape,
        part_tokens.unwrap_or(launch::DECODE_DEFAULT_PART_TOKENS),
    )?;
    let op = PagedDecodeOp {
        block_table: block_table.contiguous()?,
        seq_lens: seq_lens.contiguous()?,
        plan,
    };
    Ok(q.contiguous()?
        .apply_op3(&k_cache.contiguous()?, &v_cache.contiguous()?, op)?)
}
