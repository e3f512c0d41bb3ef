//! The error type of `mor-kernels`, and the diagnosis of CUDA failures: a driver error
//! code (`CUDA_ERROR_OUT_OF_MEMORY`, `CUDA_ERROR_INVALID_PTX`, ...) becomes one message
//! naming the cause and the fix ([`CudaCause`], [`Error::CudaFailure`]).

/// Errors of `mor-kernels`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle error.
    #[error(transparent)]
    Candle(candle_core::Error),
    /// A core (config/registry) error.
    #[error(transparent)]
    Core(#[from] mor_core::Error),
    /// The `cuda` backend was asked for in a build without the `cuda` feature.
    #[error("{NOT_COMPILED_MESSAGE}")]
    NotCompiledWithCuda,
    /// A CUDA-side failure (driver, NVRTC, launch) of no known cause.
    #[error("cuda: {0}")]
    Cuda(Box<dyn std::error::Error + Send + Sync>),
    /// A CUDA failure of a known cause: what happened, the driver's words, and the fix.
    #[error("{message}")]
    CudaFailure {
        /// The cause.
        cause: CudaCause,
        /// The driver's or candle's own message.
        detail: String,
        /// The batch size of the step that failed, when the caller knows it.
        batch_size: Option<usize>,
        /// The whole message (cause, detail, batch size, fix).
        message: String,
    },
    /// Invalid input to an op (shape, dtype).
    #[error("{op}: {msg}")]
    Invalid {
        /// The op.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// The message of [`Error::NotCompiledWithCuda`]: the cause and the two ways out.
pub const NOT_COMPILED_MESSAGE: &str = "`backend.kind = \"cuda\"` needs a build with the `cuda` \
     feature, and this one has none: rebuild with `--features cuda` (e.g. `cargo run --release \
     -p xtask --features cuda -- ...`; needs the CUDA toolkit, see docs/cuda.md), or set \
     `backend.kind = \"cpu\"`";

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The known causes of a CUDA failure, each with its fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CudaCause {
    /// The NVIDIA driver library could not be loaded or initialised.
    DriverMissing,
    /// The driver is older than the CUDA version of the build.
    DriverTooOld,
    /// No CUDA device is visible, or not the ordinal asked for.
    NoDevice,
    /// The driver refused the kernels' PTX (invalid, or an ISA newer than the driver).
    PtxRefused,
    /// No kernel image for the GPU's architecture.
    NoBinaryForGpu,
    /// The device is out of memory.
    OutOfMemory,
}

impl CudaCause {
    /// Every cause.
    pub const ALL: [CudaCause; 6] = [
        CudaCause::DriverMissing,
        CudaCause::DriverTooOld,
        CudaCause::NoDevice,
        CudaCause::PtxRefused,
        CudaCause::NoBinaryForGpu,
        CudaCause::OutOfMemory,
    ];

    /// The cause of a CUDA driver error, by its name (`CUDA_ERROR_OUT_OF_MEMORY`) or its
    /// number (`2`); `None` for codes of no known cause.
    pub fn from_code(code: &str) -> Option<CudaCause> {
        let named = match code.trim() {
            "2" => "CUDA_ERROR_OUT_OF_MEMORY",
            "3" => "CUDA_ERROR_NOT_INITIALIZED",
            "35" => "CUDA_ERROR_INSUFFICIENT_DRIVER",
            "100" => "CUDA_ERROR_NO_DEVICE",
            "101" => "CUDA_ERROR_INVALID_DEVICE",
            "200" => "CUDA_ERROR_INVALID_IMAGE",
            "209" => "CUDA_ERROR_NO_BINARY_FOR_GPU",
            "218" => "CUDA_ERROR_INVALID_PTX",
            "221" => "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",
            "222" => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
            "803" => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
            "804" => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
            other => other,
        };
        Some(match named {
            "CUDA_ERROR_OUT_OF_MEMORY" => CudaCause::OutOfMemory,
            "CUDA_ERROR_NOT_INITIALIZED" | "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH" => {
                CudaCause::DriverMissing
            }
            "CUDA_ERROR_INSUFFICIENT_DRIVER" | "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE" => {
                CudaCause::DriverTooOld
            }
            "CUDA_ERROR_NO_DEVICE" | "CUDA_ERROR_INVALID_DEVICE" => CudaCause::NoDevice,
            "CUDA_ERROR_INVALID_PTX"
            | "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
            | "CUDA_ERROR_JIT_COMPILER_NOT_FOUND"
            | "CUDA_ERROR_INVALID_IMAGE" => CudaCause::PtxRefused,
            "CUDA_ERROR_NO_BINARY_FOR_GPU" => CudaCause::NoBinaryForGpu,
            _ => return None,
        })
    }

    /// The first known cause named in an error message: a `CUDA_ERROR_*` code (as cudarc
    /// prints `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`), or the message of
    /// a driver library that could not be loaded.
    pub fn find(text: &str) -> Option<CudaCause> {
        let mut rest = text;
        while let Some(i) = rest.find("CUDA_ERROR_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            if let Some(c) = CudaCause::from_code(&tail[..end]) {
                return Some(c);
            }
            rest = &tail[end..];
        }
        let lower = text.to_ascii_lowercase();
        if lower.contains("libcuda") || lower.contains("unable to dynamically load") {
            return Some(CudaCause::DriverMissing);
        }
        None
    }

    /// What happened, in a few words.
    pub fn what(self) -> &'static str {
        match self {
            CudaCause::DriverMissing => {
                "the NVIDIA driver (libcuda) could not be loaded or initialised"
            }
            CudaCause::DriverTooOld => {
                "the NVIDIA driver is older than the CUDA version this build uses"
            }
            CudaCause::NoDevice => "no CUDA device is visible, or not the ordinal asked for",
            CudaCause::PtxRefused => {
                "the driver refused the kernels' PTX (invalid, or a PTX ISA newer than the driver)"
            }
            CudaCause::NoBinaryForGpu => {
                "there is no kernel image for this GPU's architecture (the kernels need sm_80 or newer)"
            }
            CudaCause::OutOfMemory => "the GPU is out of memory",
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            CudaCause::DriverMissing => {
                "install the NVIDIA driver (`nvidia-smi` must list the GPU), or set \
                 `backend.kind = \"cpu\"`"
            }
            CudaCause::DriverTooOld => {
                "update the NVIDIA driver, or build against the toolkit the driver supports \
                 (see docs/cuda.md)"
            }
            CudaCause::NoDevice => {
                "check `nvidia-smi` and CUDA_VISIBLE_DEVICES, set `backend.ordinal` to an \
                 existing device, or set `backend.kind = \"cpu\"`"
            }
            CudaCause::PtxRefused => {
                "update the NVIDIA driver, or rebuild with `MOR_CUDA_NVRTC=1` so that the \
                 kernels are compiled for this device at run time"
            }
            CudaCause::NoBinaryForGpu => {
                "run on an sm_80 or newer GPU (A100, RTX 30xx, H100 or later), or set \
                 `backend.kind = \"cpu\"`"
            }
            CudaCause::OutOfMemory => {
                "lower `train.micro_batch_seqs` (gradient accumulation keeps \
                 `train.batch_seqs` per optimiser step), the sequence length, or the model size"
            }
        }
    }
}

