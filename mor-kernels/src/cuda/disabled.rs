//! The CUDA side in a build without the `cuda` feature: the same functions as
//! `enabled.rs`, each answering that CUDA is not compiled in. [`execute`] is unreachable in
//! practice (no CUDA tensor exists in such a build) but keeps every call site free of cfgs.

use super::module::{EmbeddedModule, KernelModule, ModuleKey, ModuleOrigin};
use super::plan::Plan;
use crate::{Error, Result};
use candle_core::{CudaStorage, Device, Layout, Shape};

/// Always candle's "not compiled with CUDA" error.
pub(crate) fn execute(
    _: &Plan,
    _: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<(CudaStorage, Shape)> {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

/// No module is embedded without the feature.
pub(crate) fn embedded(_: KernelModule) -> Option<&'static EmbeddedModule> {
    None
}

/// No module is ever loaded without the feature.
pub(crate) fn loaded_modules() -> Vec<(ModuleKey, ModuleOrigin)> {
    Vec::new()
}

/// Always [`Error::NotCompiledWithCuda`].
pub(crate) fn open_device(_ordinal: usize) -> Result<Device> {
    Err(Error::NotCompiledWithCuda)
}

/// No CUDA device exists without the feature.
pub(crate) fn device_info(_: &Device) -> Option<(String, (i32, i32))> {
    None
}

/// No CUDA device exists without the feature.
pub(crate) fn memory_info(_: &Device) -> Option<(usize, usize)> {
    None
}
