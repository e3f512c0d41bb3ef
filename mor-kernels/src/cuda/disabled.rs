//! The CUDA side of the fused ops in a build without the `cuda` feature: the same functions
//! as `enabled.rs`, each answering that CUDA is not compiled in. They are unreachable in
//! practice (no CUDA tensor exists in such a build) but keep every call site free of cfgs.

use super::module::{EmbeddedModule, KernelModule, ModuleKey, ModuleOrigin};
use super::ops::{
    GatherRopeBwdOp, GatherRopeOp, GatherRowsOp, IndexAddOp, PagedDecodeOp, RmsNormBwdOp,
    RmsNormOp, RopeOp, RouterScoreOp, ScatterAddBwdOp, ScatterAddOp, TopkOp,
};
use crate::{Error, Result};
use candle_core::{CudaStorage, Device, Layout, Shape};

type CResult<T> = candle_core::Result<T>;

macro_rules! not_compiled {
    ($($name:ident($($ty:ty),*);)*) => {$(
        pub(crate) fn $name($(_: $ty),*) -> CResult<(CudaStorage, Shape)> {
            Err(candle_core::Error::NotCompiledWithCudaSupport)
        }
    )*};
}

not_compiled! {
    router_score(&RouterScoreOp, &CudaStorage, &Layout, &CudaStorage, &Layout);
    topk_sorted(&TopkOp, &CudaStorage, &Layout);
    rms_norm_fwd(&RmsNormOp, &CudaStorage, &Layout, &CudaStorage, &Layout);
    rms_norm_bwd(&RmsNormBwdOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    rope_at(&RopeOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    gather_rope_fwd(&GatherRopeOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    gather_rope_bwd(&GatherRopeBwdOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    swiglu_fwd(&CudaStorage, &Layout, &CudaStorage, &Layout);
    swiglu_bwd(&CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    gather_rows(&GatherRowsOp, &CudaStorage, &Layout);
    index_add_rows(&IndexAddOp, &CudaStorage, &Layout, &CudaStorage, &Layout);
    scatter_add_fwd(&ScatterAddOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    scatter_add_bwd(&ScatterAddBwdOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
    paged_decode(&PagedDecodeOp, &CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout);
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
