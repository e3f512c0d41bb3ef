//! `strided_kv`: recursion-wise caching plus strided step-1 "landmark" keys and values.
//!
//! Recursion-wise caching (spec §4) lets the queries of step r see only the tokens that
//! reached step r; recursive sharing lets them see the step-1 K/V of every earlier token.
//! `strided_kv` sits between the two. With stride `s`, the positions `p` with
//! `p mod s == 0` are *landmarks*, and the queries of step `r >= 2` attend, causally by
//! position, to
//! - the step-1 K/V of every landmark, and
//! - the fresh step-r K/V of every other token that reached step r.
//!
//! A landmark always shows its step-1 K/V, also when it reached step r itself. Step 1 is
//! plain causal attention over every token, as in the other policies.
//!
//! ```text
//! positions     0  1  2  3  4  5  6  7  8      (s = 4, tokens 1, 2, 4, 6 reach step 2)
//! step-2 keys   L  2  2  .  L  .  2  .  L      L: step-1 K/V of a landmark; 2: step-2 K/V
//! ```
//!
//! `stride = 1` makes every position a landmark, which is recursive KV sharing (and the
//! policy then projects no K/V after step 1); `stride = 0` means no landmarks, which is
//! recursion-wise caching. Both equalities are tested against the built-in policies.
//!
//! # Decode
//! [`StridedCache`] is the decode cache for `stride >= 2`: every slot stores the K/V of the
//! tokens that reach it, and a step-r slot also receives a copy of each landmark's step-1
//! K/V, taken from the step-1 slot of the same block layer just before the first later
//! position is appended there. `stride` 0 and 1 use the built-in [`PagedCache`] in
//! recursion-wise and sharing mode.

use candle_core::{DType, Tensor};
use mor_core::plan::Segment;
use mor_core::registry::{AccountingHints, CheckCtx, Family, Plugin};
use mor_kvcache::decode::Page;
use mor_kvcache::policies::cost_capacities;
use mor_kvcache::{
    BlockPool, DecodeCache, DecodeCacheSpec, DecodeMode, Error, KvCost, KvCtx, KvPolicy,
    KvPolicyPlugin, KvView, PagedCache, RecursionWise, RecursiveSharing, Result, StepKv,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

const NAME: &str = "strided_kv";

/// The position value that marks padding in position tensors (`mor_kernels::PAD_POS`).
const PAD_POS: u32 = u32::MAX;

/// Whether position `p` is a multiple of `stride` (never, for stride 0).
fn on_stride(p: u32, stride: usize) -> bool {
    (p as usize).checked_rem(stride) == Some(0)
}

/// Parameters of `strided_kv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StridedKvParams {
    /// Every `stride`-th position (0, s, 2s, ...) is a landmark; 1 gives recursive
    /// sharing, 0 gives recursion-wise caching.
    pub stride: usize,
}

impl Default for StridedKvParams {
    fn default() -> Self {
        StridedKvParams { stride: 4 }
    }
}

/// The `strided_kv` policy (see the module docs).
#[derive(Debug, Clone)]
pub struct StridedKv {
    num_recursions: usize,
    stride: usize,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid {
        policy: NAME,
        msg: msg.into(),
    }
}

impl StridedKv {
    /// The policy for `N_r` steps with landmarks every `stride` positions.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `num_recursions` is 0.
    pub fn new(num_recursions: usize, stride: usize) -> Result<Self> {
        if num_recursions == 0 {
            return Err(invalid("num_recursions must be >= 1"));
        }
        Ok(StridedKv {
            num_recursions,
            stride,
        })
    }

    /// The landmark stride.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Whether position `p` is a landmark.
    pub fn is_landmark(&self, p: u32) -> bool {
        p != PAD_POS && on_stride(p, self.stride)
    }

