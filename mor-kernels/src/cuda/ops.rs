//! The fused kernels as candle custom ops, and the public functions that validate their
//! input and apply them.
//!
//! Each op is a [`Fused`] value: its CPU body (the maths of [`super::host`] on f64 copies
//! of the inputs), its device [`Plan`] (the kernels of the table in [`super::plan`], their
//! grids and arguments, run by one generic executor) and its backward. [`Op`] turns any of
//! them into a candle custom op of its arity, so every op, and its backward, is tested on
//! CPU against finite differences and against plain candle ops, and every plan is validated
//! against the kernel table. A backward is a composition of other ops of this file
//! (themselves kernels on CUDA) and plain candle ops, so gradients never leave the device.
//! Second-order gradients are not supported.

use super::host::{self, RopeDims, RouterActivation};
use super::imp;
use super::launch::{self, DecodeShape};
use super::mixed;
use super::plan::{Arg, Elem, Kernel, Plan};
use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor,
    WithDType,
};
use mor_core::config::Precision;

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
// One op = CPU body + device plan + backward; one wrapper makes it a candle custom op.

/// The output of a CPU body, before it becomes a storage.
pub(crate) enum HostOut {
    /// Rounded once to the dtype of the first input.
    Like(Vec<f64>),
    /// Kept in the accumulation dtype ([`acc_dtype`]).
    Acc(Vec<f64>),
    /// Indices.
    U32(Vec<u32>),
}

