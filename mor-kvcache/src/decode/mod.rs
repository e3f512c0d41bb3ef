//! Decode-time KV caches (spec §4 "Decoding", spec §5).
//!
//! The inference engine runs continuous depth-wise batching: one batch of the shared block
//! holds tokens of many requests at different recursion depths. Every unrolled layer slot of
//! the [`RecursionPlan`] (prelude, `Recursion { step, layer }`, coda) may need keys and
//! values at decode time. A [`DecodeCache`] answers two questions per slot:
//! - [`DecodeCache::writes`]: does a token that reaches this slot store its K/V here?
//! - [`DecodeCache::view`]: which keys and values does a query at this slot attend to?
//!
//! | mode | writes | view at `Recursion { step: r >= 2, layer: j }` |
//! |---|---|---|
//! | [`DecodeMode::RecursionWise`] | every slot | the tokens of the request that reached this slot |
//! | [`DecodeMode::Sharing`] | prelude, coda, step 1 | the step-1 slot of layer `j` |
//! | [`DecodeMode::Hybrid`] | every slot | the step-1 slot of layer `j`, with the positions that reached step `r` replaced by their step-`r` K/V |
//!
//! Prelude, coda and step-1 slots always read their own entries. A vanilla model is the
//! recursion-wise cache of a plan where every token reaches every slot
//! ([`DecodeCacheSpec::vanilla`]).
//!
//! Storage is a [`BlockPool`]: one preallocated buffer of fixed-size blocks for K, V and
//! positions, with a free list, so appending a token never reallocates storage. Each
//! (request, slot) owns a page table of blocks. [`KvView`] borrows the pool (no copy of
//! the history per token) and [`attend`] computes single-query causal GQA attention directly
//! on the blocks.

use crate::{Error, KvPolicy, Result};
use mor_core::plan::{RecursionPlan, Segment, Slot};
use std::fmt;

mod paged;
mod pool;
mod view;

pub use paged::PagedCache;
pub use pool::{BlockPool, KvPrecision, Page};
pub use view::{attend, attend_into, attend_into_tier, DenseKv, KvIter, KvToken, KvView};

/// What a decode cache is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeCacheSpec {
    /// The unrolled layer slots of the model; slot indices of the cache are indices into
    /// `plan.slots`.
    pub plan: RecursionPlan,
    /// Key/value heads `hkv`.
    pub num_kv_heads: usize,
    /// Head dimension `dh`.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Blocks in the pool; the pool is allocated up front for all of them.
    pub max_blocks: usize,
}

impl DecodeCacheSpec {
    /// The spec of a vanilla model with `num_layers` layers: a plan with `N_r = 1` whose
    /// slots are `Recursion { step: 1, layer: i }` on block `i`. Every token reaches every
    /// slot, so each mode behaves as a plain per-layer cache.
    pub fn vanilla(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_tokens: usize,
        max_blocks: usize,
    ) -> Self {
        let slots = (0..num_layers)
            .map(|i| Slot {
                block: i,
                segment: Segment::Recursion { step: 1, layer: i },
            })
            .collect();
        let plan = RecursionPlan {
            strategy: "none".to_string(),
            num_recursions: 1,
            base_depth: num_layers,
            num_blocks: num_layers,
            requested_layers: num_layers,
            depth_fix: Default::default(),
            slots,
        };
        DecodeCacheSpec {
            plan,
            num_kv_heads,
            head_dim,
            block_tokens,
            max_blocks,
        }
    }