    /// Checks the step and the presence of `fresh` and `first` against the contract of
    /// [`KvPolicy::training_kv`].
    fn check_inputs(&self, step: usize, fresh: bool, first: bool) -> Result<()> {
        if step == 0 || step > self.num_recursions {
            return Err(invalid(format!(
                "step {step} is out of range 1..={}",
                self.num_recursions
            )));
        }
        let want_fresh = self.projects_kv(step);
        let want_first = self.keeps_first_step() && step >= 2;
        if want_fresh != fresh {
            return Err(invalid(format!(
                "step {step}: fresh K/V {} (this policy {} K/V at step {step})",
                if fresh { "given" } else { "missing" },
                if want_fresh {
                    "projects"
                } else {
                    "does not project"
                }
            )));
        }
        if want_first != first {
            return Err(invalid(format!(
                "step {step}: the step-1 K/V (`first`) is {}",
                if first {
                    "given, but this step reads no step-1 K/V (it would read a step never written)"
                } else {
                    "missing; it must be kept at step 1 and passed at every later step"
                }
            )));
        }
        Ok(())
    }
}

/// The dimensions `(b, hkv, n, dh)` of `kv`, after checking that `v` and `pos` agree.
fn kv_dims(what: &str, kv: &StepKv) -> Result<(usize, usize, usize, usize)> {
    let (b, h, n, dh) = kv.k.dims4().map_err(|_| {
        invalid(format!(
            "{what}.k must be [b, hkv, n, dh], got {:?}",
            kv.k.dims()
        ))
    })?;
    if kv.v.dims() != [b, h, n, dh] {
        return Err(invalid(format!(
            "{what}.v is {:?} but {what}.k is {:?}",
            kv.v.dims(),
            kv.k.dims()
        )));
    }
    if kv.pos.dims() != [b, n] || kv.pos.dtype() != DType::U32 {
        return Err(invalid(format!(
            "{what}.pos must be u32 [{b}, {n}], got {:?} {:?}",
            kv.pos.dtype(),
            kv.pos.dims()
        )));
    }
    Ok((b, h, n, dh))
}

impl Plugin for StridedKv {
    const FAMILY: Family = Family::KvPolicy;
    const NAME: &'static str = NAME;
    const DESCRIPTION: &'static str =
        "recursion-wise caching plus the step-1 K/V of every stride-th position (an example plugin)";
    type Params = StridedKvParams;

    /// With `stride = 1` the later steps project no K/V and attend over the full cached
    /// context (spec §1.4); otherwise every step projects.
    fn accounting(params: &StridedKvParams, _ctx: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: None,
            kv_sharing: params.stride == 1,
            ..Default::default()
        }
    }
}

impl KvPolicyPlugin for StridedKv {
    fn build(params: StridedKvParams, ctx: &KvCtx) -> Result<Self> {
        Self::new(ctx.num_recursions, params.stride)
    }
}

mor_kvcache::register_kv_policy!(StridedKv);

impl KvPolicy for StridedKv {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Step 1 always projects; later steps project unless every position is a landmark.
    fn projects_kv(&self, step: usize) -> bool {
        step == 1 || self.stride != 1
    }

    fn keeps_first_step(&self) -> bool {
        self.stride != 0
    }

