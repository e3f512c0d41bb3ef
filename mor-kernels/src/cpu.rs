//! `cpu` backend: fused CPU ops with analytic backward.
//!
//! Each op of [`Backend`] is one candle custom op whose forward runs directly on the storage
//! slices (f32 and f64, rayon over rows or heads when the work pays for it on two cores) and
//! whose `bwd` runs a fused backward kernel, so that a training step allocates one output per
//! gradient instead of a chain of temporaries. Hot loops are compiled for AVX2+FMA and
//! chosen at run time, with a baseline fallback.
//!
//! - RMSNorm: [`CustomOp2`](candle_core::CustomOp2) on `(x, w)`, gradients for both.
//! - RoPE: [`CustomOp3`](candle_core::CustomOp3) on `(x, cos, sin)` with the positions held
//!   on the host; the gradient of `x` is the inverse rotation, the tables get a gradient only
//!   when they are tracked.
//! - Attention: [`CustomOp3`](candle_core::CustomOp3) on `(q, k, v)`, flash-style (scores for
//!   one block of query rows in flight, block products on `gemm`, the log-sum-exp saved
//!   for the backward pass, which recomputes probabilities).
//! - SwiGLU: [`CustomOp2`](candle_core::CustomOp2) on `(gate, up)`.
//! - Token gather and weighted scatter-add: custom ops with the indices on the host.
//!
//! For decoding, [`PackedMatrix`] holds a weight packed once for products with a few rows,
//! and [`rms_norm_rows`] / [`swiglu_rows`] run the same row kernels on host slices (no
//! graph).
//!
//! Inputs are made contiguous before an op runs (a no-op for contiguous tensors, and
//! differentiable), and every kernel re-checks the layout it receives, so a strided input can
//! never be read wrongly. The conventions on padding, empty selections and table dtypes are
//! those of the [`reference`](crate::reference) backend. The backend only runs on
//! [`Device::Cpu`].

use crate::validate;
use crate::{Backend, BackendCtx, BackendPlugin, Error, Result};
use candle_core::{CpuStorage, Device, Layout, Storage, Tensor};
use mor_core::config::Precision;
use mor_core::registry::{Family, Plugin};
use serde::{Deserialize, Serialize};

mod attention;
mod block;
mod dense;
mod gemm;
mod host;
pub mod isa;
mod norm;
mod packed;
mod rope;
mod simd;
mod swiglu;
mod tokens;

pub use gemm::{bf16_bits, bf16_value, matmul_with, round_bf16, Kernel};
pub use host::{rms_norm_rows, swiglu_rows};
pub use packed::{PackedMatrix, PANEL};

/// Work (in elements, or multiply-adds for attention) below which an op runs on the calling
/// thread: below it, handing tasks to rayon costs more than it saves on two cores.
pub(crate) const PAR_MIN_WORK: usize = 1 << 15;

/// Elements per rayon task of the element-wise and row-wise ops.
pub(crate) const PAR_TASK_WORK: usize = 1 << 14;

/// Rows per rayon task for rows of `row_len` elements: about [`PAR_TASK_WORK`] elements, at
/// least one row.
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    (PAR_TASK_WORK / row_len.max(1)).clamp(1, rows.max(1))
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint range.
#[derive(Clone, Copy)]
struct SharedPtr<T>(*mut T);
// SAFETY: used by `rows_new` and the row-split products, whose tasks write disjoint ranges
// of one allocation.
unsafe impl<T: Send> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// A new row-major buffer of `rows × row_len` elements, produced block by block (in parallel
/// when the work pays): each task zeroes its own block, while it is about to be written and
/// so in cache, then runs `f(first_row, block)`; the per-block results come back in order.
///
/// Replaces `vec![0; n]` followed by a parallel fill, whose zeroing is a serial pass over
/// memory on the calling thread.
pub(crate) fn rows_new<T: simd::Float, R: Send>(
    rows: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    // A tensor this large could not exist; the check keeps the block writes below inside
    // the allocation even so.
    let n = rows
        .checked_mul(row_len)
        .expect("rows_new: buffer size overflows usize");
    let mut v: Vec<T> = Vec::with_capacity(n);
    if n == 0 {
        return (v, Vec::new());
    }
    let per = rows_per_task(rows, row_len);
    let base = SharedPtr(v.as_mut_ptr());
    let run = |blk: usize| {
        let r0 = blk * per;
        let len = per.min(rows - r0) * row_len;
        // SAFETY: blocks are disjoint and lie inside the allocation of `n` elements; the
        // block is fully zeroed (a valid f32/f64 bit pattern) before a reference to it is
        // made.
        let block = unsafe {
            let p = base.get().add(r0 * row_len);
            std::ptr::write_bytes(p, 0, len);
            std::slice::from_raw_parts_mut(p, len)
        };
        f(r0, block)
    };
    let blocks = rows.div_ceil(per);
    let out = if n < PAR_MIN_WORK {
        (0..blocks).map(run).collect()
    } else {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().map(run).collect()
    };
    // SAFETY: every block, hence every element, was initialised above.
    unsafe { v.set_len(n) };
    (v, out)
}

