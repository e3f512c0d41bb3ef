//! Mixture-of-Recursions models assembled from a resolved config (spec §1–§5).
//!
//! - [`model`]: the Llama-style decoder with recursion, routing and KV policies;
//! - [`optim`], [`train`], [`checkpoint`]: AdamW, the training loop and atomic checkpoints;
//! - [`runlock`], [`provenance`]: the run folder's exclusive lock and the record of its data;
//! - [`eval`]: validation NLL / bits per byte with causal and full-sequence routing,
//!   few-shot multiple choice, router metrics and depth traces;
//! - [`engine`]: incremental decoding and the batched inference engine (KV caches per
//!   policy, causal routing, early exit, continuous depth-wise batching, sampling);
//! - [`hf`]: Hugging Face Llama-family import and export;
//! - [`builtin`]: links every built-in plugin crate.

pub mod error;
pub use error::{Error, Result};

pub mod model;
pub use model::MorModel;
pub mod builtin;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod eval;
pub mod hf;
pub mod loss;
pub mod official;
pub mod optim;
pub mod progress;
pub mod provenance;
pub mod relax;
pub mod report;
pub mod run;
pub mod runlock;
pub mod tokenizer;
pub mod train;