/// A fused op: what differs between ops. Everything else (dtype conversion on CPU, plan
/// execution on CUDA, arity) is [`Op`]'s.
pub(crate) trait Fused: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// The op's name in candle's graph.
    const NAME: &'static str;
    /// How many tensor inputs the op takes.
    const ARITY: usize;

    /// The CPU body on f64 copies of the (contiguous) inputs.
    fn host(&self, x: &[Vec<f64>], l: &[&Layout], dtype: DType) -> CResult<(HostOut, Shape)>;

    /// The device plan for inputs of these layouts.
    fn plan(&self, l: &[&Layout]) -> Result<Plan>;

    /// Gradients with respect to the inputs, one per input.
    fn bwd(&self, _x: &[&Tensor], _res: &Tensor, _grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A [`Fused`] op as a candle custom op of its arity.
#[derive(Debug, Clone)]
pub(crate) struct Op<K>(pub(crate) K);

impl<K: Fused> Op<K> {
    fn arity(n: usize) -> CResult<()> {
        if n != K::ARITY {
            candle_core::bail!("{} takes {} inputs, not {n}", K::NAME, K::ARITY);
        }
        Ok(())
    }

    fn cpu(&self, s: &[(&CpuStorage, &Layout)]) -> CResult<(CpuStorage, Shape)> {
        Self::arity(s.len())?;
        let x = s
            .iter()
            .map(|(s, l)| host_f64(s, l, K::NAME))
            .collect::<CResult<Vec<_>>>()?;
        let ls: Vec<&Layout> = s.iter().map(|(_, l)| *l).collect();
        let (out, shape) = self.0.host(&x, &ls, s[0].0.dtype())?;
        let st = match out {
            HostOut::Like(v) => host_like(s[0].0, v)?,
            HostOut::Acc(v) => host_acc(s[0].0.dtype(), v),
            HostOut::U32(v) => CpuStorage::U32(v),
        };
        Ok((st, shape))
    }

    fn cuda(&self, s: &[(&CudaStorage, &Layout)]) -> CResult<(CudaStorage, Shape)> {
        Self::arity(s.len())?;
        let ls: Vec<&Layout> = s.iter().map(|(_, l)| *l).collect();
        let plan = self.0.plan(&ls).map_err(cerr)?;
        imp::execute(&plan, s)
    }

    fn grads<const N: usize>(
        &self,
        x: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<[Option<Tensor>; N]> {
        let g = self.0.bwd(&x, res, grad)?;
        let n = g.len();
        g.try_into().map_err(|_| {
            candle_core::Error::msg(format!("{}: {n} gradients for {N} inputs", K::NAME))
        })
    }
}

/// One `Option<Tensor>` per input, for the gradients of [`custom_op!`].
macro_rules! grad_slot {
    ($x:ident) => {
        Option<Tensor>
    };
}

/// `impl CustomOpN for Op<K>` for one arity: the storages, layouts and inputs by name
/// (`storage layout input gradient` per input). Every method forwards to [`Op`]'s
/// arity-generic `cpu`, `cuda` and `grads`.
macro_rules! custom_op {
    ($trait:ident: $($s:ident $l:ident $x:ident $g:ident),+) => {
        impl<K: Fused> $trait for Op<K> {
            fn name(&self) -> &'static str {
                K::NAME
            }

            fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> CResult<(CpuStorage, Shape)> {
                self.cpu(&[$(($s, $l)),+])
            }

            fn cuda_fwd(
                &self,
                $($s: &CudaStorage, $l: &Layout),+
            ) -> CResult<(CudaStorage, Shape)> {
                self.cuda(&[$(($s, $l)),+])
            }

            #[allow(unused_parens)]
            fn bwd(
                &self,
                $($x: &Tensor,)+
                res: &Tensor,
                grad: &Tensor,
            ) -> CResult<($(grad_slot!($x)),+)> {
                let [$($g),+] = self.grads([$($x),+], res, grad)?;
                Ok(($($g),+))
            }
        }
    };
}

custom_op!(CustomOp1: s1 l1 x1 g1);
custom_op!(CustomOp2: s1 l1 x1 g1, s2 l2 x2 g2);
custom_op!(CustomOp3: s1 l1 x1 g1, s2 l2 x2 g2, s3 l3 x3 g3);

fn dims2(l: &Layout) -> Result<(usize, usize)> {
    Ok(l.shape().dims2()?)
}

fn dims3(l: &Layout) -> Result<(usize, usize, usize)> {
    Ok(l.shape().dims3()?)
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

impl Fused for RouterScoreOp {
    const NAME: &'static str = "mor-router-score";
    const ARITY: usize = 2;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (n, d) = l[0].shape().dims2()?;
        let out = host::router_score(&x[0], &x[1], n, d, self.alpha, self.inv_temp, self.act);
        Ok((HostOut::Acc(out), Shape::from((n, 2))))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (n, d) = dims2(l[0])?;
        let mut p = Plan::new("router_scores", 2, (n, 2));
        let out = p.buffer(Elem::F32, 2 * n);
        let args = vec![
            Arg::Input(0),
            Arg::Input(1),
            p.write_all(out),
            p.u32_arg("n", n)?,
            p.u32_arg("d", d)?,
            Arg::F32(self.alpha as f32),
            Arg::F32(self.inv_temp as f32),
            Arg::I32(self.act.code()),
        ];
        p.launch(Kernel::RouterScore, launch::warp_per_row(n as u64)?, args);
        Ok(p.output(out))
    }

    fn bwd(&self, x: &[&Tensor], res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let (h, w) = (x[0], x[1]);
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
        Ok(vec![Some(dh), Some(dw)])
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
        .apply_op2(&w.contiguous()?, Op(op))?;
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

impl Fused for TopkOp {
    const NAME: &'static str = "mor-topk-sorted";
    const ARITY: usize = 1;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], dtype: DType) -> CResult<(HostOut, Shape)> {
        let (rows, n) = l[0].shape().dims2()?;
        let keep =
            host::topk_sorted_radix(&x[0], rows, n, self.k, dtype == DType::F64).map_err(cerr)?;
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
        Ok((HostOut::U32(out), Shape::from((2, rows, self.k))))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (rows, n) = dims2(l[0])?;
        let k = self.k;
        let tp = launch::TopkPlan::new(rows as u64, n as u64, k as u64)?;
        let mut p = Plan::new("topk_sorted", 1, (2, rows, k));
        let out = p.buffer(Elem::U32, 2 * rows * k);
        let map = match &self.map {
            Some(m) => p.aux(m),
            None => Arg::Null,
        };
        let args = vec![
            Arg::Input(0),
            map,
            Arg::Write(out, 0..rows * k),
            Arg::Write(out, rows * k..2 * rows * k),
            p.u32_arg("n", n)?,
            p.u32_arg("k", k)?,
        ];
        p.launch(Kernel::TopkSorted, tp.dims, args);
        Ok(p.output(out))
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
    let out = scores
        .contiguous()?
        .apply_op1_no_bwd(&Op(TopkOp { k, map }))?;
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

impl Fused for RmsNormOp {
    const NAME: &'static str = "mor-rms-norm";
    const ARITY: usize = 2;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (n, d) = l[0].shape().dims2()?;
        let y = host::rms_norm_fwd(&x[0], &x[1], n, d, self.eps);
        Ok((HostOut::Like(y), l[0].shape().clone()))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (n, d) = dims2(l[0])?;
        let mut p = Plan::new("rms_norm", 2, l[0].shape().clone());
        let y = p.buffer(Elem::T, n * d);
        let args = vec![
            Arg::Input(0),
            Arg::Input(1),
            p.write_all(y),
            p.u32_arg("n", n)?,
            p.u32_arg("d", d)?,
            Arg::F32(self.eps as f32),
        ];
        p.launch(
            Kernel::RmsNormFwd,
            launch::block_per_row(n as u64, d as u64)?,
            args,
        );
        Ok(p.output(y))
    }

    fn bwd(&self, x: &[&Tensor], _res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let (x, w) = (x[0], x[1]);
        let (n, d) = x.dims2()?;
        let parts = if x.device().is_cuda() {
            launch::rms_norm_bwd(n as u64, d as u64)
                .map_err(cerr)?
                .grid
                .0 as usize
        } else {
            1
        };
        let op = Op(RmsNormBwdOp {
            eps: self.eps,
            parts,
        });
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
        Ok(vec![Some(dx), Some(dw)])
    }
}

/// Backward of RMSNorm: a flat accumulation-dtype buffer holding `dx [n, d]` and then
/// `parts` partial rows of `dw`.
#[derive(Debug, Clone)]
pub(crate) struct RmsNormBwdOp {
    pub(crate) eps: f64,
    pub(crate) parts: usize,
}

impl Fused for RmsNormBwdOp {
    const NAME: &'static str = "mor-rms-norm-bwd";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (n, d) = l[0].shape().dims2()?;
        let (mut dx, dw) = host::rms_norm_bwd(&x[0], &x[1], &x[2], n, d, self.eps);
        // The CPU writes its whole sum as the first partial row.
        dx.extend(dw);
        dx.resize(n * d + self.parts * d, 0.0);
        Ok((HostOut::Acc(dx), Shape::from(n * d + self.parts * d)))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (n, d) = dims2(l[0])?;
        let dims = launch::rms_norm_bwd(n as u64, d as u64)?;
        if dims.grid.0 as usize != self.parts {
            return Err(invalid(
                "rms_norm backward",
                format!(
                    "planned {} partial rows, the launch has {}",
                    self.parts, dims.grid.0
                ),
            ));
        }
        let len = n * d + self.parts * d;
        let mut p = Plan::new("rms_norm backward", 3, len);
        let out = p.buffer(Elem::F32, len);
        let args = vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Input(2),
            Arg::Write(out, 0..n * d),
            Arg::Write(out, n * d..len),
            p.u32_arg("n", n)?,
            p.u32_arg("d", d)?,
            Arg::F32(self.eps as f32),
        ];
        p.launch(Kernel::RmsNormBwd, dims, args);
        Ok(p.output(out))
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
        .apply_op2(&w.contiguous()?, Op(RmsNormOp { eps }))?;
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

/// A plan of one RoPE-family kernel: `(x, idx, cos, sin) -> out` over the `b·h·t·dh/2`
/// rotated pairs, with the size arguments `b, h, [l,] t, dh, max_pos` and an optional
/// trailing `sign`; the output has `out_rows` rows per head.
fn rope_plan(
    op: &'static str,
    kernel: Kernel,
    l: &[&Layout],
    idx: &Tensor,
    (t, l_arg, out_rows): (usize, Option<usize>, usize),
    sign: Option<f64>,
) -> Result<Plan> {
    let dims = rope_dims(l[0], l[1], t)?;
    let mut p = Plan::new(op, 3, (dims.b, dims.h, out_rows, dims.dh));
    let out = p.buffer(Elem::T, dims.b * dims.h * out_rows * dims.dh);
    let idx = p.aux(idx);
    let mut args = vec![
        Arg::Input(0),
        idx,
        Arg::Input(1),
        Arg::Input(2),
        p.write_all(out),
    ];
    args.push(p.u32_arg("b", dims.b)?);
    args.push(p.u32_arg("h", dims.h)?);
    if let Some(len) = l_arg {
        args.push(p.u32_arg("l", len)?);
    }
    args.push(p.u32_arg("t", t)?);
    args.push(p.u32_arg("dh", dims.dh)?);
    args.push(p.u32_arg("max_pos", dims.max_pos)?);
    if let Some(s) = sign {
        args.push(Arg::F32(s as f32));
    }
    let pairs = (dims.b * dims.h * t * (dims.dh / 2)) as u64;
    p.launch(kernel, launch::elementwise(pairs)?, args);
    Ok(p.output(out))
}

impl Fused for RopeOp {
    const NAME: &'static str = "mor-rope-at";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let dims = rope_dims(l[0], l[1], l[0].shape().dims()[2])?;
        let out = host::rope_at(&x[0], &host_u32(&self.pos)?, &x[1], &x[2], dims, self.sign)
            .map_err(cerr)?;
        Ok((HostOut::Like(out), l[0].shape().clone()))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let t = l[0].shape().dims4()?.2;
        rope_plan(
            "rope",
            Kernel::RopeAt,
            l,
            &self.pos,
            (t, None, t),
            Some(self.sign),
        )
    }

    fn bwd(&self, x: &[&Tensor], _res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        // The inverse rotation is the transpose; the tables are constants.
        let inv = Op(RopeOp {
            pos: self.pos.clone(),
            sign: -self.sign,
        });
        let dx = grad.contiguous()?.apply_op3(x[1], x[2], inv)?;
        Ok(vec![Some(dx), None, None])
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
    Ok(x.contiguous()?.apply_op3(&cos, &sin, Op(op))?)
}

#[derive(Debug, Clone)]
pub(crate) struct GatherRopeOp {
    pub(crate) idx: Tensor,
}

impl Fused for GatherRopeOp {
    const NAME: &'static str = "mor-gather-rope";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let t = self.idx.dims()[1];
        let dims = rope_dims(l[0], l[1], t)?;
        let len = l[0].shape().dims()[2];
        let out = host::gather_rope_fwd(&x[0], &host_u32(&self.idx)?, &x[1], &x[2], len, dims)
            .map_err(cerr)?;
        Ok((
            HostOut::Like(out),
            Shape::from((dims.b, dims.h, t, dims.dh)),
        ))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let t = self.idx.dims()[1];
        let len = l[0].shape().dims4()?.2;
        rope_plan(
            "gather_rope",
            Kernel::GatherRopeFwd,
            l,
            &self.idx,
            (t, Some(len), t),
            None,
        )
    }

    fn bwd(&self, x: &[&Tensor], _res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let op = Op(GatherRopeBwdOp {
            idx: self.idx.clone(),
            l: x[0].dims()[2],
        });
        let dx = grad.contiguous()?.apply_op3_no_bwd(x[1], x[2], &op)?;
        Ok(vec![Some(dx), None, None])
    }
}

/// Backward of the fused gather + RoPE: scatters the inverse rotation of each row back to
/// its source position in a zeroed `[b, h, l, dh]`.
#[derive(Debug, Clone)]
pub(crate) struct GatherRopeBwdOp {
    pub(crate) idx: Tensor,
    pub(crate) l: usize,
}

impl Fused for GatherRopeBwdOp {
    const NAME: &'static str = "mor-gather-rope-bwd";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let dims = rope_dims(l[0], l[1], l[0].shape().dims()[2])?;
        let dx = host::gather_rope_bwd(&x[0], &host_u32(&self.idx)?, &x[1], &x[2], self.l, dims)
            .map_err(cerr)?;
        Ok((
            HostOut::Like(dx),
            Shape::from((dims.b, dims.h, self.l, dims.dh)),
        ))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let t = l[0].shape().dims4()?.2;
        rope_plan(
            "gather_rope backward",
            Kernel::GatherRopeBwd,
            l,
            &self.idx,
            (t, Some(self.l), self.l),
            None,
        )
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
    Ok(x.contiguous()?.apply_op3(&cos, &sin, Op(op))?)
}

// ---------------------------------------------------------------------------------------
// SwiGLU.

#[derive(Debug, Clone)]
pub(crate) struct SwigluOp;

/// A plan of one elementwise SwiGLU kernel over `n` elements, writing `outputs · n`.
fn swiglu_plan(
    op: &'static str,
    kernel: Kernel,
    inputs: usize,
    n: usize,
    outputs: usize,
) -> Result<Plan> {
    let shape = if outputs == 1 {
        Shape::from(n)
    } else {
        Shape::from((outputs, n))
    };
    let mut p = Plan::new(op, inputs, shape);
    let out = p.buffer(Elem::T, outputs * n);
    let mut args: Vec<Arg> = (0..inputs).map(Arg::Input).collect();
    args.push(p.write_all(out));
    args.push(Arg::U64(n as u64));
    p.launch(kernel, launch::elementwise(n as u64)?, args);
    Ok(p.output(out))
}

impl Fused for SwigluOp {
    const NAME: &'static str = "mor-swiglu";
    const ARITY: usize = 2;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        Ok((
            HostOut::Like(host::swiglu_fwd(&x[0], &x[1])),
            l[0].shape().clone(),
        ))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let mut p = swiglu_plan("swiglu", Kernel::SwigluFwd, 2, l[0].shape().elem_count(), 1)?;
        p.shape = l[0].shape().clone();
        Ok(p)
    }

    fn bwd(&self, x: &[&Tensor], _res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let both = x[0].apply_op3_no_bwd(x[1], &grad.contiguous()?, &Op(SwigluBwdOp))?;
        let dg = both.get(0)?.reshape(x[0].shape())?;
        let du = both.get(1)?.reshape(x[1].shape())?;
        Ok(vec![Some(dg), Some(du)])
    }
}