    /// Step 1 returns `fresh`. A later step returns, per row in position order, the
    /// step-1 entries of `first` at landmark positions and the `fresh` entries at the
    /// other selected positions, padded at the end with entries at the padding position
    /// `u32::MAX`. The rows of `first` and `fresh` are stacked and one `index_select` picks
    /// every output row, so the result is differentiable with respect to both.
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv> {
        self.check_inputs(step, fresh.is_some(), first.is_some())?;
        let (sb, sn) = match (selected.dims(), selected.dtype()) {
            (&[b, n], DType::U32) => (b, n),
            (d, t) => {
                return Err(invalid(format!(
                    "selected must be u32 [b, n], got {t:?} {d:?}"
                )))
            }
        };
        if let Some(f) = fresh {
            let (b, _, n, _) = kv_dims("fresh", f)?;
            if (b, n) != (sb, sn) {
                return Err(invalid(format!(
                    "fresh holds [{b}, {n}] tokens but selected is [{sb}, {sn}]"
                )));
            }
        }
        let (fresh, first) = match (fresh, first) {
            // Step 1, or no landmarks: the tokens of this step only.
            (Some(f), None) => return Ok(f.clone()),
            // Every position is a landmark: the step-1 K/V of the whole sequence.
            (None, Some(first)) => {
                if kv_dims("first", first)?.0 != sb {
                    return Err(invalid("first and selected have different batch sizes"));
                }
                return Ok(first.clone());
            }
            (Some(fresh), Some(first)) => (fresh, first),
            (None, None) => return Err(invalid(format!("step {step}: no K/V to attend to"))),
        };
        let (b, hkv, l, dh) = kv_dims("first", first)?;
        let (fb, fh, n, fdh) = kv_dims("fresh", fresh)?;
        if (fb, fh, fdh) != (b, hkv, dh) {
            return Err(invalid(format!(
                "fresh is {:?} but first is {:?}",
                fresh.k.dims(),
                first.k.dims()
            )));
        }
        let first_pos = first.pos.to_vec2::<u32>()?;
        let fresh_pos = fresh.pos.to_vec2::<u32>()?;
        if fresh_pos != selected.to_vec2::<u32>()? {
            return Err(invalid(
                "fresh.pos differs from selected: fresh K/V must belong to the selected tokens",
            ));
        }
        // Stacked rows: `first` at 0..b·l, `fresh` at b·l..b·l + b·n.
        if u32::try_from(b * l + b * n).is_err() {
            return Err(invalid("too many K/V rows for u32 indices"));
        }
        let mut rows: Vec<Vec<(u32, u32)>> = Vec::with_capacity(b);
        for bi in 0..b {
            let mut row: Vec<(u32, u32)> = first_pos[bi]
                .iter()
                .enumerate()
                .filter(|(_, &p)| self.is_landmark(p))
                .map(|(j, &p)| (p, (bi * l + j) as u32))
                .collect();
            row.extend(
                fresh_pos[bi]
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| p != PAD_POS && !self.is_landmark(p))
                    .map(|(i, &p)| (p, (b * l + bi * n + i) as u32)),
            );
            row.sort_unstable();
            if row.windows(2).any(|w| w[0].0 == w[1].0) {
                return Err(invalid(format!(
                    "row {bi}: a position appears twice among the landmarks and the selected tokens"
                )));
            }
            rows.push(row);
        }
        let m = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut map = Vec::with_capacity(b * m);
        let mut pos = Vec::with_capacity(b * m);
        for row in &rows {
            for &(p, r) in row {
                pos.push(p);
                map.push(r);
            }
            // Padding reads any row; its position hides it from every query.
            for _ in row.len()..m {
                pos.push(PAD_POS);
                map.push(0);
            }
        }
        let dev = first.k.device();
        let map = Tensor::from_vec(map, b * m, dev)?;
        let pick = |a: &Tensor, f: &Tensor| -> Result<Tensor> {
            let ra = a
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * l, hkv * dh))?;
            let rf = f
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * n, hkv * dh))?;
            Ok(Tensor::cat(&[&ra, &rf], 0)?
                .index_select(&map, 0)?
                .reshape((b, m, hkv, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        Ok(StepKv {
            k: pick(&first.k, &fresh.k)?,
            v: pick(&first.v, &fresh.v)?,
            pos: Tensor::from_vec(pos, (b, m), dev)?,
        })
    }

    /// Relative costs (spec §4 table, recursion blocks only). With `λ = 1/stride` and a
    /// step-r key fraction `κ_r = λ + cap_r·(1 − λ)` (landmarks plus the other tokens of
    /// step r): memory and IO `(1 + Σ_{r≥2} κ_r)/N_r`, attention FLOPs of step r
    /// `cap_r·κ_r` (step 1: 1). `stride` 0 and 1 report the built-in recursion-wise and
    /// sharing costs.
    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost {
        let n = num_recursions.max(1);
        match self.stride {
            0 => {
                if let Ok(p) = RecursionWise::new(n) {
                    return p.cost(num_recursions, caps);
                }
            }
            1 => {
                if let Ok(p) = RecursiveSharing::new(n) {
                    return p.cost(num_recursions, caps);
                }
            }
            _ => {}
        }
        let caps = cost_capacities(num_recursions, caps);
        let lambda = 1.0 / self.stride as f64;
        let kappa: Vec<f64> = caps
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                if i == 0 {
                    1.0
                } else {
                    lambda + c * (1.0 - lambda)
                }
            })
            .collect();
        let mem = kappa.iter().sum::<f64>() / caps.len() as f64;
        KvCost {
            memory_ratio: mem,
            io_ratio: mem,
            attn_flops_ratio: caps
                .iter()
                .zip(&kappa)
                .enumerate()
                .map(|(i, (&c, &k))| if i == 0 { 1.0 } else { c * k })
                .collect(),
        }
    }

    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        match self.stride {
            0 => Ok(Box::new(PagedCache::new(
                NAME,
                DecodeMode::RecursionWise,
                spec,
            )?)),
            1 => Ok(Box::new(PagedCache::new(NAME, DecodeMode::Sharing, spec)?)),
            s => Ok(Box::new(StridedCache::new(s, spec)?)),
        }
    }
}

