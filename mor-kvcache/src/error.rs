//! The error type of `mor-kvcache`.

/// Errors of `mor-kvcache`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A core (config/registry) error.
    #[error(transparent)]
    Core(#[from] mor_core::Error),
    /// The cache has no free block left for this request (back-pressure: the caller may
    /// retry after another request ends).
    #[error("KV cache exhausted: {needed} more block(s) needed, {free} free of {total}")]
    Exhausted {
        /// Blocks needed.
        needed: usize,
        /// Blocks free.
        free: usize,
        /// Blocks in the pool.
        total: usize,
    },
    /// Invalid use (unknown request, step out of range, shapes).
    #[error("kv policy `{policy}`: {msg}")]
    Invalid {
        /// The policy.
        policy: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