/// Backward of SwiGLU: `[2, n]`, the gate gradient then the up gradient.
#[derive(Debug, Clone)]
pub(crate) struct SwigluBwdOp;

impl Fused for SwigluBwdOp {
    const NAME: &'static str = "mor-swiglu-bwd";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let out = host::swiglu_bwd(&x[0], &x[1], &x[2]);
        Ok((
            HostOut::Like(out),
            Shape::from((2, l[0].shape().elem_count())),
        ))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        swiglu_plan(
            "swiglu backward",
            Kernel::SwigluBwd,
            3,
            l[0].shape().elem_count(),
            2,
        )
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
    Ok(gate
        .contiguous()?
        .apply_op2(&up.contiguous()?, Op(SwigluOp))?)
}

// ---------------------------------------------------------------------------------------
// Gather and weighted scatter-add of token rows.

#[derive(Debug, Clone)]
pub(crate) struct GatherRowsOp {
    pub(crate) idx: Tensor,
}

/// The `b, l, k, d` size arguments of the token-row kernels.
fn row_sizes(p: &Plan, (b, l, k, d): (usize, usize, usize, usize)) -> Result<Vec<Arg>> {
    Ok(vec![
        p.u32_arg("b", b)?,
        p.u32_arg("l", l)?,
        p.u32_arg("k", k)?,
        p.u32_arg("d", d)?,
    ])
}

impl Fused for GatherRowsOp {
    const NAME: &'static str = "mor-gather-rows";
    const ARITY: usize = 1;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (b, len, d) = l[0].shape().dims3()?;
        let k = self.idx.dims()[1];
        let out = host::gather_rows(&x[0], &host_u32(&self.idx)?, b, len, k, d).map_err(cerr)?;
        Ok((HostOut::Like(out), Shape::from((b, k, d))))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (b, len, d) = dims3(l[0])?;
        let k = self.idx.dims()[1];
        let mut p = Plan::new("gather_tokens", 1, (b, k, d));
        let out = p.buffer(Elem::T, b * k * d);
        let mut args = vec![Arg::Input(0), p.aux(&self.idx), p.write_all(out)];
        args.extend(row_sizes(&p, (b, len, k, d))?);
        p.launch(
            Kernel::GatherRows,
            launch::row_loop((b * k) as u64, d as u64)?,
            args,
        );
        Ok(p.output(out))
    }

    fn bwd(&self, x: &[&Tensor], _res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        // Indices may repeat in a plain gather, so the backward accumulates (atomics).
        let op = Op(IndexAddOp {
            idx: self.idx.clone(),
            w: None,
            atomic: true,
        });
        let dh = x[0]
            .zeros_like()?
            .apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        Ok(vec![Some(dh)])
    }
}

/// `out = base; out[b, idx[b, i]] += w[b, i] * y[b, i]`, with atomics when `atomic`.
#[derive(Debug, Clone)]
pub(crate) struct IndexAddOp {
    pub(crate) idx: Tensor,
    pub(crate) w: Option<Tensor>,
    pub(crate) atomic: bool,
}

/// The plan of `mor_index_add_rows`: input 0 (the base `[b, l, d]`) is copied into the
/// output, then `w · y` (input 1, `[b, k, d]`) is added into the rows at `idx`.
fn index_add_plan(
    op: &'static str,
    inputs: usize,
    l: &[&Layout],
    idx: &Tensor,
    w: Arg,
    aux_w: Option<&Tensor>,
    atomic: bool,
) -> Result<Plan> {
    let (b, len, d) = dims3(l[0])?;
    let k = idx.dims()[1];
    let mut p = Plan::new(op, inputs, l[0].shape().clone());
    let out = p.buffer(Elem::T, b * len * d);
    p.copies.push((0, out));
    let idx = p.aux(idx);
    let w = match aux_w {
        Some(t) => p.aux(t),
        None => w,
    };
    let mut args = vec![p.write_all(out), idx, Arg::Input(1), w];
    args.extend(row_sizes(&p, (b, len, k, d))?);
    args.push(Arg::I32(atomic as i32));
    p.launch(
        Kernel::IndexAddRows,
        launch::row_loop((b * k) as u64, d as u64)?,
        args,
    );
    Ok(p.output(out))
}

impl Fused for IndexAddOp {
    const NAME: &'static str = "mor-index-add-rows";
    const ARITY: usize = 2;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (b, len, d) = l[0].shape().dims3()?;
        let k = self.idx.dims()[1];
        let mut out = x[0].clone();
        let w = match &self.w {
            Some(w) => Some(w.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            None => None,
        };
        host::index_add_rows(
            &mut out,
            &host_u32(&self.idx)?,
            &x[1],
            w.as_deref(),
            (b, len, k, d),
            !self.atomic,
        )
        .map_err(cerr)?;
        Ok((HostOut::Like(out), l[0].shape().clone()))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        index_add_plan(
            "index_add_rows",
            2,
            l,
            &self.idx,
            Arg::Null,
            self.w.as_ref(),
            self.atomic,
        )
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
    Ok(h.contiguous()?.apply_op1(Op(GatherRowsOp {
        idx: idx.contiguous()?,
    }))?)
}

#[derive(Debug, Clone)]
pub(crate) struct ScatterAddOp {
    pub(crate) idx: Tensor,
}

impl Fused for ScatterAddOp {
    const NAME: &'static str = "mor-scatter-add-rows";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (b, len, d) = l[0].shape().dims3()?;
        let k = self.idx.dims()[1];
        let mut out = x[0].clone();
        host::index_add_rows(
            &mut out,
            &host_u32(&self.idx)?,
            &x[1],
            Some(&x[2]),
            (b, len, k, d),
            true,
        )
        .map_err(cerr)?;
        Ok((HostOut::Like(out), l[0].shape().clone()))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        // The weights are the op's third input; the indices of a row are distinct.
        index_add_plan(
            "scatter_add_tokens",
            3,
            l,
            &self.idx,
            Arg::Input(2),
            None,
            false,
        )
    }