impl Error {
    /// The error of a CUDA failure of a known cause.
    pub fn cuda_failure(
        cause: CudaCause,
        detail: impl Into<String>,
        batch_size: Option<usize>,
    ) -> Error {
        let detail = detail.into();
        let tried = match (cause, batch_size) {
            (CudaCause::OutOfMemory, Some(b)) => format!(" at batch size {b}"),
            _ => String::new(),
        };
        let message = format!(
            "cuda: {}{tried} ({detail}); fix: {}",
            cause.what(),
            cause.fix()
        );
        Error::CudaFailure {
            cause,
            detail,
            batch_size,
            message,
        }
    }

    /// A candle error, diagnosed: a CUDA failure of a known cause (its message names a
    /// `CUDA_ERROR_*` code) becomes [`Error::CudaFailure`], anything else [`Error::Candle`].
    pub fn from_candle(e: candle_core::Error) -> Error {
        let text = e.to_string();
        match CudaCause::find(&text) {
            Some(cause) => Error::cuda_failure(cause, text, None),
            None => Error::Candle(e),
        }
    }

    /// The cause, when this is a diagnosed CUDA failure.
    pub fn cuda_cause(&self) -> Option<CudaCause> {
        match self {
            Error::CudaFailure { cause, .. } => Some(*cause),
            _ => None,
        }
    }