/// The elements of a forward input, checked to be contiguous, of dtype `T` and of shape
/// `dims`.
pub(crate) fn fwd_slice<'a, T: simd::Float>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
    dims: &[usize],
) -> candle_core::Result<&'a [T]> {
    if l.dims() != dims {
        candle_core::bail!("{op}: input has shape {:?}, expected {dims:?}", l.dims());
    }
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input is not contiguous");
    };
    match T::slice(s) {
        Some(v) => v
            .get(a..b)
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: layout out of storage bounds"))),
        None => Err(bail_dtype(op, s)),
    }
}

/// The error for an input dtype the kernels do not handle (or mixed dtypes).
pub(crate) fn bail_dtype(op: &str, s: &CpuStorage) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: expected f32 or f64 inputs of one dtype, got {:?}",
        candle_core::backend::BackendStorage::dtype(s)
    ))
}

/// Runs `f` on the contiguous elements of CPU tensors of dtype `T` (non-contiguous tensors are
/// copied first). Used by the backward passes, which receive tensors rather than storages.
pub(crate) fn with_slices<T: simd::Float, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (g, l) in &guards {
        let Storage::Cpu(cs) = &**g else {
            candle_core::bail!("the cpu backend needs tensors on the CPU device");
        };
        slices.push(fwd_slice::<T>("backward", cs, l, l.dims())?);
    }
    f(&slices)
}

simd::multiversion! {
    fn exp_shift_row => exp_shift_row_impl(row: &mut [T]) -> (T, T)
}

#[inline(always)]
fn exp_shift_row_impl<T: simd::Float, const FMA: bool>(row: &mut [T]) -> (T, T) {
    let m = simd::max(row);
    let s = simd::exp_shift_sum::<T, FMA>(row, m);
    (m, s)
}

/// Softmax numerator of one row, vectorised for fused losses: replaces `row` by
/// `exp(row − max)` and returns `(max, Σ exp(row − max))`, so that the log-sum-exp is
/// `max + ln(sum)` and the softmax is `row / sum`.
///
/// Uses AVX2+FMA when the CPU has them (`exp` within 2 ulp of `f32::exp`). A NaN in the row
/// gives a NaN max and sum; an empty row gives `(-inf, 0)`.
///
/// # Examples
///
/// ```
/// let mut row = [0.0f32, 2f32.ln()];
/// let (m, s) = mor_kernels::cpu::exp_shift_row_f32(&mut row);
/// assert!((m - 2f32.ln()).abs() < 1e-7 && (s - 1.5).abs() < 1e-6);
/// assert!((row[0] - 0.5).abs() < 1e-7 && (row[1] - 1.0).abs() < 1e-7);
/// ```
pub fn exp_shift_row_f32(row: &mut [f32]) -> (f32, f32) {
    exp_shift_row(row)
}

/// The `cpu` backend: fused CPU custom ops with analytic backward.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    device: Device,
    /// Precision of the products; everything else computes in the tensors' dtype.
    prec: gemm::Prec,
}

/// Parameters of the `cpu` backend: there are none, and any field is rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuParams {}

impl CpuBackend {
    /// The cpu backend (on [`Device::Cpu`]).
    pub fn new() -> Self {
        CpuBackend {
            device: Device::Cpu,
            prec: gemm::Prec::F32,
        }
    }

