//! bf16 mixed precision of the `cuda` backend (`train.precision = "bf16"`): products with
//! bf16 inputs and f32 accumulation, everything else in f32.
//!
//! On CUDA a product is a candle matmul of bf16 tensors: cuBLAS
//! (`cublasGemmStridedBatchedEx`, `CUBLAS_COMPUTE_32F`) multiplies the bf16 values exactly,
//! sums in f32 and rounds the result once to bf16, which is then widened to f32. On CPU
//! tensors (the backend's host emulation) [`bf16_matmul`] computes the same values: the
//! bf16-rounded inputs widened to f32, an f32 matmul, the result rounded once to bf16. Up to
//! the order of the f32 sums, both are the same function, and so are their gradients:
//! candle differentiates the dtype conversions by converting the gradient back, so the
//! output gradient is rounded to bf16, multiplied by the bf16 operands with f32 sums, and
//! the input gradients are rounded to bf16 and widened to f32 for the f32 tensors they
//! belong to (the f32 master weights and their optimiser state never change dtype).

use crate::Result;
use candle_core::{DType, Tensor};

/// `a · b` (candle's `matmul`, batched as it is) of two bf16 tensors, as a bf16 tensor:
/// cuBLAS in bf16 on CUDA; on other devices the exact products of the bf16 values summed
/// in f32 and rounded once to bf16, as cuBLAS does. Differentiable.
pub(crate) fn matmul_bf16(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    debug_assert!(a.dtype() == DType::BF16 && b.dtype() == DType::BF16);
    if a.device().is_cuda() {
        Ok(a.matmul(b)?)
    } else {
        // candle's CPU matmul has no bf16 kernel: widen (exact), multiply in f32, round.
        Ok(a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)?)
    }
}

/// The product `a · b` in bf16 mixed precision, as the `cuda` backend computes its products
/// with `train.precision = "bf16"`: both inputs rounded to bf16 (round to nearest even),
/// multiplied exactly and summed in f32 (cuBLAS on CUDA, the same arithmetic on the host
/// for CPU tensors), the result rounded once to bf16 and returned in f32. Batched and
/// shaped as candle's `matmul`; differentiable, with gradients rounded the same way and
/// returned in the inputs' dtypes.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// // 1 + 2^-10 is 1 in bf16, and 1 + 2^-9 rounds to 1 as well.
/// let e = 1.0f32 + 2f32.powi(-10);
/// let a = Tensor::new(&[[e, 3.0]], &Device::Cpu)?;
/// let b = Tensor::new(&[[e], [0.5]], &Device::Cpu)?;
/// let y = mor_kernels::cuda::bf16_matmul(&a, &b)?.to_vec2::<f32>()?;
/// assert_eq!(y, [[2.5]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// Shapes candle's `matmul` refuses; tensors on different devices.
pub fn bf16_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a16, b16) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
    Ok(matmul_bf16(&a16, &b16)?.to_dtype(DType::F32)?)
}

/// `t` rounded to bf16 and widened back to f32 (differentiable: the gradient is rounded
/// the same way).
pub(crate) fn round_trip_bf16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}
