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

#![warn(missing_docs)]

use candle_core::Tensor;
use std::fmt;
use std::sync::Arc;

pub mod error;
pub use error::{Error, Result};

mod registry;
pub use registry::{build_kv_policy, KvCtx, KvEntry, KvPolicyPlugin};

pub mod policies;
pub use policies::{Hybrid, NoParams, RecursionWise, RecursiveSharing};

pub mod decode;
pub use decode::{
    attend, attend_into, BlockPool, DecodeCache, DecodeCacheSpec, DecodeMode, DenseKv, KvToken,
    KvView, PagedCache,
};

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
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use mor_kvcache::{KvPolicy, RecursionWise, RecursiveSharing, StepKv};
///
/// let dev = Device::Cpu;
/// // K/V of the tokens at `pos`: k, v `[b = 1, hkv = 1, n, dh = 2]`, pos `[1, n]`.
/// let kv = |pos: &[u32]| -> candle_core::Result<StepKv> {
///     let n = pos.len();
///     Ok(StepKv {
///         k: Tensor::ones((1, 1, n, 2), DType::F32, &dev)?,
///         v: Tensor::ones((1, 1, n, 2), DType::F32, &dev)?,
///         pos: Tensor::new(pos, &dev)?.unsqueeze(0)?,
///     })
/// };
/// let first = kv(&[0, 1, 2, 3])?; // step 1: every token
/// let selected = Tensor::new(&[[1u32, 3]], &dev)?; // the queries of step 2
/// let fresh = kv(&[1, 3])?;
/// // Recursion-wise caching: step 2 attends to the tokens of step 2 only.
/// let rw = RecursionWise::new(2)?;
/// assert!(rw.projects_kv(2) && !rw.keeps_first_step());
/// assert_eq!(rw.training_kv(2, Some(&fresh), None, &selected)?.pos.to_vec2::<u32>()?, [[1, 3]]);
/// // Recursive sharing: step 2 projects nothing and reads the step-1 K/V of every token.
/// let rs = RecursiveSharing::new(2)?;
/// assert!(!rs.projects_kv(2) && rs.keeps_first_step());
/// assert_eq!(rs.training_kv(2, None, Some(&first), &selected)?.pos.to_vec2::<u32>()?, [[0, 1, 2, 3]]);
/// // Reading a step-1 K/V the policy never kept is an error, not a wrong answer.
/// assert!(rw.training_kv(2, Some(&fresh), Some(&first), &selected).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv>;
    /// Whether [`training_kv`](KvPolicy::training_kv) at `step` returns exactly `fresh`, so
    /// that the step's selected tokens attend only to one another's fresh K/V. A model may
    /// then run the step's whole attention half as one fused op. The default, `false`, is
    /// always correct (the model then calls `training_kv`).
    fn trains_on_fresh_kv(&self, step: usize) -> bool {
        let _ = step;
        false
    }
    /// The relative costs for `N_r` steps with step capacities `caps` (fractions of L).
    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost;

    /// A decode-time cache for a model with the layer slots of `spec.plan` (spec §5).
    ///
    /// The default body infers the decode behaviour from [`KvPolicy::projects_kv`] and
    /// [`KvPolicy::keeps_first_step`] (see [`DecodeMode::infer`]) and builds a
    /// [`PagedCache`]: a policy that projects at every step and keeps nothing behaves as
    /// recursion-wise caching, one that keeps step 1 and projects only there as recursive
    /// sharing, one that keeps step 1 and projects at every step as hybrid.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the behaviour matches none of the three, or when `spec` is
    /// invalid (zero sizes, a plan whose later steps have no step-1 slot to read).
    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        let mode = DecodeMode::infer(self, spec.plan.num_recursions)?;
        Ok(Box::new(PagedCache::new(self.name(), mode, spec)?))
    }
}

impl<T: KvPolicy + ?Sized> KvPolicy for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn projects_kv(&self, step: usize) -> bool {
        (**self).projects_kv(step)
    }
    fn keeps_first_step(&self) -> bool {
        (**self).keeps_first_step()
    }
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv> {
        (**self).training_kv(step, fresh, first, selected)
    }
    fn trains_on_fresh_kv(&self, step: usize) -> bool {
        (**self).trains_on_fresh_kv(step)
    }
    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost {
        (**self).cost(num_recursions, caps)
    }
    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        (**self).new_decode_cache(spec)
    }
}

impl<T: KvPolicy + ?Sized> KvPolicy for Box<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn projects_kv(&self, step: usize) -> bool {
        (**self).projects_kv(step)
    }
    fn keeps_first_step(&self) -> bool {
        (**self).keeps_first_step()
    }
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv> {
        (**self).training_kv(step, fresh, first, selected)
    }
    fn trains_on_fresh_kv(&self, step: usize) -> bool {
        (**self).trains_on_fresh_kv(step)
    }
    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost {
        (**self).cost(num_recursions, caps)
    }
    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        (**self).new_decode_cache(spec)
    }
}
