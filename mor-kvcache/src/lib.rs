//! KV policies of Mixture-of-Recursions (spec §4).
//!
//! A [`KvPolicy`] defines which keys and values the queries of each recursion step attend
//! to, in training (this module's [`KvPolicy::training_kv`]) and at decode time (the
//! [`decode`] caches), and reports the cost table of spec §4.
//!
//! Built-in policies: `recursion_wise` (a token stores and attends K/V only at the steps it
//! reaches), `recursive_sharing` (the step-1 K/V are reused by every later step), `hybrid`
//! (expert-choice only: the step-1 cache with the positions selected at step r overwritten
//! by fresh K/V for that step).

use candle_core::Tensor;
use std::fmt;

pub mod error;
pub use error::{Error, Result};

mod registry;
pub use registry::{build_kv_policy, KvEntry, KvPolicyPlugin, KvCtx};

pub mod policies;
pub mod decode;

#[doc(hidden)]
pub mod __private {
    pub use mor_core::__private::*;
}

/// Keys and values visible to one step's queries, with the absolute position of every key.
///
/// # Shapes
/// `k, v: [b, hkv, n, dh]`, `pos: [b, n]` (u32; `mor_kernels::PAD_POS` marks padding).
#[derive(Debug, Clone)]
pub struct StepKv {
    /// Keys (RoPE already applied at their absolute positions).
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
    /// Absolute position of every key.
    pub pos: Tensor,
}

/// The relative costs of spec §4 ("Relative cost versus vanilla", recursion blocks only).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KvCost {
    /// KV memory relative to a vanilla model of the same unrolled depth.
    pub memory_ratio: f64,
    /// KV cache IO relative to vanilla.
    pub io_ratio: f64,
    /// Attention FLOPs of step r relative to a full layer, per step (index r-1).
    pub attn_flops_ratio: Vec<f64>,
}

/// A KV policy.
///
/// # Contract (training)
/// The model runs recursion step `step` on the selected tokens of every row (positions
/// ascending). For each layer of the shared block it asks [`KvPolicy::projects_kv`]; if true
/// it computes fresh K/V for the selected tokens (`fresh`, RoPE applied). At step 1 the
/// model keeps the full-sequence K/V of each block layer when
/// [`KvPolicy::keeps_first_step`] is true, and passes it as `first` at later steps.
/// [`KvPolicy::training_kv`] returns the keys/values the selected queries attend to
/// (causally, by position). It must never read a step that was not written: `first` is only
/// passed when `keeps_first_step()` and every token ran step 1.
pub trait KvPolicy: Send + Sync + fmt::Debug {
    /// The registered name.
    fn name(&self) -> &'static str;
    /// Whether step `step` (1-based) projects fresh K/V for its selected tokens.
    fn projects_kv(&self, step: usize) -> bool;
    /// Whether the step-1 K/V of every block layer must be kept for later steps.
    fn keeps_first_step(&self) -> bool;
    /// Keys and values for the queries of recursion step `step`.
    ///
    /// `fresh`: this step's K/V of the selected tokens (present iff `projects_kv(step)`);
    /// `first`: the step-1 K/V of the same block layer over the full sequence (present iff
    /// `keeps_first_step()` and `step >= 2`); `selected: [b, n]` (u32) positions of the
    /// selected tokens (the queries).
    fn training_kv(&self, step: usize, fresh: Option<&StepKv>, first: Option<&StepKv>, selected: &Tensor)
        -> Result<StepKv>;
    /// The relative costs for `N_r` steps with step capacities `caps` (fractions of L).
    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost;
}