/// What one slot of a [`StridedCache`] does.
#[derive(Debug, Clone, Copy)]
struct SlotRule {
    segment: Segment,
    /// For a slot of step `r >= 2`: the step-1 slot of the same block layer, whose landmark
    /// entries are copied here.
    landmarks_from: Option<usize>,
}

/// The pages of one request, and per slot how many entries of its landmark source have
/// been scanned already.
#[derive(Debug)]
struct Request {
    pages: Vec<Page>,
    scanned: Vec<usize>,
}

/// The decode cache of `strided_kv` with `stride >= 2` (see the module docs).
///
/// Every slot stores the K/V of the tokens that reach it and reads its own page
/// ([`DecodeCache::source_slot`] is the slot itself); the page of a step-r slot also holds
/// copies of the landmark step-1 entries. Like hybrid sharing it stores at every slot and
/// reads step-1 K/V at later steps, so every token must run step 1:
/// [`DecodeCache::mode`] reports [`DecodeMode::Hybrid`], which is how an inference engine
/// learns that constraint.
/// Appending a landmark token at a later slot stores nothing new: its step-1 copy is its
/// entry there. [`DecodeCache::blocks_needed`] is an upper bound (it counts pending
/// landmark copies as if the token were a landmark).
///
/// # Examples
/// ```
/// use mor_core::plan::{RecursionPlan, Segment, Slot};
/// use mor_example_entropy_router::StridedKv;
/// use mor_kvcache::{DecodeCacheSpec, KvPolicy};
///
/// let slots = (1..=2).map(|step| Slot { block: 0, segment: Segment::Recursion { step, layer: 0 } }).collect();
/// let plan = RecursionPlan {
///     strategy: "cycle".into(), num_recursions: 2, base_depth: 1, num_blocks: 1,
///     requested_layers: 2, depth_fix: Default::default(), slots,
/// };
/// let spec = DecodeCacheSpec { plan, num_kv_heads: 1, head_dim: 1, block_tokens: 4, max_blocks: 8 };
/// let mut cache = StridedKv::new(2, 2)?.new_decode_cache(&spec)?;
/// cache.start(0)?;
/// for p in 0..5u32 {
///     cache.append(0, 0, p, &[p as f32], &[p as f32])?; // step 1: every token
///     if p % 2 == 1 {
///         cache.append(0, 1, p, &[10.0], &[10.0])?; // odd tokens reach step 2
///     }
/// }
/// // Step 2 sees landmarks 0 and 2 (step-1 K/V) and tokens 1 and 3 (step-2 K/V); landmark
/// // 4 is copied when a later position reaches step 2.
/// let keys: Vec<(u32, f32)> = cache.view(0, 1)?.iter().map(|t| (t.pos, t.k[0])).collect();
/// assert_eq!(keys, [(0, 0.0), (1, 10.0), (2, 2.0), (3, 10.0)]);
/// # Ok::<(), mor_kvcache::Error>(())
/// ```
#[derive(Debug)]
pub struct StridedCache {
    stride: usize,
    rules: Vec<SlotRule>,
    pool: BlockPool,
    reqs: HashMap<u64, Request>,
    num_kv_heads: usize,
}

