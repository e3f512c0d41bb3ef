//! The error type of `mor-models`.

use std::path::PathBuf;

/// Errors of `mor-models`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A config, registry or plan error.
    #[error(transparent)]
    Core(#[from] mor_core::Error),
    /// A backend error.
    #[error(transparent)]
    Kernels(#[from] mor_kernels::Error),
    /// A router error.
    #[error(transparent)]
    Router(#[from] mor_router::Error),
    /// A KV-policy error.
    #[error(transparent)]
    Kv(#[from] mor_kvcache::Error),
    /// A data, tokenizer or task-file error.
    #[error(transparent)]
    Data(#[from] crate::data::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint was refused.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// Training stopped because the loss or a gradient was not finite.
    #[error("non-finite {what} at step {step}; last good checkpoint: {last_good}")]
    NonFinite {
        /// `loss` or `gradient of <param>`.
        what: String,
        /// The optimiser step.
        step: usize,
        /// Path of the last good checkpoint (or "none").
        last_good: String,
    },
    /// Another process holds the run folder's lock.
    #[error(
        "{path} is in use by another process ({holder}); wait for it to finish, or stop it, or choose another --out (if that process no longer runs, remove {path}/run.lock)"
    )]
    RunLocked {
        /// The run folder.
        path: PathBuf,
        /// Who holds the lock.
        holder: String,
    },
    /// Any other error, with its message.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An error with a message.
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }

    /// Wraps an io error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