    /// Floats per token row (`hkv · dh`) of K (and of V).
    pub fn row(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The decode behaviour of a KV policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeMode {
    /// Every slot stores the K/V of the tokens that reach it; queries read their own slot.
    RecursionWise,
    /// Only prelude, coda and step-1 slots store; a step-r slot reads the step-1 slot of the
    /// same block layer.
    Sharing,
    /// Every slot stores; a step-r slot reads the step-1 slot of the same block layer with
    /// the positions that reached step r replaced by their step-r K/V.
    Hybrid,
}

impl DecodeMode {
    /// The decode behaviour implied by a policy's training behaviour over `N_r` steps:
    /// - projects at every step, keeps nothing: [`DecodeMode::RecursionWise`];
    /// - keeps step 1, projects at step 1 only: [`DecodeMode::Sharing`];
    /// - keeps step 1, projects at every step: [`DecodeMode::Hybrid`].
    ///
    /// # Errors
    /// [`Error::Invalid`] for any other combination (e.g. no projection at step 1).
    pub fn infer<P: KvPolicy + ?Sized>(policy: &P, num_recursions: usize) -> Result<DecodeMode> {
        let n = num_recursions.max(1);
        let first = policy.projects_kv(1);
        let all_later = (2..=n).all(|r| policy.projects_kv(r));
        let no_later = (2..=n).all(|r| !policy.projects_kv(r));
        let keeps = policy.keeps_first_step();
        match (first, keeps) {
            (true, false) if all_later => Ok(DecodeMode::RecursionWise),
            (true, true) if no_later => Ok(DecodeMode::Sharing),
            (true, true) if all_later => Ok(DecodeMode::Hybrid),
            _ => Err(Error::Invalid {
                policy: policy.name(),
                msg: format!(
                    "no built-in decode cache matches this policy (projects K/V at steps {:?}, keeps step 1: {keeps}); \
                     implement `KvPolicy::new_decode_cache`",
                    (1..=n).filter(|&r| policy.projects_kv(r)).collect::<Vec<_>>()
                ),
            }),
        }
    }

    /// Whether a token reaching a slot of `segment` stores its K/V there.
    pub fn writes(self, segment: Segment) -> bool {
        match (self, segment) {
            (DecodeMode::Sharing, Segment::Recursion { step, .. }) => step == 1,
            _ => true,
        }
    }
}

impl fmt::Display for DecodeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeMode::RecursionWise => "recursion_wise",
            DecodeMode::Sharing => "sharing",
            DecodeMode::Hybrid => "hybrid",
        })
    }
}