impl StridedCache {
    /// A cache with landmarks every `stride` positions for the slots of `spec.plan`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `stride < 2`, when `num_kv_heads`, `head_dim` or
    /// `block_tokens` is 0, when a slot has step 0, when a block layer has two step-1 slots
    /// or a later step of a layer has no step-1 slot, or when the pool cannot be allocated.
    pub fn new(stride: usize, spec: &DecodeCacheSpec) -> Result<Self> {
        if stride < 2 {
            return Err(invalid(format!(
                "StridedCache needs stride >= 2, got {stride} (0 and 1 use PagedCache)"
            )));
        }
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
                    return Err(invalid(format!("slot {i} has recursion step 0")))
                }
                Segment::Recursion { step: 1, layer } => {
                    if let Some(o) = first_of_layer.insert(layer, i) {
                        return Err(invalid(format!(
                            "slots {o} and {i} are both step 1 of block layer {layer}"
                        )));
                    }
                }
                _ => {}
            }
        }
        let rules = slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let landmarks_from = match s.segment {
                    Segment::Recursion { step, layer } if step >= 2 => {
                        Some(*first_of_layer.get(&layer).ok_or_else(|| {
                            invalid(format!(
                                "slot {i} (step {step}, layer {layer}) needs the landmarks of a step-1 \
                                 slot of layer {layer}, but the plan has none"
                            ))
                        })?)
                    }
                    _ => None,
                };
                Ok(SlotRule {
                    segment: s.segment,
                    landmarks_from,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StridedCache {
            stride,
            rules,
            pool: BlockPool::new(spec.block_tokens, spec.row(), spec.max_blocks)?,
            reqs: HashMap::new(),
            num_kv_heads: spec.num_kv_heads,
        })
    }

    fn rule(&self, slot: usize) -> Result<SlotRule> {
        self.rules.get(slot).copied().ok_or_else(|| {
            invalid(format!(
                "slot {slot} is out of range (the plan has {} slots)",
                self.rules.len()
            ))
        })
    }

    fn request(&self, req: u64) -> Result<&Request> {
        self.reqs
            .get(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))
    }

    /// Blocks that `extra` more entries in `page` take.
    fn blocks_for(&self, page: &Page, extra: usize) -> usize {
        let bt = self.pool.block_tokens();
        (page.len() + extra).div_ceil(bt) - page.len().div_ceil(bt)
    }

    /// The landmark entries of the source page not scanned yet with position `<= pos`
    /// (copied out of the pool), and how many source entries that scan covers.
    fn pending(
        &self,
        r: &Request,
        src: usize,
        from: usize,
        pos: u32,
    ) -> Result<(Vec<(u32, Vec<f32>, Vec<f32>)>, usize)> {
        let view = self.pool.view(&r.pages[src], self.num_kv_heads)?;
        let mut out = Vec::new();
        let mut scanned = from;
        for t in view.iter().skip(from) {
            if t.pos > pos {
                break;
            }
            scanned += 1;
            if on_stride(t.pos, self.stride) {
                out.push((t.pos, t.k.to_vec(), t.v.to_vec()));
            }
        }
        Ok((out, scanned))
    }
}

