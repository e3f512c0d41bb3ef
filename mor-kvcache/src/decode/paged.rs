//! [`PagedCache`]: the built-in [`DecodeCache`] over a [`BlockPool`].

use super::{BlockPool, DecodeCache, DecodeCacheSpec, DecodeMode, KvPrecision, KvView, Page};
use crate::{Error, Result};
use mor_core::plan::Segment;
use std::collections::HashMap;

/// What a slot does: whether it stores, which slot's page is the base of its view, and
/// whether its own page overlays that base (hybrid, steps >= 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotRule {
    writes: bool,
    base: usize,
    overlay: bool,
    segment: Segment,
}

/// The paged decode cache of the three built-in modes.
///
/// Every active request has one [`Page`] per slot (empty for slots that do not store); all
/// pages draw blocks from one [`BlockPool`] allocated up front.
#[derive(Debug)]
pub struct PagedCache {
    policy: &'static str,
    mode: DecodeMode,
    rules: Vec<SlotRule>,
    pool: BlockPool,
    reqs: HashMap<u64, Vec<Page>>,
    num_kv_heads: usize,
    head_dim: usize,
}

impl PagedCache {
    /// A cache in `mode` for the slots of `spec.plan`, reported under the name `policy`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `num_kv_heads`, `head_dim` or `block_tokens` is 0, when a slot
    /// has recursion step 0, when (sharing and hybrid) a slot of step `r >= 2` and layer `j`
    /// has no step-1 slot of layer `j` to read or layer `j` has two step-1 slots, or when the
    /// pool cannot be allocated.
    pub fn new(policy: &'static str, mode: DecodeMode, spec: &DecodeCacheSpec) -> Result<Self> {
        let invalid = |msg: String| Error::Invalid { policy, msg };
        if spec.num_kv_heads == 0 || spec.head_dim == 0 || spec.block_tokens == 0 {
            return Err(invalid(format!(
                "num_kv_heads ({}), head_dim ({}) and block_tokens ({}) must be >= 1",
                spec.num_kv_heads, spec.head_dim, spec.block_tokens
            )));
        }
        let slots = &spec.plan.slots;
        let mut first_of_layer: HashMap<usize, usize> = HashMap::new();
        for (i, s) in slots.iter().enumerate() {
            match s.segment {
                Segment::Recursion { step: 0, .. } => {
                    return Err(invalid(format!(
                        "slot {i} has recursion step 0 (steps are 1-based)"
                    )));
                }
                Segment::Recursion { step: 1, layer } => {
                    if let Some(other) = first_of_layer.insert(layer, i) {
                        return Err(invalid(format!(
                            "slots {other} and {i} are both step 1 of block layer {layer}"
                        )));
                    }
                }
                _ => {}
            }
        }
        let mut rules = Vec::with_capacity(slots.len());
        for (i, s) in slots.iter().enumerate() {
            let shared = mode != DecodeMode::RecursionWise;
            let base = match s.segment {
                Segment::Recursion { step, layer } if step >= 2 && shared => {
                    *first_of_layer.get(&layer).ok_or_else(|| {
                        invalid(format!(
                            "slot {i} (step {step}, layer {layer}) reads the step-1 K/V of layer {layer} under {mode}, \
                             but the plan has no step-1 slot for that layer"
                        ))
                    })?
                }
                _ => i,
            };
            rules.push(SlotRule {
                writes: mode.writes(s.segment),
                base,
                overlay: mode == DecodeMode::Hybrid && base != i,
                segment: s.segment,
            });
        }
        let pool = BlockPool::new(spec.block_tokens, spec.row(), spec.max_blocks)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(PagedCache {
            policy,
            mode,
            rules,
            pool,
            reqs: HashMap::new(),
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
        })
    }

    /// A plain per-layer cache for a vanilla model of `num_layers` layers (see
    /// [`DecodeCacheSpec::vanilla`]).
    ///
    /// # Errors
    /// As [`PagedCache::new`].
    pub fn vanilla(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_tokens: usize,
        max_blocks: usize,
    ) -> Result<Self> {
        let spec =
            DecodeCacheSpec::vanilla(num_layers, num_kv_heads, head_dim, block_tokens, max_blocks);
        Self::new("vanilla", DecodeMode::RecursionWise, &spec)
    }

    /// The block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    fn invalid(&self, msg: String) -> Error {
        Error::Invalid {
            policy: self.policy,
            msg,
        }
    }

    fn rule(&self, slot: usize) -> Result<SlotRule> {
        self.rules.get(slot).copied().ok_or_else(|| {
            self.invalid(format!(
                "slot {slot} is out of range (the plan has {} slots)",
                self.rules.len()
            ))
        })
    }

    fn pages(&self, req: u64) -> Result<&Vec<Page>> {
        self.reqs
            .get(&req)
            .ok_or_else(|| self.invalid(format!("request {req} is not active")))
    }

    fn describe(segment: Segment) -> String {
        match segment {
            Segment::Prelude => "prelude".to_string(),
            Segment::Coda => "coda".to_string(),
            Segment::Recursion { step, layer } => format!("step {step}, layer {layer}"),
        }
    }
}