    /// The cpu backend with its products in `precision`: with [`Precision::Bf16`], every
    /// product of an f32 op (linear forward and backward, the attention scores and values,
    /// the layer halves' projections, the LM head) rounds its inputs to bf16 and
    /// accumulates in f32 (`VDPBF16PS` on CPUs with AVX512_BF16, a portable emulation with
    /// a one-line notice elsewhere). Norms, softmax, RoPE, residuals, routing and the loss
    /// stay in f32, and so do the weights and every tensor, so checkpoints are the same in
    /// both precisions.
    pub fn with_precision(precision: Precision) -> Self {
        CpuBackend {
            device: Device::Cpu,
            prec: match precision {
                Precision::F32 => gemm::Prec::F32,
                Precision::Bf16 => gemm::Prec::Bf16,
            },
        }
    }

    /// The precision of the backend's products.
    pub fn precision(&self) -> Precision {
        match self.prec {
            gemm::Prec::F32 => Precision::F32,
            gemm::Prec::Bf16 => Precision::Bf16,
        }
    }

    /// Whether the fused kernels run their AVX2+FMA versions on this machine.
    pub fn uses_avx2_fma() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            simd::has_avx2_fma()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    fn on_cpu(op: &'static str, ts: &[&Tensor]) -> Result<()> {
        if ts.iter().all(|t| t.device().is_cpu()) {
            Ok(())
        } else {
            Err(Error::Invalid {
                op,
                msg: "the cpu backend needs tensors on the CPU device".into(),
            })
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Plugin for CpuBackend {
    const FAMILY: Family = Family::Backend;
    const NAME: &'static str = "cpu";
    const DESCRIPTION: &'static str = "Fused CPU ops (RMSNorm, RoPE, flash-style attention, SwiGLU, routing) with analytic backward";
    type Params = CpuParams;
}

impl BackendPlugin for CpuBackend {
    fn build(_params: CpuParams, ctx: &BackendCtx) -> Result<Self> {
        if !ctx.device.is_cpu() {
            return Err(Error::Invalid {
                op: "build",
                msg: format!(
                    "the `cpu` backend runs on the CPU only, but the run asks for {:?}",
                    ctx.device
                ),
            });
        }
        Ok(CpuBackend::with_precision(ctx.precision))
    }
}

crate::register_backend!(CpuBackend);

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let d = validate::rms_norm(x, w, eps)?;
        Self::on_cpu("rms_norm", &[x, w])?;
        let op = norm::RmsNormOp {
            eps,
            rows: d.rows,
            d: d.d,
        };
        Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
    }

    fn rope(&self, x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = validate::rope(x, pos, cos, sin)?;
        Self::on_cpu("rope", &[x, cos, sin])?;
        let cos = cos.to_dtype(x.dtype())?.contiguous()?;
        let sin = sin.to_dtype(x.dtype())?.contiguous()?;
        let op = rope::RopeOp {
            b: d.b,
            h: d.h,
            t: d.t,
            dh: d.dh,
            max_pos: d.max_pos,
            pos: d.pos,
            split: false,
        };
        Ok(x.contiguous()?.apply_op3(&cos, &sin, op)?)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &Tensor,
        k_pos: &Tensor,
    ) -> Result<Tensor> {
        let d = validate::attention(q, k, v, q_pos, k_pos)?;
        Self::on_cpu("attention", &[q, k, v])?;
        let op = attention::AttentionOp::new(&d).with_prec(self.prec);
        Ok(q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        validate::swiglu(gate, up)?;
        Self::on_cpu("swiglu", &[gate, up])?;
        Ok(gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, swiglu::SwiGluOp)?)
    }

    fn gather_tokens(&self, h: &Tensor, idx: &Tensor) -> Result<Tensor> {
        let d = validate::gather_tokens(h, idx)?;
        Self::on_cpu("gather_tokens", &[h])?;
        let op = tokens::GatherOp {
            b: d.b,
            l: d.l,
            d: d.d,
            k: d.k,
            idx: d.idx,
        };
        Ok(h.contiguous()?.apply_op1(op)?)
    }

    fn scatter_add_tokens(
        &self,
        h: &Tensor,
        idx: &Tensor,
        y: &Tensor,
        w: Option<&Tensor>,
    ) -> Result<Tensor> {
        let d = validate::scatter_add_tokens(h, idx, y, w)?;
        Self::on_cpu("scatter_add_tokens", &[h, y])?;
        if d.k == 0 {
            return Ok(h.clone());
        }
        let op = tokens::ScatterAddOp {
            b: d.b,
            l: d.l,
            d: d.d,
            k: d.k,
            idx: d.idx,
        };
        let (h, y) = (h.contiguous()?, y.contiguous()?);
        Ok(match w {
            Some(w) => h.apply_op3(&y, &w.contiguous()?, op)?,
            None => h.apply_op2(&y, op)?,
        })
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let d = validate::linear(x, w)?;
        Self::on_cpu("linear", &[x, w])?;
        let mut out_shape = x.dims().to_vec();
        if let Some(last) = out_shape.last_mut() {
            *last = d.out;
        }
        let op = dense::LinearOp {
            d,
            out_shape,
            prec: self.prec,
        };
        Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
    }

    fn attention_block(
        &self,
        h: &Tensor,
        w: &crate::AttentionWeights<'_>,
        pos: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let dims = validate::attention_block(h, w, pos, cos, sin)?;
        Self::on_cpu(
            "attention_block",
            &[h, w.norm, w.q, w.k, w.v, w.o, cos, sin],
        )?;
        if cos.track_op() || sin.track_op() {
            // The fused op holds the tables as constants; trainable tables take the
            // composed path, whose RoPE op returns their gradients.
            return crate::attention_block_composed(self, h, w, pos, cos, sin);
        }
        // One stacked weight input (custom ops take three tensors); `cat` hands each weight
        // its slice of the stacked gradient.
        let pack = Tensor::cat(&[&w.norm.reshape((1, dims.d))?, w.q, w.k, w.v], 0)?;
        let wo = w.o.contiguous()?;
        let keep = h.track_op() || pack.track_op() || wo.track_op();
        let cos = cos.to_dtype(h.dtype())?.contiguous()?;
        let sin = sin.to_dtype(h.dtype())?.contiguous()?;
        let op = block::AttnBlockOp::new(dims, w.eps, cos, sin, keep).with_prec(self.prec);
        Ok(h.contiguous()?.apply_op3(&pack.contiguous()?, &wo, op)?)
    }

    fn linear_cross_entropy(&self, x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let d = validate::linear_cross_entropy(x, w, targets)?;
        Self::on_cpu("linear_cross_entropy", &[x, w, targets])?;
        let keep = x.track_op() || w.track_op();
        let x = x.reshape((d.rows, d.inp))?.contiguous()?;
        let op = dense::LinearCeOp::new(d, keep).with_prec(self.prec);
        Ok(x.apply_op3(&w.contiguous()?, &targets.flatten_all()?.contiguous()?, op)?)
    }

    fn mlp_block(
        &self,
        h: &Tensor,
        norm_w: &Tensor,
        eps: f64,
        gate: &Tensor,
        up: &Tensor,
        down: &Tensor,
    ) -> Result<Tensor> {
        let dims = validate::mlp_block(h, norm_w, eps, gate, up, down)?;
        Self::on_cpu("mlp_block", &[h, norm_w, gate, up, down])?;
        // One stacked weight input (custom ops take three tensors); `cat` hands each weight
        // its slice of the stacked gradient.
        let pack = Tensor::cat(&[&norm_w.reshape((1, dims.d))?, gate, up], 0)?;
        let down = down.contiguous()?;
        let keep = h.track_op() || pack.track_op() || down.track_op();
        let op = block::MlpOp::new(dims, eps, h.dims().to_vec(), keep).with_prec(self.prec);
        Ok(h.contiguous()?.apply_op3(&pack.contiguous()?, &down, op)?)
    }

    fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let d = validate::split_heads("split_heads", x, heads)?;
        Self::on_cpu("split_heads", &[x])?;
        Ok(x.contiguous()?
            .apply_op1(dense::HeadsOp { d, merge: false })?)
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let d = validate::merge_heads(x)?;
        Self::on_cpu("merge_heads", &[x])?;
        Ok(x.contiguous()?
            .apply_op1(dense::HeadsOp { d, merge: true })?)
    }