/// A decode-time KV cache over the layer slots of one model (object safe).
///
/// # Protocol
/// A request is [`start`](DecodeCache::start)ed, then each of its tokens, at every slot it
/// reaches in execution order, calls [`append`](DecodeCache::append) when
/// [`writes`](DecodeCache::writes) says so and then attends over
/// [`view`](DecodeCache::view) (the token's own entry included). Positions of one
/// (request, slot) must be strictly increasing. [`end`](DecodeCache::end) frees every block
/// of the request.
///
/// # Errors
/// Unknown requests, slots out of range, appends to slots that do not store, positions out
/// of order and K/V rows of the wrong length are [`Error::Invalid`]; no method panics. When
/// the pool has no free block, `append` returns [`Error::Exhausted`] and leaves the cache
/// unchanged (back-pressure: retry after another request ends).
///
/// # Examples
/// One block layer run twice under recursive sharing: step 2 stores nothing and reads the
/// step-1 entries.
/// ```
/// use mor_core::plan::{RecursionPlan, Segment, Slot};
/// use mor_kvcache::{attend, DecodeCache, DecodeCacheSpec, KvPolicy, RecursiveSharing};
///
/// let slots = (1..=2).map(|step| Slot { block: 0, segment: Segment::Recursion { step, layer: 0 } }).collect();
/// let plan = RecursionPlan {
///     strategy: "cycle".into(), num_recursions: 2, base_depth: 1, num_blocks: 1,
///     requested_layers: 2, depth_fix: Default::default(), slots,
/// };
/// let spec = DecodeCacheSpec { plan, num_kv_heads: 1, head_dim: 2, block_tokens: 16, max_blocks: 8 };
/// let mut cache = RecursiveSharing::new(2)?.new_decode_cache(&spec)?;
/// cache.start(7)?;
/// cache.append(7, 0, 0, &[1.0, 0.0], &[1.0, 2.0])?; // token 0 at step 1
/// assert!(!cache.writes(1));
/// let out = attend(&cache.view(7, 1)?, &[1.0, 0.0], 0, 1, 1.0 / 2f32.sqrt())?;
/// assert_eq!(out, vec![1.0, 2.0]);
/// assert_eq!(cache.bytes_stored(), 2 * 2 * 4);
/// cache.end(7)?;
/// # Ok::<(), mor_kvcache::Error>(())
/// ```
pub trait DecodeCache: Send + Sync + fmt::Debug {
    /// Name of the policy that built the cache.
    fn policy(&self) -> &'static str;
    /// The decode behaviour.
    fn mode(&self) -> DecodeMode;
    /// Number of layer slots (`plan.slots.len()`).
    fn num_slots(&self) -> usize;
    /// Whether a token reaching `slot` appends its K/V there (`false` for a slot out of
    /// range).
    fn writes(&self, slot: usize) -> bool;
    /// The slot whose entries a query at `slot` reads (itself, or the step-1 slot of the
    /// same block layer under sharing and hybrid); `None` for a slot out of range.
    fn source_slot(&self, slot: usize) -> Option<usize>;
    /// Starts request `req`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `req` is already active.
    fn start(&mut self, req: u64) -> Result<()>;
    /// Ends request `req`, returning all its blocks to the pool.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `req` is not active.
    fn end(&mut self, req: u64) -> Result<()>;
    /// Whether `req` is active.
    fn is_active(&self, req: u64) -> bool;
    /// Stores the K/V of the token at position `pos` of `req` in `slot`.
    ///
    /// # Shapes
    /// `k, v: [hkv · dh]` (head-major: head `g` is `k[g·dh .. (g+1)·dh]`), RoPE applied.
    ///
    /// # Errors
    /// [`Error::Invalid`] (see the trait docs; under hybrid also when `pos` was not stored
    /// at the step-1 slot of the same layer), [`Error::Exhausted`] when a new block is
    /// needed and none is free.
    fn append(&mut self, req: u64, slot: usize, pos: u32, k: &[f32], v: &[f32]) -> Result<()>;
    /// New blocks that appending one token of `req` to each of `slots` would take now.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown request or a slot out of range.
    fn blocks_needed(&self, req: u64, slots: &[usize]) -> Result<usize>;
    /// The keys and values a query of `req` at `slot` attends to, in position order.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown request or a slot out of range.
    fn view(&self, req: u64, slot: usize) -> Result<KvView<'_>>;
    /// Blocks not in use.
    fn free_blocks(&self) -> usize;
    /// Blocks in the pool.
    fn total_blocks(&self) -> usize;
    /// Bytes of one block (K and V, 4 bytes per element in f32, 2 in bf16).
    fn block_bytes(&self) -> usize;
    /// Bytes of blocks in use (`blocks in use × block bytes`).
    fn bytes_used(&self) -> usize;
    /// Bytes of the whole pool.
    fn bytes_reserved(&self) -> usize;
    /// K/V entries stored (one per token and writing slot).
    fn tokens_stored(&self) -> usize;
    /// Exact bytes of the stored entries: `tokens_stored × 2 × hkv × dh × e` (`e` = 4 in
    /// f32, 2 in bf16).
    fn bytes_stored(&self) -> usize;
    /// Ends every request and frees every block.
    fn release_all(&mut self);
    /// The cache as [`Any`](std::any::Any), for a caller that knows its concrete type (the
    /// inference engine reaches its device-resident cache this way); `None` by default.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// How K and V are stored ([`KvPrecision::F32`] unless set).
    fn kv_precision(&self) -> KvPrecision {
        KvPrecision::F32
    }
    /// Stores K and V in `precision` from now on (attention arithmetic stays f32). Only on
    /// an empty cache: the pool is reallocated with the same number of blocks, so
    /// [`block_bytes`](DecodeCache::block_bytes) and the byte counts follow `precision`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the cache holds a request, or when this cache does not
    /// support `precision` (the default implementation supports only
    /// [`KvPrecision::F32`]).
    fn set_kv_precision(&mut self, precision: KvPrecision) -> Result<()> {
        if precision == KvPrecision::F32 {
            Ok(())
        } else {
            Err(Error::Invalid {
                policy: self.policy(),
                msg: format!("this decode cache stores K/V in f32 only, not {precision}"),
            })
        }
    }
}
