//! The `cuda` backend: fused CUDA kernels for the hot path of a recursion step, as candle
//! custom ops with analytic backward passes.
//!
//! The kernels (`mor-kernels/kernels/*.cu`, f32 and bf16) cover:
//! - the expert-choice router: score, activation and gate ([`router_scores`]), and
//!   per-sequence top-k on the device for rows of any length, output sorted ascending
//!   ([`topk_sorted`], a radix select; mor-spec §3.1);
//! - the gather of selected tokens ([`gather_rows`]) and, fused, of per-head rows with RoPE
//!   at their original positions ([`gather_rope`]); RoPE at explicit positions
//!   ([`rope_at`]);
//! - RMSNorm ([`rms_norm`]) and SwiGLU ([`swiglu`]), forward and backward;
//! - the weighted scatter-add back into the full hidden state ([`scatter_add_rows`]) and
//!   its backward;
//! - decode attention for one query per request over a variable-length paged KV cache
//!   with GQA ([`paged_decode_attention`], split-K).
//!
//! With `train.precision = "bf16"` the backend runs its products in bf16 mixed precision
//! ([`bf16_matmul`]: bf16 inputs, f32 sums; flash attention on bf16 `q, k, v`), with f32
//! parameters, norms, softmax statistics, RoPE, residuals and loss.
//!
//! Every op runs its kernel on CUDA tensors and the same maths on CPU tensors
//! ([`host`]), so the ops and their gradients are tested on any machine. The CUDA layer is
//! data: one table of kernels ([`plan::KERNELS`]), a [`plan::Plan`] per op (buffers,
//! launches, arguments; validated on CPU), and one generic launch path. [`CudaBackend`]
//! (registered as `cuda`) implements [`crate::Backend`] with them.
//!
//! # Building
//! The feature `cuda` compiles the CUDA side. `build.rs` compiles each kernel to PTX for
//! `compute_80` with nvcc when it finds one; otherwise the sources are embedded and
//! compiled at run time with NVRTC for the device. Each module is loaded once per device
//! ([`module::ModuleKey`]). Without the feature every item here still exists:
//! [`CudaBackend::new`] and [`gpu_check()`] return [`crate::Error::NotCompiledWithCuda`],
//! and the ops run on CPU tensors only. See `docs/cuda.md`.

mod backend;
pub mod gpu_check;
pub mod host;
pub mod launch;
mod memory;
mod mixed;
pub mod module;
mod ops;
pub mod plain;
pub mod plan;

#[cfg(feature = "cuda")]
#[path = "cuda/enabled.rs"]
mod imp;

#[cfg(not(feature = "cuda"))]
#[path = "cuda/disabled.rs"]
mod imp;

pub use backend::{CudaBackend, CudaParams};
pub use gpu_check::{gpu_check, BenchResult, GpuCheckReport, KernelCheck, MemoryCheck};
pub use host::RouterActivation;
pub use memory::PeakMemory;
pub use mixed::bf16_matmul;
pub use ops::{
    adamw_step, ce_chunk_cols, flash_attention, gather_rope, gather_rows, linear_cross_entropy,
    linear_cross_entropy_with, paged_decode_attention, rms_norm, rope_at, router_scores,
    scatter_add_rows, swiglu, topk_sorted, AdamwHyper, RouterParams, TopK,
};

/// Whether this build has the CUDA kernels compiled in (the `cuda` feature).
pub const COMPILED: bool = cfg!(feature = "cuda");

/// The embedded text of a kernel module: `None` in builds without the `cuda` feature.
pub fn embedded_module(module: module::KernelModule) -> Option<&'static module::EmbeddedModule> {
    imp::embedded(module)
}

/// Opens CUDA device `ordinal` (candle's device, with the kernels' module cache behind it).
///
/// # Errors
/// [`crate::Error::NotCompiledWithCuda`] without the `cuda` feature;
/// [`crate::Error::CudaFailure`] naming the cause and the fix when it cannot be opened.
pub fn open_device(ordinal: usize) -> crate::Result<candle_core::Device> {
    imp::open_device(ordinal)
}

/// Name and compute capability of a CUDA device; `None` for other devices.
pub fn device_info(device: &candle_core::Device) -> Option<(String, (i32, i32))> {
    imp::device_info(device)
}

/// `(free, total)` memory of a CUDA device in bytes, as the driver reports it for the
/// whole device; `None` for other devices or when the driver does not answer.
pub fn memory_info(device: &candle_core::Device) -> Option<(usize, usize)> {
    imp::memory_info(device)
}