impl DecodeCache for StridedCache {
    fn policy(&self) -> &'static str {
        NAME
    }

    fn mode(&self) -> DecodeMode {
        DecodeMode::Hybrid
    }

    fn num_slots(&self) -> usize {
        self.rules.len()
    }

    fn writes(&self, slot: usize) -> bool {
        slot < self.rules.len()
    }

    fn source_slot(&self, slot: usize) -> Option<usize> {
        (slot < self.rules.len()).then_some(slot)
    }

    fn start(&mut self, req: u64) -> Result<()> {
        if self.reqs.contains_key(&req) {
            return Err(invalid(format!("request {req} is already active")));
        }
        let n = self.rules.len();
        self.reqs.insert(
            req,
            Request {
                pages: vec![Page::new(); n],
                scanned: vec![0; n],
            },
        );
        Ok(())
    }

    fn end(&mut self, req: u64) -> Result<()> {
        let mut r = self
            .reqs
            .remove(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))?;
        for p in &mut r.pages {
            self.pool.release(p);
        }
        Ok(())
    }

    fn is_active(&self, req: u64) -> bool {
        self.reqs.contains_key(&req)
    }

    fn append(&mut self, req: u64, slot: usize, pos: u32, k: &[f32], v: &[f32]) -> Result<()> {
        let rule = self.rule(slot)?;
        let row = self.pool.row();
        if k.len() != row || v.len() != row {
            return Err(invalid(format!(
                "k and v must hold hkv·dh = {row} floats, got {} and {}",
                k.len(),
                v.len()
            )));
        }
        if pos == PAD_POS {
            return Err(invalid(format!("position {pos} is reserved for padding")));
        }
        let r = self.request(req)?;
        let page = &r.pages[slot];
        if let Some(last) = self.pool.last_pos(page) {
            if pos <= last {
                return Err(invalid(format!(
                    "request {req}, slot {slot}: position {pos} is not after the last stored position {last}"
                )));
            }
        }
        let landmark = on_stride(pos, self.stride);
        let (copies, scanned) = match rule.landmarks_from {
            Some(src) => self.pending(r, src, r.scanned[slot], pos)?,
            None => (Vec::new(), 0),
        };
        if rule.landmarks_from.is_some() && landmark && copies.last().map(|c| c.0) != Some(pos) {
            return Err(invalid(format!(
                "request {req}, slot {slot} ({:?}): landmark position {pos} has no step-1 K/V yet; \
                 a token stores step 1 before later steps",
                rule.segment
            )));
        }
        let own = !(rule.landmarks_from.is_some() && landmark);
        let needed = self.blocks_for(page, copies.len() + usize::from(own));
        if needed > self.pool.free_blocks() {
            return Err(Error::Exhausted {
                needed,
                free: self.pool.free_blocks(),
                total: self.pool.total_blocks(),
            });
        }
        let r = self
            .reqs
            .get_mut(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))?;
        for (p, ck, cv) in &copies {
            self.pool.push(&mut r.pages[slot], *p, ck, cv)?;
        }
        if own {
            self.pool.push(&mut r.pages[slot], pos, k, v)?;
        }
        if rule.landmarks_from.is_some() {
            r.scanned[slot] = scanned;
        }
        Ok(())
    }

    fn blocks_needed(&self, req: u64, slots: &[usize]) -> Result<usize> {
        let r = self.request(req)?;
        let mut n = 0;
        for &s in slots {
            let rule = self.rule(s)?;
            let extra = match rule.landmarks_from {
                Some(src) => {
                    let (copies, _) = self.pending(r, src, r.scanned[s], PAD_POS - 1)?;
                    copies.len() + 1
                }
                None => 1,
            };
            n += self.blocks_for(&r.pages[s], extra);
        }
        Ok(n)
    }

    fn view(&self, req: u64, slot: usize) -> Result<KvView<'_>> {
        self.rule(slot)?;
        let r = self.request(req)?;
        self.pool.view(&r.pages[slot], self.num_kv_heads)
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
        for (_, mut r) in self.reqs.drain() {
            for p in &mut r.pages {
                self.pool.release(p);
            }
        }
    }
}

#[cfg(test)]
#[path = "kv_tests.rs"]
mod tests;
