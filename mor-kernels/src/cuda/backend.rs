//! The `cuda` backend: the [`Backend`] ops on the fused CUDA kernels, registered by name
//! `cuda`. In a build without the `cuda` feature the name is still registered, and
//! building it fails with [`Error::NotCompiledWithCuda`].

use super::module::KernelDType;
use super::{imp, mixed, ops, plain};
use crate::{Backend, BackendCtx, BackendPlugin, CudaCause, Error, Result};
use candle_core::{DType, Device, Tensor};
use mor_core::config::Precision;
use mor_core::registry::{Family, Plugin};
use serde::{Deserialize, Serialize};

/// Parameters of the `cuda` backend (`backend = { kind = "cuda", ordinal = 0 }`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaParams {
    /// CUDA device ordinal. Unset: the run's device when it is a CUDA device, else 0.
    pub ordinal: Option<usize>,
}

/// The fused-kernel backend. Its ops are the custom ops of this module: the kernels run on
/// CUDA tensors, their CPU bodies on CPU tensors. On CUDA, dtypes the kernels do not cover
/// (f64) fall back to the same maths in plain candle ops. Attention by positions runs the
/// flash-attention kernels (head dimensions up to
/// [`FLASH_MAX_HEAD_DIM`](super::launch::FLASH_MAX_HEAD_DIM); plain candle ops past it);
/// the LM head's cross-entropy runs in vocabulary chunks
/// ([`linear_cross_entropy`](super::linear_cross_entropy)).
///
/// # Precision
/// With [`Precision::Bf16`] (`train.precision = "bf16"`,
/// [`with_precision`](CudaBackend::with_precision)) the products of f32 inputs run in bf16
/// mixed precision, as the `cpu` backend's do: [`linear`](Backend::linear) (so the
/// projections of [`attention_block`](Backend::attention_block) and
/// [`mlp_block`](Backend::mlp_block)) is [`bf16_matmul`](super::bf16_matmul) (cuBLAS on bf16
/// operands with f32 sums, the result rounded once to bf16 and widened to f32);
/// [`attention`](Backend::attention) runs the flash-attention kernels on `q, k, v` rounded
/// to bf16 (scores, softmax statistics and the weighted sum of values in f32) and returns
/// f32; [`linear_cross_entropy`](Backend::linear_cross_entropy) takes bf16 chunk products
/// ([`linear_cross_entropy_with`](super::linear_cross_entropy_with)) and f32 statistics and
/// loss. RMSNorm, RoPE, SwiGLU, the token gather and scatter-add, residuals, and every
/// tensor the model holds (weights, gradients, optimiser moments) stay f32. f64 tensors are
/// never rounded, so finite-difference checks see exact f64 ops.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    device: Device,
    precision: Precision,
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`.
    ///
    /// # Errors
    /// [`Error::NotCompiledWithCuda`] without the `cuda` feature; [`Error::CudaFailure`]
    /// naming the cause and the fix when no driver or device is found (never a panic).
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(CudaBackend {
            device: imp::open_device(ordinal)?,
            precision: Precision::F32,
        })
    }

    /// Uses an already opened CUDA device.
    ///
    /// # Errors
    /// [`Error::NotCompiledWithCuda`] without the `cuda` feature; [`Error::Invalid`] when
    /// `device` is not a CUDA device.
    pub fn on_device(device: Device) -> Result<Self> {
        if !device.is_cuda() {
            imp::open_device(0)?; // NotCompiledWithCuda in builds without the feature
            return Err(Error::Invalid {
                op: "cuda backend",
                msg: format!("{device:?} is not a CUDA device"),
            });
        }
        Ok(CudaBackend {
            device,
            precision: Precision::F32,
        })
    }

    /// The same backend on the CPU: every op runs the CPU body of its kernel (the maths of
    /// [`super::host`]). For tests and for checking a model's use of the fused ops on a
    /// machine without a GPU; it is not registered.
    pub fn host_emulation() -> Self {
        CudaBackend {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }

    /// The same backend with its products in `precision` (see [Precision](#precision)).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The precision of the backend's products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether a product of `t` runs in bf16 mixed precision: bf16 mode and an f32 input.
    fn mixed(&self, t: &Tensor) -> bool {
        self.precision == Precision::Bf16 && t.dtype() == DType::F32
    }

    /// Whether the fused op can take `t`: any dtype on CPU, f32 and bf16 on CUDA.
    fn fused(t: &Tensor) -> bool {
        !t.device().is_cuda() || KernelDType::of(t.dtype()).is_some()
    }
}

impl Plugin for CudaBackend {
    const FAMILY: Family = Family::Backend;
    const NAME: &'static str = "cuda";
    const DESCRIPTION: &'static str =
        "fused CUDA kernels (PTX built by nvcc or compiled by NVRTC); needs `--features cuda` and an NVIDIA GPU";
    type Params = CudaParams;
}

impl BackendPlugin for CudaBackend {
    fn build(params: CudaParams, ctx: &BackendCtx) -> Result<Self> {
        // The missing feature is the first thing to fix, whatever else the config asks.
        if !super::COMPILED {
            return Err(Error::NotCompiledWithCuda);
        }
        let be = match params.ordinal {
            None if ctx.device.is_cuda() => CudaBackend::on_device(ctx.device.clone()),
            ordinal => CudaBackend::new(ordinal.unwrap_or(0)),
        }?;
        Ok(be.with_precision(ctx.precision))
    }
}

crate::register_backend!(CudaBackend);

/// The error of a CUDA device that could not be opened: the cause named by the driver's
/// message (no device when it names none), with the fix.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn device_open_error(ordinal: usize, driver_message: &str) -> Error {
    let cause = CudaCause::find(driver_message).unwrap_or(CudaCause::NoDevice);
    Error::cuda_failure(
        cause,
        format!("cannot open CUDA device {ordinal}: {driver_message}"),
        None,
    )
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if Self::fused(x) {
            ops::rms_norm(x, w, eps)
        } else {
            plain::rms_norm(x, w, eps)
        }
    }

    fn rope(&self, x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if Self::fused(x) {
            ops::rope_at(x, pos, cos, sin)
        } else {
            plain::rope_at(x, pos, cos, sin)
        }
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &Tensor,
        k_pos: &Tensor,
    ) -> Result<Tensor> {
        let (b, hq, t, dh) = q.dims4()?;
        let (bk, hkv, s, dk) = k.dims4()?;
        if hkv == 0 || hq % hkv != 0 || bk != b || dk != dh || v.dims() != k.dims() {
            return Err(Error::Invalid {
                op: "attention",
                msg: format!(
                    "q {:?}, k {:?}, v {:?}: need equal batch and head dim, and hq % hkv == 0",
                    q.dims(),
                    k.dims(),
                    v.dims()
                ),
            });
        }
        if q_pos.dims() != [b, t] || k_pos.dims() != [b, s] {
            return Err(Error::Invalid {
                op: "attention",
                msg: format!(
                    "q_pos {:?} / k_pos {:?} must be [{b}, {t}] / [{b}, {s}]",
                    q_pos.dims(),
                    k_pos.dims()
                ),
            });
        }
        if t == 0 || s == 0 {
            // Nothing to attend to (or no query): zeros of the output shape.
            return Ok(Tensor::zeros((b, hq, t, dh), q.dtype(), q.device())?);
        }
        let flash = Self::fused(q) && dh <= super::launch::FLASH_MAX_HEAD_DIM;
        match (flash, self.mixed(q) && self.mixed(k) && self.mixed(v)) {
            // bf16 loads, f32 arithmetic and an f32 result.
            (true, true) => {
                let r = |t: &Tensor| t.to_dtype(DType::BF16);
                ops::flash_attention_acc(&r(q)?, &r(k)?, &r(v)?, q_pos, k_pos)
            }
            (true, false) => ops::flash_attention(q, k, v, q_pos, k_pos),
            // The same values as the kernels' bf16 path: f32 arithmetic on rounded inputs.
            (false, true) => plain::attention(
                &mixed::round_trip_bf16(q)?,
                &mixed::round_trip_bf16(k)?,
                &mixed::round_trip_bf16(v)?,
                q_pos,
                k_pos,
            ),
            (false, false) => plain::attention(q, k, v, q_pos, k_pos),
        }
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let d = crate::validate::linear(x, w)?;
        let mut out = x.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = d.out;
        }
        let x2 = x.reshape((d.rows, d.inp))?;
        let y = if self.mixed(x) && self.mixed(w) {
            mixed::bf16_matmul(&x2, &w.t()?)?
        } else {
            x2.matmul(&w.t()?)?
        };
        Ok(y.reshape(out)?)
    }

    fn linear_cross_entropy(&self, x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if Self::fused(x) {
            // Vocabulary chunks: the [rows, vocab] logits are never materialised.
            ops::linear_cross_entropy_with(x, w, targets, None, self.precision)
        } else {
            let d = crate::validate::linear_cross_entropy(x, w, targets)?;
            let logits = self.linear(x, w)?.reshape((d.rows, d.out))?;
            Ok(crate::loss::cross_entropy(
                &logits,
                &targets.flatten_all()?,
            )?)
        }
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if Self::fused(gate) {
            ops::swiglu(gate, up)
        } else {
            plain::swiglu(gate, up)
        }
    }

    fn gather_tokens(&self, h: &Tensor, idx: &Tensor) -> Result<Tensor> {
        if Self::fused(h) {
            ops::gather_rows(h, idx)
        } else {
            plain::gather_rows(h, idx)
        }
    }

    fn scatter_add_tokens(
        &self,
        h: &Tensor,
        idx: &Tensor,
        y: &Tensor,
        w: Option<&Tensor>,
    ) -> Result<Tensor> {
        if Self::fused(h) {
            ops::scatter_add_rows(h, idx, y, w)
        } else {
            plain::scatter_add_rows(h, idx, y, w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_cannot_be_opened_is_one_error_with_the_fix() {
        let e = device_open_error(
            1,
            "DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")",
        );
        assert_eq!(e.cuda_cause(), Some(CudaCause::NoDevice));
        let msg = e.to_string();
        assert!(msg.contains("cannot open CUDA device 1"), "{msg}");
        assert!(
            msg.contains("nvidia-smi") && msg.contains("backend.kind = \"cpu\""),
            "{msg}"
        );
        let e = device_open_error(0, "DriverError(CUDA_ERROR_INSUFFICIENT_DRIVER, \"x\")");
        assert_eq!(e.cuda_cause(), Some(CudaCause::DriverTooOld));
        // A message that names no code is read as a missing device.
        let e = device_open_error(0, "something else");
        assert_eq!(e.cuda_cause(), Some(CudaCause::NoDevice));
        let e = device_open_error(0, "the CUDA driver library (libcuda) could not be loaded");
        assert_eq!(e.cuda_cause(), Some(CudaCause::DriverMissing));
    }
}