    fn bwd(&self, x: &[&Tensor], _res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let (y, w) = (x[1], x[2]);
        let (b, k, d) = y.dims3()?;
        let op = Op(ScatterAddBwdOp {
            idx: self.idx.clone(),
        });
        let packed = grad.contiguous()?.apply_op3_no_bwd(y, w, &op)?;
        let dy = packed.narrow(1, 0, d)?.reshape((b, k, d))?;
        let dw = packed.narrow(1, d, 1)?.reshape((b, k))?;
        Ok(vec![Some(grad.clone()), Some(dy), Some(dw)])
    }
}

/// Backward of the weighted scatter-add: `[b * k, d + 1]` rows of `(dy, dw)`.
#[derive(Debug, Clone)]
pub(crate) struct ScatterAddBwdOp {
    pub(crate) idx: Tensor,
}

impl Fused for ScatterAddBwdOp {
    const NAME: &'static str = "mor-scatter-add-rows-bwd";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (b, len, d) = l[0].shape().dims3()?;
        let k = self.idx.dims()[1];
        let out = host::scatter_add_bwd(&x[0], &host_u32(&self.idx)?, &x[1], &x[2], (b, len, k, d))
            .map_err(cerr)?;
        Ok((HostOut::Like(out), Shape::from((b * k, d + 1))))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (b, len, d) = dims3(l[0])?;
        let k = self.idx.dims()[1];
        let mut p = Plan::new("scatter_add_tokens backward", 3, (b * k, d + 1));
        let out = p.buffer(Elem::T, b * k * (d + 1));
        let mut args = vec![
            Arg::Input(0),
            p.aux(&self.idx),
            Arg::Input(1),
            Arg::Input(2),
            p.write_all(out),
        ];
        args.extend(row_sizes(&p, (b, len, k, d))?);
        p.launch(
            Kernel::ScatterAddBwd,
            launch::warp_per_row((b * k) as u64)?,
            args,
        );
        Ok(p.output(out))
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
    Ok(h.contiguous()?.apply_op3(&y.contiguous()?, &w, Op(op))?)
}

// ---------------------------------------------------------------------------------------
// Paged decode attention.

#[derive(Debug, Clone)]
pub(crate) struct PagedDecodeOp {
    pub(crate) block_table: Tensor,
    pub(crate) seq_lens: Tensor,
    pub(crate) plan: launch::DecodePlan,
}

impl Fused for PagedDecodeOp {
    const NAME: &'static str = "mor-paged-decode-attention";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let out = host::paged_decode_attention(
            &x[0],
            &x[1],
            &x[2],
            &host_u32(&self.block_table)?,
            &host_u32(&self.seq_lens)?,
            self.plan.shape,
        )
        .map_err(cerr)?;
        Ok((HostOut::Like(out), l[0].shape().clone()))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (dp, s) = (&self.plan, self.plan.shape);
        let mut p = Plan::new("paged_decode_attention", 3, l[0].shape().clone());
        let partial = p.buffer(Elem::F32, dp.partial_len);
        let out = p.buffer(Elem::T, s.batch * s.q_heads * s.head_dim);
        let mut args = vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Input(2),
            p.aux(&self.block_table),
            p.aux(&self.seq_lens),
            p.write_all(partial),
        ];
        for (what, v) in [
            ("hq", s.q_heads),
            ("hkv", s.kv_heads),
            ("dh", s.head_dim),
            ("block_tokens", s.block_tokens),
            ("max_blocks", s.max_blocks),
            ("num_blocks", s.num_blocks),
            ("part_tokens", dp.part_tokens),
        ] {
            args.push(p.u32_arg(what, v)?);
        }
        args.push(Arg::F32(1.0 / (s.head_dim as f32).sqrt()));
        p.launch(Kernel::PagedDecodePartial, dp.partial, args);
        let args = vec![
            Arg::Read(partial),
            p.write_all(out),
            p.u32_arg("hq", s.q_heads)?,
            p.u32_arg("dh", s.head_dim)?,
            p.u32_arg("n_parts", dp.n_parts)?,
        ];
        p.launch(Kernel::PagedDecodeCombine, dp.combine, args);
        Ok(p.output(out))
    }

    fn bwd(&self, _: &[&Tensor], _: &Tensor, _: &Tensor) -> CResult<Vec<Option<Tensor>>> {
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
        .apply_op3(&k_cache.contiguous()?, &v_cache.contiguous()?, Op(op))?)
}

// ---------------------------------------------------------------------------------------
// Flash attention by positions.

/// The host values of a float tensor (any float dtype), as f64.
fn host_f64_tensor(t: &Tensor) -> CResult<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

fn flash_shape_of(op: &'static str, plan: &launch::FlashPlan, l: &[&Layout]) -> Result<()> {
    let s = plan.shape;
    let want_q = [s.batch, s.q_heads, s.t, s.head_dim];
    let want_kv = [s.batch, s.kv_heads, s.s, s.head_dim];
    if l[0].dims() != want_q || l[1].dims() != want_kv || l[2].dims() != want_kv {
        return Err(invalid(
            op,
            format!(
                "inputs {:?}, {:?}, {:?} differ from the planned q {want_q:?}, k/v {want_kv:?}",
                l[0].dims(),
                l[1].dims(),
                l[2].dims()
            ),
        ));
    }
    Ok(())
}

/// The trailing size arguments of the flash-attention kernels: `hq, hkv, t, s, dh, scale`.
fn flash_sizes(p: &Plan, s: launch::FlashShape) -> Result<Vec<Arg>> {
    let mut args = Vec::with_capacity(6);
    for (what, v) in [
        ("hq", s.q_heads),
        ("hkv", s.kv_heads),
        ("t", s.t),
        ("s", s.s),
        ("dh", s.head_dim),
    ] {
        args.push(p.u32_arg(what, v)?);
    }
    args.push(Arg::F32(1.0 / (s.head_dim as f32).sqrt()));
    Ok(args)
}

/// Flash attention forward: inputs `q, k, v`; output `[b, hq, t, dh + 1]` in the
/// accumulation dtype, each row the attention output followed by its log-sum-exp.
#[derive(Debug, Clone)]
pub(crate) struct FlashAttnOp {
    pub(crate) q_pos: Tensor,
    pub(crate) k_pos: Tensor,
    pub(crate) plan: launch::FlashPlan,
}

impl Fused for FlashAttnOp {
    const NAME: &'static str = "mor-flash-attention";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], _: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let s = self.plan.shape;
        let (o, lse) = host::flash_attention_fwd(
            &x[0],
            &x[1],
            &x[2],
            &host_u32(&self.q_pos)?,
            &host_u32(&self.k_pos)?,
            s,
        );
        let dh = s.head_dim;
        let mut out = Vec::with_capacity(lse.len() * (dh + 1));
        for (row, l) in o.chunks_exact(dh).zip(&lse) {
            out.extend_from_slice(row);
            out.push(*l);
        }
        Ok((
            HostOut::Acc(out),
            Shape::from((s.batch, s.q_heads, s.t, dh + 1)),
        ))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let fp = self.plan;
        let s = fp.shape;
        flash_shape_of("flash_attention", &fp, l)?;
        let mut p = Plan::new(
            "flash_attention",
            3,
            (s.batch, s.q_heads, s.t, s.head_dim + 1),
        );
        let out = p.buffer(Elem::F32, s.batch * s.q_heads * s.t * (s.head_dim + 1));
        let mut args = vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Input(2),
            p.aux(&self.q_pos),
            p.aux(&self.k_pos),
            p.write_all(out),
        ];
        args.extend(flash_sizes(&p, s)?);
        p.launch(Kernel::FlashAttnFwd, fp.fwd, args);
        Ok(p.output(out))
    }

    fn bwd(&self, x: &[&Tensor], res: &Tensor, grad: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let s = self.plan.shape;
        let dh = s.head_dim;
        let o = res.narrow(3, 0, dh)?;
        let lse = res.narrow(3, dh, 1)?;
        // The output gradient in the accumulation dtype; the log-sum-exp column of the
        // packed output carries no gradient of its own.
        let dout = grad.narrow(3, 0, dh)?.to_dtype(res.dtype())?.contiguous()?;
        // D = rowsum(dO ⊙ O), FlashAttention-2's preprocessing step.
        let d = (&dout * &o)?.sum_keepdim(3)?;
        let stats = Tensor::cat(&[&lse, &d], 3)?.contiguous()?;
        let op = Op(FlashAttnBwdOp {
            fwd: self.clone(),
            dout,
            stats,
        });
        let (q, k, v) = (x[0], x[1], x[2]);
        let g = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nkv) = (q.elem_count(), k.elem_count());
        let dq = g
            .narrow(0, 0, nq)?
            .reshape(q.shape())?
            .to_dtype(q.dtype())?;
        let dk = g
            .narrow(0, nq, nkv)?
            .reshape(k.shape())?
            .to_dtype(k.dtype())?;
        let dv = g
            .narrow(0, nq + nkv, nkv)?
            .reshape(v.shape())?
            .to_dtype(v.dtype())?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