    fn rope_heads(
        &self,
        x: &Tensor,
        heads: usize,
        pos: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let hd = validate::split_heads("rope_heads", x, heads)?;
        // Checks positions and tables against the head-major view (no copy).
        let view = x.reshape((hd.b, hd.t, hd.h, hd.dh))?.transpose(1, 2)?;
        let d = validate::rope(&view, pos, cos, sin)?;
        Self::on_cpu("rope_heads", &[x, cos, sin])?;
        let cos = cos.to_dtype(x.dtype())?.contiguous()?;
        let sin = sin.to_dtype(x.dtype())?.contiguous()?;
        let op = rope::RopeOp {
            b: d.b,
            h: d.h,
            t: d.t,
            dh: d.dh,
            max_pos: d.max_pos,
            pos: d.pos,
            split: true,
        };
        Ok(x.contiguous()?.apply_op3(&cos, &sin, op)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ReferenceBackend;
    use crate::testing::{closeness, randn, F32_ATOL, F32_RTOL};
    use crate::PAD_POS;
    use candle_core::{DType, Var};

    /// Output and input gradients of `f` under a fixed random weighting of the output.
    fn run(f: &dyn Fn(&[&Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Vec<Tensor> {
        let vs: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
        let out = f(&ts).unwrap();
        let r = randn(77, out.shape(), out.dtype(), &Device::Cpu).unwrap();
        let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut all = vec![out];
        all.extend(vs.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
        all
    }

    /// The baseline (non-AVX2) kernels, which the AVX2 machines of the integration tests never
    /// run, against the reference backend.
    #[test]
    fn baseline_kernels_match_reference() {
        simd::FORCE_BASELINE.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!simd::has_avx2_fma());
        let (cpu, rf) = (CpuBackend::new(), ReferenceBackend::new(Device::Cpu));
        let dev = Device::Cpu;
        let f32s = |seed, shape: &[usize]| randn(seed, shape.to_vec(), DType::F32, &dev).unwrap();
        let q_pos = Tensor::new(&[[0u32, 2, 3, 7, 8, PAD_POS, 11, 12, 20]], &dev).unwrap();
        let k_pos = Tensor::new(&[[0u32, 2, PAD_POS, 7, 8, PAD_POS, 11, 12, 20]], &dev).unwrap();
        let (cos, sin) = crate::rope_tables(32, 20, 1e4, &dev).unwrap();
        let idx = Tensor::new(&[[1u32, 4, 6]], &dev).unwrap();
        type Case<'a> = (
            &'a str,
            Box<dyn Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> + 'a>,
            Vec<Tensor>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "attention",
                Box::new(|b, t| b.attention(t[0], t[1], t[2], &q_pos, &k_pos)),
                vec![
                    f32s(1, &[1, 4, 9, 20]),
                    f32s(2, &[1, 2, 9, 20]),
                    f32s(3, &[1, 2, 9, 20]),
                ],
            ),
            (
                "rms_norm",
                Box::new(|b, t| b.rms_norm(t[0], t[1], 1e-5)),
                vec![f32s(4, &[5, 37]), f32s(5, &[37])],
            ),
            (
                "rope",
                Box::new(|b, t| b.rope(t[0], &q_pos, &cos, &sin)),
                vec![f32s(6, &[1, 3, 9, 20])],
            ),
            (
                "swiglu",
                Box::new(|b, t| b.swiglu(t[0], t[1])),
                vec![f32s(7, &[3, 29]), f32s(8, &[3, 29])],
            ),
            (
                "scatter_add_tokens",
                Box::new(|b, t| b.scatter_add_tokens(t[0], &idx, t[1], Some(t[2]))),
                vec![
                    f32s(9, &[1, 7, 19]),
                    f32s(10, &[1, 3, 19]),
                    f32s(11, &[1, 3]),
                ],
            ),
        ];
        for (name, f, inputs) in &cases {
            let got = run(&|t| f(&cpu, t), inputs);
            let want = run(&|t| f(&rf, t), inputs);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let c = closeness(g, w, F32_RTOL, F32_ATOL).unwrap();
                assert!(
                    c.ratio <= 1.0,
                    "{name}, tensor {i} (0 = output, then input gradients): {c:?}"
                );
            }
        }
        simd::FORCE_BASELINE.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}
