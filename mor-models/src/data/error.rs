//! The error type of the data pipeline and the tokenizers: every variant names the file (and
//! the line, column or field) it is about, so a bad corpus is fixed without a debugger.

use std::path::PathBuf;

/// Errors of [`crate::data`] and [`crate::tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured source path does not exist.
    #[error("data source `{}` does not exist", path.display())]
    MissingPath {
        /// The path as configured.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A folder holds no file with a supported extension.
    #[error(
        "folder `{}` contains no supported data file (looked for {} recursively)",
        path.display(),
        crate::data::SUPPORTED_EXTENSIONS.join(", ")
    )]
    NoSupportedFiles {
        /// The folder.
        path: PathBuf,
    },
    /// A file given directly has an extension no reader handles.
    #[error(
        "`{}` has an unsupported extension (supported: {})",
        path.display(),
        crate::data::SUPPORTED_EXTENSIONS.join(", ")
    )]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
    },
    /// A folder mixes text files and pre-tokenized files.
    #[error("folder `{}` mixes text files and pre-tokenized token files; use one kind per source", path.display())]
    MixedSource {
        /// The folder.
        path: PathBuf,
    },
    /// The corpus has no non-empty document.
    #[error("the corpus `{source_name}` is empty: it has no non-empty document")]
    EmptyCorpus {
        /// The source as configured.
        source_name: String,
    },
    /// A JSONL line is not valid JSON or lacks the text field.
    #[error("{}:{line}: {msg}", path.display())]
    JsonlLine {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A Parquet file has no usable text column.
    #[error(
        "{}: no BYTE_ARRAY column `{column}` (columns: {})",
        path.display(),
        available.join(", ")
    )]
    ParquetColumn {
        /// The file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The leaf columns the file has, with their physical types.
        available: Vec<String>,
    },
    /// A Parquet file could not be decoded.
    #[error("{}: parquet: {msg}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        msg: String,
    },
    /// A pre-tokenized token file is malformed.
    #[error("{}: {msg}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tokenizer could not be built, trained, loaded, saved or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A data setting is invalid.
    #[error("data config `{field}`: {msg}")]
    Config {
        /// The field name (as in the `[data]` section).
        field: &'static str,
        /// What is wrong and what is allowed.
        msg: String,
    },
    /// A split has too few tokens or rows for the requested shapes.
    #[error("{0}")]
    TooSmall(String),
    /// A saved data cursor does not fit this dataset.
    #[error("data cursor: {0}")]
    Cursor(String),
    /// A multiple-choice task file is malformed.
    #[error("{}:{line}: {msg}", path.display())]
    McTask {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with the data [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