/// Flash attention backward: inputs `q, k, v`; output `[dq | dk | dv]` flat, in the
/// accumulation dtype.
#[derive(Debug, Clone)]
pub(crate) struct FlashAttnBwdOp {
    pub(crate) fwd: FlashAttnOp,
    /// `[b, hq, t, dh]`, the accumulation dtype.
    pub(crate) dout: Tensor,
    /// `[b, hq, t, 2]`: log-sum-exp and `rowsum(dO ⊙ O)` of each query row.
    pub(crate) stats: Tensor,
}

impl Fused for FlashAttnBwdOp {
    const NAME: &'static str = "mor-flash-attention-bwd";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], _: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (dq, dk, dv) = host::flash_attention_bwd(
            &x[0],
            &x[1],
            &x[2],
            &host_u32(&self.fwd.q_pos)?,
            &host_u32(&self.fwd.k_pos)?,
            &host_f64_tensor(&self.dout)?,
            &host_f64_tensor(&self.stats)?,
            self.fwd.plan.shape,
        );
        let mut out = dq;
        out.extend(dk);
        out.extend(dv);
        let n = out.len();
        Ok((HostOut::Acc(out), Shape::from(n)))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        const OP: &str = "flash_attention backward";
        let fp = self.fwd.plan;
        let s = fp.shape;
        flash_shape_of(OP, &fp, l)?;
        let nq = s.batch * s.q_heads * s.t * s.head_dim;
        let nkv = s.batch * s.kv_heads * s.s * s.head_dim;
        let mut p = Plan::new(OP, 3, nq + 2 * nkv);
        let out = p.buffer(Elem::F32, nq + 2 * nkv);
        let ins = vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Input(2),
            p.aux(&self.fwd.q_pos),
            p.aux(&self.fwd.k_pos),
            p.aux(&self.dout),
            p.aux(&self.stats),
        ];
        let sizes = flash_sizes(&p, s)?;
        for (kernel, range, dims) in [
            (Kernel::FlashAttnBwdDq, 0..nq, fp.dq),
            (Kernel::FlashAttnBwdDkv, nq..nq + 2 * nkv, fp.dkv),
        ] {
            let mut args = ins.clone();
            args.push(Arg::Write(out, range));
            args.extend(sizes.iter().cloned());
            p.launch(kernel, dims, args);
        }
        Ok(p.output(out))
    }
}

/// Causal attention with GQA by positions, flash-style (FlashAttention-2): query `i` sees
/// key `j` iff `k_pos[j] <= q_pos[i]`, neither is [`crate::PAD_POS`]; scale
/// `1/sqrt(dh)`; a query that sees no key gets zeros (the contract of
/// [`crate::Backend::attention`], mor-spec §1.1). No `[t, s]` score matrix is
/// materialised: the forward pass keeps only the output and the log-sum-exp of each row,
/// and the backward pass recomputes the probabilities from it. Positions are read on the
/// device only (no host round trip). Differentiable with respect to `q`, `k` and `v`.
///
/// # Shapes
/// `q: [b, hq, t, dh]`, `k, v: [b, hkv, s, dh]` with `hq % hkv == 0` and
/// `dh <= 128` ([`launch::FLASH_MAX_HEAD_DIM`]), `q_pos: [b, t]`, `k_pos: [b, s]` u32 →
/// `[b, hq, t, dh]`.
///
/// # Errors
/// Bad shapes, dtypes or devices; a head dimension past the kernels' limit.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &Tensor,
    k_pos: &Tensor,
) -> Result<Tensor> {
    Ok(flash_attention_acc(q, k, v, q_pos, k_pos)?.to_dtype(q.dtype())?)
}

/// [`flash_attention`] with the output kept in the accumulation dtype ([`acc_dtype`]: f32
/// for bf16 and f32 inputs): the bf16 mixed-precision path reads bf16 `q, k, v` and keeps
/// the f32 result of the kernel's f32 arithmetic. The gradients of `q, k, v` have their
/// dtypes (bf16 gradients for bf16 inputs).
pub(crate) fn flash_attention_acc(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &Tensor,
    k_pos: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "flash_attention";
    check_float(OP, "q", q)?;
    check_same(OP, ("q", q), ("k", k))?;
    check_same(OP, ("q", q), ("v", v))?;
    let [b, hq, t, dh] = rank::<4>(OP, "q", q)?;
    let [bk, hkv, s, dk] = rank::<4>(OP, "k", k)?;
    if v.dims() != k.dims() || bk != b || dk != dh {
        return Err(invalid(
            OP,
            format!(
                "q {:?}, k {:?}, v {:?}: need equal batch and head dim, and v shaped as k",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        ));
    }
    check_index_tensor(OP, "q_pos", q_pos, q, &[b, t])?;
    check_index_tensor(OP, "k_pos", k_pos, q, &[b, s])?;
    if b * hq * t * dh == 0 || s == 0 {
        return Ok(Tensor::zeros(
            (b, hq, t, dh),
            acc_dtype(q.dtype()),
            q.device(),
        )?);
    }
    let plan = launch::FlashPlan::new(launch::FlashShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        t,
        s,
        head_dim: dh,
    })?;
    let op = FlashAttnOp {
        q_pos: q_pos.contiguous()?,
        k_pos: k_pos.contiguous()?,
        plan,
    };
    let packed = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Op(op))?;
    Ok(packed.narrow(3, 0, dh)?)
}

// ---------------------------------------------------------------------------------------
// LM head + cross-entropy in vocabulary chunks.

/// The default number of vocabulary columns per chunk for `rows` rows: about 2^26 logits
/// per chunk (256 MiB in f32), between 1024 and 65536 columns, a multiple of 32.
pub fn ce_chunk_cols(rows: usize, vocab: usize) -> usize {
    let c = ((1usize << 26) / rows.max(1)).clamp(1024, 65_536) / 32 * 32;
    c.min(vocab.max(1))
}

/// Per-row statistics of one vocabulary chunk: input `logits [n, cols]`; output `[n, 3]`
/// in the accumulation dtype.
#[derive(Debug, Clone)]
pub(crate) struct CeStatsOp {
    pub(crate) targets: Tensor,
    pub(crate) col0: usize,
}

impl Fused for CeStatsOp {
    const NAME: &'static str = "mor-ce-chunk-stats";
    const ARITY: usize = 1;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (n, cols) = l[0].shape().dims2()?;
        let out = host::ce_chunk_stats(&x[0], &host_u32(&self.targets)?, n, cols, self.col0);
        Ok((HostOut::Acc(out), Shape::from((n, 3))))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (n, cols) = dims2(l[0])?;
        let mut p = Plan::new("linear_cross_entropy chunk statistics", 1, (n, 3));
        let out = p.buffer(Elem::F32, 3 * n);
        let args = vec![
            Arg::Input(0),
            p.aux(&self.targets),
            p.write_all(out),
            p.u32_arg("n", n)?,
            p.u32_arg("cols", cols)?,
            p.u32_arg("col0", self.col0)?,
        ];
        p.launch(Kernel::CeChunkStats, launch::warp_per_row(n as u64)?, args);
        Ok(p.output(out))
    }
}

