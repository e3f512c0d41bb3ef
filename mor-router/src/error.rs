//! The error type of `mor-router`.

/// Errors of `mor-router`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A core (config/registry) error.
    #[error(transparent)]
    Core(#[from] mor_core::Error),
    /// A backend error.
    #[error(transparent)]
    Kernels(#[from] mor_kernels::Error),
    /// Invalid input (shapes, step numbers).
    #[error("router `{router}`: {msg}")]
    Invalid {
        /// The router.
        router: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
