//! The kernel modules as plain data: their names, the kernels each one defines, the names
//! of the f32 and bf16 instantiations, the key of the per-device module cache, and the
//! NVRTC target chosen for a device's compute capability.

use std::fmt;

/// One CUDA source file of `mor-kernels/kernels/`, loaded as one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelModule {
    /// `router.cu`: router score and gate, per-sequence top-k.
    Router,
    /// `rms_norm.cu`: RMSNorm forward and backward.
    RmsNorm,
    /// `swiglu.cu`: SwiGLU forward and backward.
    Swiglu,
    /// `tokens.cu`: gather of selected rows, weighted scatter-add, and their backward.
    Tokens,
    /// `rope.cu`: RoPE at explicit positions, fused gather + RoPE and its backward.
    Rope,
    /// `decode_attention.cu`: split-K decode attention over a paged KV cache.
    DecodeAttention,
    /// `flash_attention.cu`: flash-style causal attention by positions, forward and
    /// backward.
    FlashAttention,
    /// `cross_entropy.cu`: per-chunk statistics and gradient of the vocabulary-chunked
    /// LM-head cross-entropy.
    CrossEntropy,
    /// `adamw.cu`: the fused AdamW step.
    Adamw,
}

impl KernelModule {
    /// Every module.
    pub const ALL: [KernelModule; 9] = [
        KernelModule::Router,
        KernelModule::RmsNorm,
        KernelModule::Swiglu,
        KernelModule::Tokens,
        KernelModule::Rope,
        KernelModule::DecodeAttention,
        KernelModule::FlashAttention,
        KernelModule::CrossEntropy,
        KernelModule::Adamw,
    ];

    /// The module name: the file stem of its source in `kernels/`.
    pub fn name(self) -> &'static str {
        match self {
            KernelModule::Router => "router",
            KernelModule::RmsNorm => "rms_norm",
            KernelModule::Swiglu => "swiglu",
            KernelModule::Tokens => "tokens",
            KernelModule::Rope => "rope",
            KernelModule::DecodeAttention => "decode_attention",
            KernelModule::FlashAttention => "flash_attention",
            KernelModule::CrossEntropy => "cross_entropy",
            KernelModule::Adamw => "adamw",
        }
    }

    /// The kernels of the module, without the dtype suffix, from the kernel table
    /// ([`super::plan::KERNELS`]). Each exists as `<base>_f32` and `<base>_bf16` (see
    /// [`kernel_name`]).
    pub fn kernels(self) -> Vec<&'static str> {
        super::plan::kernels_of(self)
    }

    /// The module whose source file stem is `name`.
    pub fn from_name(name: &str) -> Option<KernelModule> {
        KernelModule::ALL.into_iter().find(|m| m.name() == name)
    }
}

impl fmt::Display for KernelModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element types the kernels are instantiated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelDType {
    /// IEEE f32.
    F32,
    /// bfloat16 (arithmetic in f32, one rounding per output).
    Bf16,
}

impl KernelDType {
    /// Both element types.
    pub const ALL: [KernelDType; 2] = [KernelDType::F32, KernelDType::Bf16];

    /// The suffix of the kernel names.
    pub fn suffix(self) -> &'static str {
        match self {
            KernelDType::F32 => "f32",
            KernelDType::Bf16 => "bf16",
        }
    }

    /// The kernel element type of a candle dtype, if the kernels support it.
    pub fn of(dtype: candle_core::DType) -> Option<KernelDType> {
        match dtype {
            candle_core::DType::F32 => Some(KernelDType::F32),
            candle_core::DType::BF16 => Some(KernelDType::Bf16),
            _ => None,
        }
    }
}

/// The name of the `dtype` instantiation of kernel `base`, e.g. `mor_rms_norm_fwd_bf16`.
pub fn kernel_name(base: &str, dtype: KernelDType) -> String {
    format!("{base}_{}", dtype.suffix())
}

/// Key of the module cache: a module is loaded once per device and reused by every launch
/// on that device. Devices are told apart by their CUDA ordinal; all candle devices on one
/// ordinal share its primary context, so they share the loaded module too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleKey {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// The module.
    pub module: KernelModule,
}

impl fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{}/{}", self.ordinal, self.module)
    }
}

/// How a module reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleOrigin {
    /// PTX that nvcc made at build time for `compute_80`; the driver JIT-compiles it for
    /// the device.
    BuildTimePtx,
    /// CUDA source compiled at run time by NVRTC for the device's own architecture.
    RuntimeNvrtc,
}

/// The PTX target of build-time compilation: `compute_80` loads on sm_80 and every later
/// architecture.
pub const BUILD_PTX_ARCH: &str = "compute_80";

/// The NVRTC target for a device of compute capability `major.minor`: the device's own
/// virtual architecture when it is a known one, else the closest known one below it.
/// Devices older than sm_80 get `compute_80`, which their driver then rejects with a
/// clear "unsupported PTX" error rather than running unsupported instructions.
pub fn nvrtc_arch(major: u32, minor: u32) -> &'static str {
    const KNOWN: [((u32, u32), &str); 8] = [
        ((12, 0), "compute_120"),
        ((10, 0), "compute_100"),
        ((9, 0), "compute_90"),
        ((8, 9), "compute_89"),
        ((8, 7), "compute_87"),
        ((8, 6), "compute_86"),
        ((8, 0), "compute_80"),
        ((0, 0), "compute_80"),
    ];
    KNOWN
        .iter()
        .find(|(cc, _)| (major, minor) >= *cc)
        .map(|(_, arch)| *arch)
        .unwrap_or("compute_80")
}

/// The text that is embedded for one module: PTX when nvcc ran at build time, and always
/// the CUDA source (with `mor_common.cuh` inlined) for run-time NVRTC.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedModule {
    /// The module name (file stem).
    pub name: &'static str,
    /// PTX from nvcc for [`BUILD_PTX_ARCH`], when nvcc was found at build time.
    pub ptx: Option<&'static str>,
    /// The self-contained CUDA source.
    pub source: &'static str,
}
