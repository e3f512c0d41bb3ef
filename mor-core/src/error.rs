//! The error type of `mor-core`.

use crate::registry::{Family, RegistryError};
use std::path::PathBuf;

/// One problem found while resolving a config: the field path, the bad value and what is
/// allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    /// Dotted field path, e.g. `model.router.capacity`.
    pub field: String,
    /// The bad value as written (or a description of it).
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` = {}: {}", self.field, self.value, self.allowed)
    }
}

/// Errors of `mor-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config has one or more problems; each is listed.
    #[error("invalid config ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigProblem>),
    /// A registry lookup failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A plugin refused its parameters.
    #[error("{family} `{name}`: {msg}")]
    Plugin {
        /// The family.
        family: Family,
        /// The plugin name.
        name: String,
        /// Why.
        msg: String,
    },
    /// A recursion plan could not be built.
    #[error("cannot plan the recursion: {0}")]
    Plan(String),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
