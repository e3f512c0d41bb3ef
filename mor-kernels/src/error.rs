//! The error type of `mor-kernels`.

/// Errors of `mor-kernels`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A core (config/registry) error.
    #[error(transparent)]
    Core(#[from] mor_core::Error),
    /// The `cuda` backend was asked for in a build without the `cuda` feature.
    #[error("the `cuda` backend is not compiled in: rebuild with `--features cuda` (e.g. `cargo build --release --features cuda`)")]
    NotCompiledWithCuda,
    /// A CUDA-side failure (driver, NVRTC, launch).
    #[error("cuda: {0}")]
    Cuda(Box<dyn std::error::Error + Send + Sync>),
    /// Invalid input to an op (shape, dtype).
    #[error("{op}: {msg}")]
    Invalid {
        /// The op.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