    /// The same error with the batch size of the failed step attached (an out-of-memory
    /// message then names it); other errors are returned unchanged.
    pub fn with_batch_size(self, batch_size: usize) -> Error {
        match self {
            Error::CudaFailure { cause, detail, .. } => {
                Error::cuda_failure(cause, detail, Some(batch_size))
            }
            other => other,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::from_candle(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_codes_map_to_their_cause() {
        for (code, cause) in [
            ("CUDA_ERROR_OUT_OF_MEMORY", CudaCause::OutOfMemory),
            ("2", CudaCause::OutOfMemory),
            ("CUDA_ERROR_INVALID_PTX", CudaCause::PtxRefused),
            ("218", CudaCause::PtxRefused),
            ("CUDA_ERROR_UNSUPPORTED_PTX_VERSION", CudaCause::PtxRefused),
            ("CUDA_ERROR_NO_BINARY_FOR_GPU", CudaCause::NoBinaryForGpu),
            ("209", CudaCause::NoBinaryForGpu),
            ("CUDA_ERROR_NO_DEVICE", CudaCause::NoDevice),
            ("CUDA_ERROR_INVALID_DEVICE", CudaCause::NoDevice),
            ("CUDA_ERROR_INSUFFICIENT_DRIVER", CudaCause::DriverTooOld),
            ("CUDA_ERROR_NOT_INITIALIZED", CudaCause::DriverMissing),
        ] {
            assert_eq!(CudaCause::from_code(code), Some(cause), "{code}");
        }
        for code in [
            "CUDA_ERROR_LAUNCH_FAILED",
            "719",
            "",
            "CUDA_ERROR_OUT_OF_MEMORYX",
        ] {
            assert_eq!(CudaCause::from_code(code), None, "{code}");
        }
    }

    #[test]
    fn a_code_inside_a_message_is_found() {
        // As cudarc's DriverError prints, wrapped by candle.
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert_eq!(CudaCause::find(oom), Some(CudaCause::OutOfMemory));
        let two = "DriverError(CUDA_ERROR_LAUNCH_FAILED, \"x\") then DriverError(CUDA_ERROR_INVALID_PTX, \"a PTX JIT compilation failed\")";
        assert_eq!(CudaCause::find(two), Some(CudaCause::PtxRefused));
        assert_eq!(
            CudaCause::find("Unable to dynamically load the \"cuda\" shared library"),
            Some(CudaCause::DriverMissing)
        );
        assert_eq!(CudaCause::find("shape mismatch in matmul"), None);
        assert_eq!(CudaCause::find("CUDA_ERROR_"), None);
    }

    #[test]
    fn a_candle_cuda_error_becomes_one_message_with_cause_and_fix() {
        let e: Error = candle_core::Error::Cuda(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        )
        .into();
        assert_eq!(e.cuda_cause(), Some(CudaCause::OutOfMemory));
        let msg = e.to_string();
        assert!(
            msg.contains("out of memory") && msg.contains("train.micro_batch_seqs"),
            "{msg}"
        );
        assert!(!msg.contains("at batch size"), "{msg}");
        let msg = e.with_batch_size(32).to_string();
        assert!(msg.contains("out of memory at batch size 32"), "{msg}");

        let e: Error =
            candle_core::Error::Cuda("DriverError(CUDA_ERROR_NO_BINARY_FOR_GPU, \"x\")".into())
                .into();
        let msg = e.with_batch_size(8).to_string();
        assert!(
            msg.contains("sm_80") && !msg.contains("batch size 8"),
            "{msg}"
        );
        let e: Error =
            candle_core::Error::Cuda("DriverError(CUDA_ERROR_INVALID_PTX, \"x\")".into()).into();
        assert!(e.to_string().contains("MOR_CUDA_NVRTC=1"), "{e}");
        let e: Error =
            candle_core::Error::Cuda("DriverError(CUDA_ERROR_NO_DEVICE, \"x\")".into()).into();
        assert!(e.to_string().contains("backend.ordinal"), "{e}");

        // Other candle errors pass through unchanged.
        let e: Error = candle_core::Error::Msg("bad shape".into()).into();
        assert!(
            matches!(e, Error::Candle(_)) && e.to_string() == "bad shape",
            "{e}"
        );
        assert!(e.with_batch_size(4).to_string() == "bad shape");
    }

    #[test]
    fn every_cause_has_a_message_and_a_fix() {
        for c in CudaCause::ALL {
            let msg = Error::cuda_failure(c, "detail", Some(2)).to_string();
            assert!(
                msg.starts_with("cuda: ") && msg.contains("(detail); fix: "),
                "{msg}"
            );
            assert!(!c.what().is_empty() && !c.fix().is_empty());
        }
        assert!(NOT_COMPILED_MESSAGE.contains("--features cuda"));
        assert!(Error::NotCompiledWithCuda
            .to_string()
            .contains("backend.kind = \"cpu\""));
    }
}