/// The logits gradient of one vocabulary chunk: input `logits [n, cols]`; output
/// `[n, cols]` in the logits' dtype.
#[derive(Debug, Clone)]
pub(crate) struct CeGradOp {
    pub(crate) targets: Tensor,
    /// `[n]`, the accumulation dtype.
    pub(crate) lse: Tensor,
    /// `[1]`: the upstream gradient of the mean loss over the row count.
    pub(crate) gscale: Tensor,
    pub(crate) col0: usize,
}

impl Fused for CeGradOp {
    const NAME: &'static str = "mor-ce-chunk-grad";
    const ARITY: usize = 1;

    fn host(&self, x: &[Vec<f64>], l: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let (_, cols) = l[0].shape().dims2()?;
        let g = host_f64_tensor(&self.gscale)?;
        let out = host::ce_chunk_grad(
            &x[0],
            &host_u32(&self.targets)?,
            &host_f64_tensor(&self.lse)?,
            g[0],
            cols,
            self.col0,
        );
        Ok((HostOut::Like(out), l[0].shape().clone()))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let (n, cols) = dims2(l[0])?;
        let mut p = Plan::new("linear_cross_entropy chunk gradient", 1, (n, cols));
        let out = p.buffer(Elem::T, n * cols);
        let args = vec![
            Arg::Input(0),
            p.aux(&self.targets),
            p.aux(&self.lse),
            p.aux(&self.gscale),
            p.write_all(out),
            p.u32_arg("n", n)?,
            p.u32_arg("cols", cols)?,
            p.u32_arg("col0", self.col0)?,
        ];
        p.launch(
            Kernel::CeChunkGrad,
            launch::elementwise((n * cols) as u64)?,
            args,
        );
        Ok(p.output(out))
    }
}

/// The vocabulary chunks `(col0, cols)` of a vocabulary of `vocab` columns.
fn chunks(vocab: usize, cols: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..vocab)
        .step_by(cols.max(1))
        .map(move |c0| (c0, cols.min(vocab - c0)))
}

/// The loss node of the chunked cross-entropy: inputs `x [n, d]`, `w [V, d]` and the loss
/// already computed (detached, a scalar); the forward pass passes the loss through, the
/// backward pass recomputes each chunk's logits and returns `dx`, `dw` chunk by chunk.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedCeLoss {
    pub(crate) targets: Tensor,
    /// `[n]` log-sum-exp of each row, the accumulation dtype.
    pub(crate) lse: Tensor,
    pub(crate) cols: usize,
    /// Products in bf16 mixed precision ([`Precision::Bf16`] on f32 inputs).
    pub(crate) bf16: bool,
}

/// The chunk product `a · b` of the chunked cross-entropy: a candle matmul, or with
/// `bf16` (operands already bf16) the mixed-precision product in bf16.
fn ce_product(a: &Tensor, b: &Tensor, bf16: bool) -> CResult<Tensor> {
    if bf16 {
        mixed::matmul_bf16(a, b).map_err(cerr)
    } else {
        a.matmul(b)
    }
}

impl CustomOp3 for ChunkedCeLoss {
    fn name(&self) -> &'static str {
        "mor-linear-cross-entropy-chunked"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        Ok((s3.try_clone(l3)?, l3.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        Ok((s3.try_clone(l3)?, l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, _) = x.dims2()?;
        let (vocab, _) = w.dims2()?;
        let acc = self.lse.dtype();
        let gscale = (grad.to_dtype(acc)? / n.max(1) as f64)?.reshape(1)?;
        // In bf16 the operands are rounded once; the logits and their gradient are bf16
        // (cuBLAS's output), and each product's f32 sums are widened and summed in f32.
        let (xo, wo) = if self.bf16 {
            (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?)
        } else {
            (x.clone(), w.clone())
        };
        let mut dx: Option<Tensor> = None;
        let mut dws = Vec::new();
        for (col0, cols) in chunks(vocab, self.cols) {
            let wc = wo.narrow(0, col0, cols)?;
            let logits = ce_product(&xo, &wc.t()?, self.bf16)?.contiguous()?;
            let op = Op(CeGradOp {
                targets: self.targets.clone(),
                lse: self.lse.clone(),
                gscale: gscale.clone(),
                col0,
            });
            let dl = logits.apply_op1_no_bwd(&op)?;
            let part = ce_product(&dl, &wc, self.bf16)?.to_dtype(x.dtype())?;
            dx = Some(match dx {
                Some(d) => (d + part)?,
                None => part,
            });
            dws.push(ce_product(&dl.t()?, &xo, self.bf16)?.to_dtype(w.dtype())?);
        }
        let dw = Tensor::cat(&dws, 0)?;
        Ok((dx, Some(dw), None))
    }
}

/// The language-model head and its mean cross-entropy in vocabulary chunks: the mean over
/// rows of `logsumexp(x wᵀ) − (x wᵀ)[target]` (the contract of
/// [`crate::Backend::linear_cross_entropy`]), with the `[rows, vocab]` logits never
/// materialised: the products run chunk by chunk as candle matmuls (cuBLAS on CUDA),
/// small kernels reduce each chunk to per-row statistics in the forward pass and turn it
/// into its logits gradient in the backward pass. At most `[rows, chunk_cols]` logits
/// exist at a time (default [`ce_chunk_cols`]). Differentiable with respect to `x` and `w`;
/// the loss has the dtype of `x`.
///
/// # Shapes
/// `x: [.., d]`, `w: [vocab, d]`, `targets: [..]` u32 (one per row of `x`) → scalar.
///
/// # Errors
/// Bad shapes, dtypes or devices, `chunk_cols == 0`. On CPU, a target `>= vocab`; on the
/// device such a target is not detected (it would need a host read) and contributes no
/// target logit.
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk_cols: Option<usize>,
) -> Result<Tensor> {
    linear_cross_entropy_with(x, w, targets, chunk_cols, Precision::F32)
}

/// [`linear_cross_entropy`] with the products in `precision`. With [`Precision::Bf16`]
/// and f32 `x`, `w`: `x` and `w` are rounded to bf16 once, each chunk's logits are the
/// bf16 product with f32 sums (cuBLAS's output, rounded once to bf16), and the statistics,
/// the log-sum-exp and the loss are f32; the backward pass recomputes the chunk's logits
/// the same way, forms the logits gradient in bf16 and returns `dx` and `dw` in f32 (the
/// dtype of `x` and `w`), each chunk's products summed in f32 (see
/// [`bf16_matmul`](super::bf16_matmul)). Other dtypes ignore `precision`.
///
/// # Errors
/// As [`linear_cross_entropy`].
pub fn linear_cross_entropy_with(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk_cols: Option<usize>,
    precision: Precision,
) -> Result<Tensor> {
    const OP: &str = "linear_cross_entropy";
    check_float(OP, "x", x)?;
    check_same(OP, ("x", x), ("w", w))?;
    let [vocab, d] = rank::<2>(OP, "w", w)?;
    if x.dims().last() != Some(&d) {
        return Err(invalid(
            OP,
            format!(
                "x {:?} does not end in d = {d} of w {:?}",
                x.dims(),
                w.dims()
            ),
        ));
    }
    let n = x.elem_count() / d.max(1);
    check_index_tensor(OP, "targets", &targets.flatten_all()?, x, &[n])?;
    let cols = chunk_cols.unwrap_or_else(|| ce_chunk_cols(n, vocab));
    if cols == 0 {
        return Err(invalid(OP, "chunk_cols must be positive"));
    }
    let targets = targets.flatten_all()?.contiguous()?;
    if x.device().is_cpu() {
        if let Some(bad) = host_u32(&targets)?.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(
                OP,
                format!("target {bad} is outside the vocabulary of {vocab}"),
            ));
        }
    }
    let acc = acc_dtype(x.dtype());
    if n == 0 || vocab == 0 {
        return Ok(Tensor::new(f32::NAN, x.device())?.to_dtype(x.dtype())?);
    }
    let x2 = x.reshape((n, d))?.contiguous()?;
    let w = w.contiguous()?;
    let bf16 = precision == Precision::Bf16 && x.dtype() == DType::F32;
    let (xd, wd) = if bf16 {
        (
            x2.detach().to_dtype(DType::BF16)?,
            w.detach().to_dtype(DType::BF16)?,
        )
    } else {
        (x2.detach(), w.detach())
    };
    let mut stats = Vec::new();
    for (col0, c) in chunks(vocab, cols) {
        let logits = ce_product(&xd, &wd.narrow(0, col0, c)?.t()?, bf16)?.contiguous()?;
        let op = Op(CeStatsOp {
            targets: targets.clone(),
            col0,
        });
        stats.push(logits.apply_op1_no_bwd(&op)?);
    }
    // Merge the chunks: lse = M + ln Σ_c s_c exp(m_c − M).
    let st = Tensor::stack(&stats, 0)?; // [chunks, n, 3]
    let m = st.narrow(2, 0, 1)?.squeeze(2)?;
    let big = m.max_keepdim(0)?;
    let s = (st.narrow(2, 1, 1)?.squeeze(2)? * m.broadcast_sub(&big)?.exp()?)?.sum_keepdim(0)?;
    let lse = (big + s.log()?)?.squeeze(0)?.contiguous()?;
    let target_logit = st.narrow(2, 2, 1)?.squeeze(2)?.sum(0)?;
    let loss = (&lse - target_logit)?.mean_all()?.to_dtype(acc)?.detach();
    let node = ChunkedCeLoss {
        targets,
        lse,
        cols,
        bf16,
    };
    let out = if x2.track_op() || w.track_op() {
        x2.apply_op3(&w, &loss, node)?
    } else {
        loss
    };
    Ok(out.to_dtype(x.dtype())?)
}