impl DecodeCache for PagedCache {
    fn policy(&self) -> &'static str {
        self.policy
    }

    fn mode(&self) -> DecodeMode {
        self.mode
    }

    fn num_slots(&self) -> usize {
        self.rules.len()
    }

    fn writes(&self, slot: usize) -> bool {
        self.rules.get(slot).is_some_and(|r| r.writes)
    }

    fn source_slot(&self, slot: usize) -> Option<usize> {
        self.rules.get(slot).map(|r| r.base)
    }

    fn kv_precision(&self) -> KvPrecision {
        self.pool.precision()
    }

    fn set_kv_precision(&mut self, precision: KvPrecision) -> Result<()> {
        if precision == self.pool.precision() {
            return Ok(());
        }
        if !self.reqs.is_empty() {
            return Err(self.invalid(format!(
                "cannot change the K/V precision to {precision} while {} request(s) are active",
                self.reqs.len()
            )));
        }
        let pool = BlockPool::with_precision(
            self.pool.block_tokens(),
            self.pool.row(),
            self.pool.total_blocks(),
            precision,
        )
        .map_err(|e| self.invalid(e.to_string()))?;
        self.pool = pool;
        Ok(())
    }

    fn start(&mut self, req: u64) -> Result<()> {
        if self.reqs.contains_key(&req) {
            return Err(self.invalid(format!("request {req} is already active")));
        }
        self.reqs.insert(req, vec![Page::new(); self.rules.len()]);
        Ok(())
    }

    fn end(&mut self, req: u64) -> Result<()> {
        let mut pages = self
            .reqs
            .remove(&req)
            .ok_or_else(|| self.invalid(format!("request {req} is not active")))?;
        for p in &mut pages {
            self.pool.release(p);
        }
        Ok(())
    }

    fn is_active(&self, req: u64) -> bool {
        self.reqs.contains_key(&req)
    }

    fn append(&mut self, req: u64, slot: usize, pos: u32, k: &[f32], v: &[f32]) -> Result<()> {
        let rule = self.rule(slot)?;
        if !rule.writes {
            return Err(self.invalid(format!(
                "slot {slot} ({}) stores no K/V under {}: it reads slot {}",
                Self::describe(rule.segment),
                self.mode,
                rule.base
            )));
        }
        let row = self.pool.row();
        if k.len() != row || v.len() != row {
            return Err(self.invalid(format!(
                "k and v must hold hkv·dh = {}·{} = {row} floats, got {} and {}",
                self.num_kv_heads,
                self.head_dim,
                k.len(),
                v.len()
            )));
        }
        if pos == mor_kernels::PAD_POS {
            return Err(self.invalid(format!("position {pos} is reserved for padding")));
        }
        let pages = self
            .reqs
            .get(&req)
            .ok_or_else(|| self.invalid(format!("request {req} is not active")))?;
        if let Some(last) = self.pool.last_pos(&pages[slot]) {
            if pos <= last {
                return Err(self.invalid(format!(
                    "request {req}, slot {slot}: position {pos} is not after the last stored position {last}"
                )));
            }
        }
        if rule.overlay && !self.pool.contains_pos(&pages[rule.base], pos) {
            return Err(self.invalid(format!(
                "request {req}, slot {slot} ({}): position {pos} has no step-1 K/V in slot {}; under hybrid a token \
                 stores step r only after step 1",
                Self::describe(rule.segment),
                rule.base
            )));
        }
        let pages = self.reqs.get_mut(&req).ok_or_else(|| Error::Invalid {
            policy: self.policy,
            msg: format!("request {req} is not active"),
        })?;
        self.pool.push(&mut pages[slot], pos, k, v)
    }

    fn blocks_needed(&self, req: u64, slots: &[usize]) -> Result<usize> {
        let pages = self.pages(req)?;
        let mut n = 0;
        for &s in slots {
            let rule = self.rule(s)?;
            if rule.writes && self.pool.needs_block(&pages[s]) {
                n += 1;
            }
        }
        Ok(n)
    }

    fn view(&self, req: u64, slot: usize) -> Result<KvView<'_>> {
        let rule = self.rule(slot)?;
        let pages = self.pages(req)?;
        let overlay = rule.overlay.then(|| &pages[slot]);
        Ok(KvView::new(
            &self.pool,
            &pages[rule.base],
            overlay,
            self.num_kv_heads,
            self.head_dim,
        ))
    }

    fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    fn total_blocks(&self) -> usize {
        self.pool.total_blocks()
    }

    fn block_bytes(&self) -> usize {
        self.pool.block_bytes()
    }

    fn bytes_used(&self) -> usize {
        self.pool.bytes_used()
    }

    fn bytes_reserved(&self) -> usize {
        self.pool.bytes_reserved()
    }

    fn tokens_stored(&self) -> usize {
        self.pool.tokens_stored()
    }

    fn bytes_stored(&self) -> usize {
        self.pool.bytes_stored()
    }

    fn release_all(&mut self) {
        for (_, mut pages) in self.reqs.drain() {
            for p in &mut pages {
                self.pool.release(p);
            }
        }
    }
}
