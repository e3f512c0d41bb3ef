//! Run configuration.
//!
//! Resolved types used by the rest of the workspace. (Schema, presets and three-stage
//! resolution: foundation work.)

use crate::plan::{DepthFix, RecursionPlan};
use serde::{Deserialize, Serialize};

/// A plugin slot after resolution: its kind and its parameters with defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginSpec {
    /// Registered name.
    pub kind: String,
    /// Validated parameters (without `kind`).
    pub params: toml::Table,
}

/// Model dimensions (spec §1.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDims {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// Layer count before the depth fix.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub intermediate_size: usize,
    /// Training context length `L`.
    pub seq_len: usize,
    /// RoPE theta.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Std of the N(0, std²) initialisation.
    pub init_std: f64,
    /// Tie the LM head to the embedding.
    pub tie_embeddings: bool,
}

/// Recursion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecursionConfig {
    /// `N_r`.
    pub num_recursions: usize,
    /// Sharing strategy slot.
    pub sharing: PluginSpec,
    /// Share the RMSNorm weights of shared blocks.
    pub ln_share: bool,
    /// Depth fix.
    pub depth_fix: DepthFix,
}

/// A fully resolved run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedConfig {
    /// Model dimensions.
    pub model: ModelDims,
    /// Recursion settings.
    pub recursion: RecursionConfig,
    /// Router slot; `None` for vanilla and the recursive baseline.
    pub router: Option<PluginSpec>,
    /// KV policy slot.
    pub kv: PluginSpec,
    /// Backend slot.
    pub backend: PluginSpec,
    /// The recursion plan.
    pub plan: RecursionPlan,
    /// Seed of all randomness.
    pub seed: u64,
}