// ---------------------------------------------------------------------------------------
// Fused AdamW.

pub use host::AdamwHyper;

/// One AdamW step of one parameter: inputs `w, m, v`, the gradient as an auxiliary
/// tensor; output `[3, n]`, the new `w, m, v`.
#[derive(Debug, Clone)]
pub(crate) struct AdamwOp {
    pub(crate) g: Tensor,
    pub(crate) h: AdamwHyper,
}

impl Fused for AdamwOp {
    const NAME: &'static str = "mor-adamw-step";
    const ARITY: usize = 3;

    fn host(&self, x: &[Vec<f64>], _: &[&Layout], _: DType) -> CResult<(HostOut, Shape)> {
        let g = host_f64_tensor(&self.g)?;
        let n = x[0].len();
        let out = host::adamw_step(&x[0], &g, &x[1], &x[2], &self.h);
        Ok((HostOut::Like(out), Shape::from((3, n))))
    }

    fn plan(&self, l: &[&Layout]) -> Result<Plan> {
        let n = l[0].shape().elem_count();
        let h = self.h;
        let mut p = Plan::new("adamw_step", 3, (3, n));
        let out = p.buffer(Elem::T, 3 * n);
        let mut args = vec![
            Arg::Input(0),
            p.aux(&self.g),
            Arg::Input(1),
            Arg::Input(2),
            p.write_all(out),
            Arg::U64(n as u64),
        ];
        for v in [
            h.beta1,
            1.0 - h.beta1,
            h.beta2,
            1.0 - h.beta2,
            h.bc1,
            h.bc2,
            h.lr,
            h.eps,
            1.0 - h.decay,
        ] {
            args.push(Arg::F64(v));
        }
        p.launch(Kernel::AdamwStep, launch::elementwise(n as u64)?, args);
        Ok(p.output(out))
    }
}

/// One fused AdamW step of one parameter tensor (mor-spec §1.3), one kernel launch on
/// CUDA, the moments staying on the device:
/// `m' = β₁m + (1 − β₁)g`, `v' = β₂v + (1 − β₂)g²`,
/// `w' = w(1 − decay) − lr · (m'/bc1) / (sqrt(v'/bc2) + ε)`, computed in f64 from the
/// f32 values, operation for operation as the trainer's host update, and rounded once: for
/// f32 tensors the result equals the host update bit for bit. On CPU tensors it runs the
/// same arithmetic on the host. Returns `(w', m', v')` shaped as `w` (views of one
/// `[3, n]` buffer). Not differentiable.
///
/// # Errors
/// Tensors of different shapes, dtypes or devices; a non-float dtype; on CUDA, a dtype
/// other than f32 and bf16.
pub fn adamw_step(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &AdamwHyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "adamw_step";
    check_float(OP, "w", w)?;
    for (what, t) in [("g", g), ("m", m), ("v", v)] {
        check_same(OP, ("w", w), (what, t))?;
        if t.dims() != w.dims() {
            return Err(invalid(
                OP,
                format!("{what} has shape {:?}, w has {:?}", t.dims(), w.dims()),
            ));
        }
    }
    if w.elem_count() == 0 {
        return Ok((w.clone(), m.clone(), v.clone()));
    }
    let flat = |t: &Tensor| -> Result<Tensor> { Ok(t.flatten_all()?.contiguous()?) };
    let op = AdamwOp { g: flat(g)?, h: *h };
    let out = flat(w)?.apply_op3_no_bwd(&flat(m)?, &flat(v)?, &Op(op))?;
    let row = |i: usize| -> Result<Tensor> { Ok(out.get(i)?.reshape(w.shape())?) };
    Ok((row(0)?, row(1)?, row(2)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `[rows, k]` u32 indices `0..k` in every row (distinct, in range).
    fn idx(rows: usize, k: usize) -> Tensor {
        Tensor::arange(0u32, k as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((rows, 1))
            .unwrap()
    }

    /// Builds the op's device plan for contiguous inputs of `dims`, validates it for each
    /// dtype, and checks that it produces the shape the CPU body produces.
    fn plan_of<K: Fused>(op: &K, dims: &[&[usize]], dtypes: &[DType]) -> Plan {
        assert_eq!(dims.len(), K::ARITY, "{}", K::NAME);
        let ls: Vec<Layout> = dims.iter().map(|d| Layout::contiguous(*d)).collect();
        let refs: Vec<&Layout> = ls.iter().collect();
        let plan = op.plan(&refs).unwrap();
        assert_eq!(plan.inputs, K::ARITY, "{}", K::NAME);
        for &dt in dtypes {
            plan.validate(dt)
                .unwrap_or_else(|e| panic!("{} ({dt:?}): {e}", K::NAME));
        }
        let zeros: Vec<Vec<f64>> = dims.iter().map(|d| vec![0.0; d.iter().product()]).collect();
        let (_, shape) = op.host(&zeros, &refs, DType::F32).unwrap();
        assert_eq!(shape, plan.shape, "{}: plan and CPU body disagree", K::NAME);
        plan
    }

    const BOTH: &[DType] = &[DType::F32, DType::BF16];

    #[test]
    fn every_op_has_a_valid_plan_of_its_cpu_shape() {
        let r = RouterScoreOp {
            alpha: 0.1,
            inv_temp: 1.0,
            act: RouterActivation::Tanh,
        };
        let p = plan_of(&r, &[&[64, 96], &[96]], BOTH);
        assert_eq!(p.launches[0].args[7], Arg::I32(1));
        for map in [None, Some(idx(3, 5000))] {
            let p = plan_of(&TopkOp { k: 1234, map }, &[&[3, 5000]], BOTH);
            assert_eq!(p.launches[0].dims.grid.0, 3, "one block per row");
        }
        for (n, d) in [(33usize, 257usize), (5, 2050), (4096, 1024)] {
            plan_of(&RmsNormOp { eps: 1e-5 }, &[&[n, d], &[d]], BOTH);
            let parts = launch::rms_norm_bwd(n as u64, d as u64).unwrap().grid.0 as usize;
            let bwd = RmsNormBwdOp { eps: 1e-5, parts };
            plan_of(&bwd, &[&[n, d], &[d], &[n, d]], BOTH);
            // A partial-row count that is not the launch's is refused, not launched.
            let wrong = RmsNormBwdOp {
                eps: 1e-5,
                parts: parts + 1,
            };
            let l = [Layout::contiguous((n, d)), Layout::contiguous(d)];
            assert!(wrong.plan(&[&l[0], &l[1], &l[0]]).is_err());
        }
        let tables: &[usize] = &[128, 32];
        let rope = RopeOp {
            pos: idx(2, 17),
            sign: -1.0,
        };
        let p = plan_of(&rope, &[&[2, 3, 17, 64], tables, tables], BOTH);
        assert_eq!(p.launches[0].args[10], Arg::F32(-1.0));
        plan_of(
            &GatherRopeOp { idx: idx(2, 11) },
            &[&[2, 3, 40, 64], tables, tables],
            BOTH,
        );
        let p = plan_of(
            &GatherRopeBwdOp {
                idx: idx(2, 11),
                l: 40,
            },
            &[&[2, 3, 11, 64], tables, tables],
            BOTH,
        );
        // b, h, l, t: the gradient has the source length, the loop runs over t rows.
        assert_eq!(
            p.launches[0].args[5..9],
            [Arg::U32(2), Arg::U32(3), Arg::U32(40), Arg::U32(11)]
        );
        plan_of(&SwigluOp, &[&[37, 130], &[37, 130]], BOTH);
        plan_of(&SwigluBwdOp, &[&[37, 130], &[37, 130], &[37, 130]], BOTH);
        plan_of(&GatherRowsOp { idx: idx(2, 13) }, &[&[2, 50, 72]], BOTH);
        let w = Tensor::ones((2, 13), DType::F32, &Device::Cpu).unwrap();
        for (w, atomic, dtypes) in [(Some(w), false, &[DType::F32][..]), (None, true, BOTH)] {
            let op = IndexAddOp {
                idx: idx(2, 13),
                w,
                atomic,
            };
            let p = plan_of(&op, &[&[2, 50, 72], &[2, 13, 72]], dtypes);
            assert_eq!(p.copies, [(0, 0)], "the base is copied into the output");
            assert_eq!(p.launches[0].args[8], Arg::I32(atomic as i32));
        }
        let three: &[&[usize]] = &[&[2, 50, 72], &[2, 13, 72], &[2, 13]];
        let p = plan_of(&ScatterAddOp { idx: idx(2, 13) }, three, BOTH);
        assert_eq!(p.launches[0].args[3], Arg::Input(2), "the weights");
        plan_of(&ScatterAddBwdOp { idx: idx(2, 13) }, three, BOTH);
        let shape = DecodeShape {
            batch: 3,
            q_heads: 8,
            kv_heads: 2,
            head_dim: 64,
            block_tokens: 16,
            max_blocks: 6,
            num_blocks: 20,
        };
        let op = PagedDecodeOp {
            block_table: idx(3, 6),
            seq_lens: Tensor::new(&[0u32, 37, 96], &Device::Cpu).unwrap(),
            plan: launch::DecodePlan::new(shape, 32).unwrap(),
        };
        let cache: &[usize] = &[20, 16, 2, 64];
        let p = plan_of(&op, &[&[3, 8, 64], cache, cache], BOTH);
        assert_eq!(p.launches.len(), 2);
        assert_eq!(
            p.launches[1].args[0],
            Arg::Read(0),
            "combine reads the parts"
        );
        assert_eq!(p.output, 1);

        let shape = launch::FlashShape {
            batch: 2,
            q_heads: 6,
            kv_heads: 2,
            t: 37,
            s: 70,
            head_dim: 40,
        };
        let fwd = FlashAttnOp {
            q_pos: idx(2, 37),
            k_pos: idx(2, 70),
            plan: launch::FlashPlan::new(shape).unwrap(),
        };
        let (q, kv): (&[usize], &[usize]) = (&[2, 6, 37, 40], &[2, 2, 70, 40]);
        let p = plan_of(&fwd, &[q, kv, kv], BOTH);
        assert_eq!(
            p.buffers[0].elem,
            Elem::F32,
            "output and log-sum-exp in f32"
        );
        assert_eq!(p.launches[0].args[11], Arg::F32(1.0 / 40f32.sqrt()));
        // Inputs of another shape than planned are refused.
        let l = [Layout::contiguous(q), Layout::contiguous((2, 2, 71, 40))];
        assert!(fwd.plan(&[&l[0], &l[1], &l[1]]).is_err());
        let f32s = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let bwd = FlashAttnBwdOp {
            fwd,
            dout: f32s(&[2, 6, 37, 40]),
            stats: f32s(&[2, 6, 37, 2]),
        };
        let p = plan_of(&bwd, &[q, kv, kv], BOTH);
        let (nq, nkv) = (2 * 6 * 37 * 40, 2 * 2 * 70 * 40);
        assert_eq!(p.launches[0].args[7], Arg::Write(0, 0..nq), "dq");
        assert_eq!(
            p.launches[1].args[7],
            Arg::Write(0, nq..nq + 2 * nkv),
            "dk then dv"
        );

        let targets = idx(1, 300).flatten_all().unwrap();
        let stats = CeStatsOp {
            targets: targets.clone(),
            col0: 64,
        };
        let p = plan_of(&stats, &[&[300, 96]], BOTH);
        assert_eq!(
            p.launches[0].args[3..],
            [Arg::U32(300), Arg::U32(96), Arg::U32(64)]
        );
        let grad = CeGradOp {
            targets,
            lse: f32s(&[300]),
            gscale: f32s(&[1]),
            col0: 64,
        };
        let p = plan_of(&grad, &[&[300, 96]], BOTH);
        assert_eq!(
            p.buffers[0].elem,
            Elem::T,
            "the logits gradient feeds the products"
        );
        let h = AdamwHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 1e-4,
            bc1: 0.1,
            bc2: 0.05,
        };
        let op = AdamwOp {
            g: f32s(&[1000]),
            h,
        };
        let p = plan_of(&op, &[&[1000], &[1000], &[1000]], &[DType::F32]);
        assert_eq!(p.launches[0].args[1], Arg::Aux(0), "the gradient");
        assert_eq!(p.launches[0].args[5], Arg::U64(1000));
        assert_eq!(p.launches[0].args[14], Arg::F64(1.0 - 1e-4), "1 - decay");
        // A gradient of another dtype than the parameter is refused by the plan.
        assert!(p.validate(DType::BF16).is_err());
    }

    #[test]
    fn flash_attention_plans_allocate_memory_linear_in_the_sequence_length() {
        // Every device buffer of the forward and backward plans, in bytes, plus the
        // auxiliary tensors the backward reads (output gradient, statistics, positions).
        let bytes = |l: usize| -> usize {
            let shape = launch::FlashShape {
                batch: 2,
                q_heads: 8,
                kv_heads: 2,
                t: l,
                s: l,
                head_dim: 64,
            };
            let fwd = FlashAttnOp {
                q_pos: idx(2, l),
                k_pos: idx(2, l),
                plan: launch::FlashPlan::new(shape).unwrap(),
            };
            let zeros = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
            let bwd = FlashAttnBwdOp {
                fwd: fwd.clone(),
                dout: zeros(&[2, 8, l, 64]),
                stats: zeros(&[2, 8, l, 2]),
            };
            let (q, kv) = (
                Layout::contiguous((2, 8, l, 64)),
                Layout::contiguous((2, 2, l, 64)),
            );
            let plans = [
                fwd.plan(&[&q, &kv, &kv]).unwrap(),
                bwd.plan(&[&q, &kv, &kv]).unwrap(),
            ];
            plans
                .iter()
                .map(|p| {
                    let bufs: usize = p.buffers.iter().map(|b| b.len * 4).sum();
                    let aux: usize = p.aux.iter().map(|t| t.elem_count() * 4).sum();
                    bufs + aux
                })
                .sum()
        };
        assert_eq!(bytes(2048), 2 * bytes(1024));
        assert_eq!(bytes(4096), 2 * bytes(2048));
    }

    #[test]
    fn a_wrong_number_of_inputs_is_an_error() {
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let err = x
            .apply_op2_no_bwd(&x, &Op(SwigluBwdOp))
            .unwrap_err()
            .to_string();
        assert!(err.contains("takes 3 inputs, not 2"), "{err}");
    }
}
