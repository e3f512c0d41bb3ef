//! Built-in KV policies (spec §4): `recursion_wise`, `recursive_sharing` and `hybrid`.
//!
//! Each policy is a small value type holding `N_r`; the training semantics live in
//! [`KvPolicy::training_kv`], the cost table of spec §4 in [`KvPolicy::cost`], and the
//! decode-time behaviour in [`KvPolicy::new_decode_cache`] (a [`PagedCache`] in the matching
//! [`DecodeMode`]).
//!
//! # Cost table
//! Ratios are relative to a vanilla model of the same unrolled depth, recursion blocks only
//! (spec §4, "Relative cost versus vanilla"). With `cap_r` the fraction of tokens that reach
//! step `r`:
//!
//! | | memory | IO | attention FLOPs of step r |
//! |---|---|---|---|
//! | `recursion_wise` | `Σ_r cap_r / N_r` | `Σ_r cap_r / N_r` | `cap_r²` |
//! | `recursive_sharing` | `1 / N_r` | `1` | `cap_r` (step 1: `1`) |
//! | `hybrid` | `Σ_r cap_r / N_r` | `1` | `cap_r` |
//!
//! For the auto schedule `cap_r = (N_r − r + 1)/N_r` the recursion-wise memory is
//! `(N_r + 1)/(2 N_r)` (spec §4, "Derivation"). Sharing and hybrid require every token at
//! step 1, so their step-1 capacity is taken as 1 whatever `caps[0]` says.
//!
//! The hybrid row is derived here (spec §4 gives no numbers for it): its decode cache keeps
//! the step-1 K/V of every token plus, for each later step r, the K/V of the tokens that
//! reached r (the overwrites exist "for that step only", so they need storage of their own);
//! that is the recursion-wise memory. Its queries read one entry per earlier position at
//! every step (step-1 or step-r), as with sharing, so its IO and attention FLOPs are those of
//! sharing.

use crate::decode::{DecodeCache, DecodeCacheSpec, DecodeMode, PagedCache};
use crate::registry::{KvCtx, KvPolicyPlugin};
use crate::{register_kv_policy, Error, KvCost, KvPolicy, Result, StepKv};
use candle_core::{DType, Tensor};
use mor_core::registry::{AccountingHints, CheckCtx, Family, ParamProblem, Plugin};
use mor_kernels::PAD_POS;

/// The (empty) parameters of the built-in KV policies; unknown fields are rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The capacity of step `r` (1-based) of the auto schedule, `(N_r − r + 1)/N_r` (spec §3.1).
pub fn auto_capacity(num_recursions: usize, step: usize) -> f64 {
    let n = num_recursions.max(1) as f64;
    ((n - step as f64 + 1.0) / n).clamp(0.0, 1.0)
}

/// The per-step capacities used by [`KvPolicy::cost`]: `caps[r-1]` where given (clamped to
/// `[0, 1]`, NaN read as 0), the auto schedule of spec §3.1 for steps `caps` does not cover.
/// There are `max(N_r, 1)` of them.
pub fn cost_capacities(num_recursions: usize, caps: &[f64]) -> Vec<f64> {
    let n = num_recursions.max(1);
    (1..=n)
        .map(|r| match caps.get(r - 1) {
            Some(c) if c.is_nan() => 0.0,
            Some(c) => c.clamp(0.0, 1.0),
            None => auto_capacity(n, r),
        })
        .collect()
}

fn invalid(policy: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        policy,
        msg: msg.into(),
    }
}

/// The dimensions `(b, hkv, n, dh)` of a [`StepKv`], after checking that `v` and `pos` agree
/// with `k` and that `pos` is u32.
fn kv_dims(policy: &'static str, what: &str, kv: &StepKv) -> Result<(usize, usize, usize, usize)> {
    let (b, h, n, dh) = kv.k.dims4().map_err(|_| {
        invalid(
            policy,
            format!("{what}.k must be [b, hkv, n, dh], got {:?}", kv.k.dims()),
        )
    })?;
    let (vb, vh, vn, _) = kv.v.dims4().map_err(|_| {
        invalid(
            policy,
            format!("{what}.v must be [b, hkv, n, dh], got {:?}", kv.v.dims()),
        )
    })?;
    if (vb, vh, vn) != (b, h, n) {
        return Err(invalid(
            policy,
            format!(
                "{what}.v is {:?} but {what}.k is {:?}",
                kv.v.dims(),
                kv.k.dims()
            ),
        ));
    }
    if kv.pos.dims() != [b, n] || kv.pos.dtype() != DType::U32 {
        return Err(invalid(
            policy,
            format!(
                "{what}.pos must be u32 [{b}, {n}], got {:?} {:?}",
                kv.pos.dtype(),
                kv.pos.dims()
            ),
        ));
    }
    Ok((b, h, n, dh))
}

/// Checks `selected: [b, n]` (u32).
fn selected_dims(policy: &'static str, selected: &Tensor) -> Result<(usize, usize)> {
    match (selected.dims(), selected.dtype()) {
        (&[b, n], DType::U32) => Ok((b, n)),
        (d, t) => Err(invalid(
            policy,
            format!("selected must be u32 [b, n], got {t:?} {d:?}"),
        )),
    }
}

/// Checks the step range and the presence of `fresh`/`first` against the contract of
/// [`KvPolicy::training_kv`].
fn check_inputs(
    p: &dyn KvPolicy,
    num_recursions: usize,
    step: usize,
    fresh: Option<&StepKv>,
    first: Option<&StepKv>,
) -> Result<()> {
    let name = p.name();
    if step == 0 || step > num_recursions {
        return Err(invalid(
            name,
            format!("step {step} is out of range 1..={num_recursions}"),
        ));
    }
    let want_fresh = p.projects_kv(step);
    let want_first = p.keeps_first_step() && step >= 2;
    match (want_fresh, fresh.is_some()) {
        (true, false) => {
            return Err(invalid(
                name,
                format!("step {step}: fresh K/V missing (this policy projects K/V at step {step})"),
            ))
        }
        (false, true) => {
            return Err(invalid(
                name,
                format!(
                "step {step}: fresh K/V given, but this policy does not project K/V at step {step}"
            ),
            ))
        }
        _ => {}
    }
    match (want_first, first.is_some()) {
        (true, false) => Err(invalid(
            name,
            format!("step {step}: the step-1 K/V (`first`) is missing; it must be kept at step 1 and passed at every later step"),
        )),
        (false, true) if step == 1 => {
            Err(invalid(name, "step 1: `first` given, but step 1 has no earlier step to read (it would read a step never written)"))
        }
        (false, true) => Err(invalid(name, format!("step {step}: `first` given, but this policy does not keep the step-1 K/V"))),
        _ => Ok(()),
    }
}

/// Checks that `kv` has one key per query of `selected` (same `[b, n]`).
fn check_same_tokens(
    policy: &'static str,
    what: &str,
    kv: &StepKv,
    selected: &Tensor,
) -> Result<()> {
    let (b, _, n, _) = kv_dims(policy, what, kv)?;
    let (sb, sn) = selected_dims(policy, selected)?;
    if (b, n) != (sb, sn) {
        return Err(invalid(
            policy,
            format!("{what} holds [{b}, {n}] tokens but selected is [{sb}, {sn}]"),
        ));
    }
    Ok(())
}

/// Recursion-wise caching (spec §4, "Cache", the default): every step projects and stores
/// K/V for the tokens it runs, and its queries attend only to the tokens of the same step,
/// causally by position.
#[derive(Debug, Clone)]
pub struct RecursionWise {
    num_recursions: usize,
}

impl RecursionWise {
    /// The policy for `N_r` steps (`N_r >= 1`).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `num_recursions` is 0.
    pub fn new(num_recursions: usize) -> Result<Self> {
        if num_recursions == 0 {
            return Err(invalid(Self::NAME, "num_recursions must be >= 1"));
        }
        Ok(Self { num_recursions })
    }
}

impl Plugin for RecursionWise {
    const FAMILY: Family = Family::KvPolicy;
    const NAME: &'static str = "recursion_wise";
    const DESCRIPTION: &'static str =
        "recursion-wise caching: each step stores and attends to the K/V of the tokens it runs (spec §4)";
    type Params = NoParams;
}

impl KvPolicyPlugin for RecursionWise {
    fn build(_params: NoParams, ctx: &KvCtx) -> Result<Self> {
        Self::new(ctx.num_recursions)
    }
}

impl KvPolicy for RecursionWise {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn projects_kv(&self, _step: usize) -> bool {
        true
    }

    fn keeps_first_step(&self) -> bool {
        false
    }

    /// Returns `fresh`: queries and keys are the same selected tokens (spec §4, "Training:
    /// exactly the compacted-subsequence attention of §3.1 and §3.2").
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv> {
        check_inputs(self, self.num_recursions, step, fresh, first)?;
        let fresh = fresh.ok_or_else(|| invalid(Self::NAME, "fresh K/V missing"))?;
        check_same_tokens(Self::NAME, "fresh", fresh, selected)?;
        Ok(fresh.clone())
    }

    fn trains_on_fresh_kv(&self, step: usize) -> bool {
        (1..=self.num_recursions).contains(&step)
    }

    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost {
        let caps = cost_capacities(num_recursions, caps);
        let mean = caps.iter().sum::<f64>() / caps.len() as f64;
        KvCost {
            memory_ratio: mean,
            io_ratio: mean,
            attn_flops_ratio: caps.iter().map(|c| c * c).collect(),
        }
    }

    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        Ok(Box::new(PagedCache::new(
            Self::NAME,
            DecodeMode::RecursionWise,
            spec,
        )?))
    }
}

register_kv_policy!(RecursionWise);

/// Recursive KV sharing (spec §4, "Share"): only step 1 projects K/V; every later step's
/// queries attend to the step-1 K/V of the same block layer over the full causal context.
///
/// Every token must run step 1 (`cap_1 = 1`). The policy cannot see router parameters at
/// config-check time, so the model verifies it at run time: it passes `first` only when
/// every token ran step 1 (contract of [`KvPolicy::training_kv`]). The policy never depends
/// on a "cache enabled" switch.
#[derive(Debug, Clone)]
pub struct RecursiveSharing {
    num_recursions: usize,
}

impl RecursiveSharing {
    /// The policy for `N_r` steps (`N_r >= 1`).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `num_recursions` is 0.
    pub fn new(num_recursions: usize) -> Result<Self> {
        if num_recursions == 0 {
            return Err(invalid(Self::NAME, "num_recursions must be >= 1"));
        }
        Ok(Self { num_recursions })
    }
}

impl Plugin for RecursiveSharing {
    const FAMILY: Family = Family::KvPolicy;
    const NAME: &'static str = "recursive_sharing";
    const DESCRIPTION: &'static str =
        "recursive KV sharing: steps >= 2 reuse the step-1 K/V of the same block layer (spec §4)";
    type Params = NoParams;

    /// Steps >= 2 project no K/V and attend over the full cached context (spec §1.4).
    fn accounting(_params: &NoParams, _ctx: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: None,
            kv_sharing: true,
            kv_full_context: true,
        }
    }
}

impl KvPolicyPlugin for RecursiveSharing {
    fn build(_params: NoParams, ctx: &KvCtx) -> Result<Self> {
        Self::new(ctx.num_recursions)
    }
}

impl KvPolicy for RecursiveSharing {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn projects_kv(&self, step: usize) -> bool {
        step == 1
    }

    fn keeps_first_step(&self) -> bool {
        true
    }

    /// Step 1 returns `fresh` (every token); a later step returns `first`, the step-1 K/V
    /// over the full sequence (spec §4: "keys and values are the full causal context").
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv> {
        check_inputs(self, self.num_recursions, step, fresh, first)?;
        if step == 1 {
            let fresh = fresh.ok_or_else(|| invalid(Self::NAME, "fresh K/V missing"))?;
            check_same_tokens(Self::NAME, "fresh", fresh, selected)?;
            return Ok(fresh.clone());
        }
        let first = first.ok_or_else(|| invalid(Self::NAME, "first K/V missing"))?;
        let (b, ..) = kv_dims(Self::NAME, "first", first)?;
        let (sb, _) = selected_dims(Self::NAME, selected)?;
        if b != sb {
            return Err(invalid(
                Self::NAME,
                format!("first has batch {b} but selected has batch {sb}"),
            ));
        }
        Ok(first.clone())
    }

    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost {
        let caps = cost_capacities(num_recursions, caps);
        KvCost {
            memory_ratio: 1.0 / caps.len() as f64,
            io_ratio: 1.0,
            attn_flops_ratio: caps
                .iter()
                .enumerate()
                .map(|(i, &c)| if i == 0 { 1.0 } else { c })
                .collect(),
        }
    }

    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        Ok(Box::new(PagedCache::new(
            Self::NAME,
            DecodeMode::Sharing,
            spec,
        )?))
    }
}

register_kv_policy!(RecursiveSharing);

/// Hybrid sharing (spec §4, "M-Cyc†", expert-choice only): every step projects K/V; a step
/// r >= 2 attends to the step-1 K/V with the positions selected at step r overwritten, for
/// that step only, by the fresh step-r K/V.
///
/// Like [`RecursiveSharing`] it needs every token at step 1; the model verifies that at run
/// time.
///
/// # Accounting
/// [`Plugin::accounting`] reports `kv_sharing = false` and `kv_full_context = true`: hybrid
/// projects K/V at every step, so spec §1.4's linear term is the recursion-wise one, and its
/// step-r queries attend over the full context (`k·(L+1)/2` query-key pairs per step
/// instead of `k·(k+1)/2`), as [`KvPolicy::cost`] reports (`cap_r` per step).
#[derive(Debug, Clone)]
pub struct Hybrid {
    num_recursions: usize,
}

impl Hybrid {
    /// The policy for `N_r` steps (`N_r >= 1`).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `num_recursions` is 0.
    pub fn new(num_recursions: usize) -> Result<Self> {
        if num_recursions == 0 {
            return Err(invalid(Self::NAME, "num_recursions must be >= 1"));
        }
        Ok(Self { num_recursions })
    }
}

impl Plugin for Hybrid {
    const FAMILY: Family = Family::KvPolicy;
    const NAME: &'static str = "hybrid";
    const DESCRIPTION: &'static str =
        "hybrid sharing: the step-1 K/V with the tokens selected at step r overwritten by fresh K/V (expert-choice only; spec §4)";
    type Params = NoParams;

    /// Hybrid is defined for expert-choice routing only (spec §4): a token-choice router is
    /// reported as a problem.
    fn check(_params: &NoParams, ctx: &CheckCtx) -> Vec<ParamProblem> {
        match ctx.router.as_deref() {
            Some("token_choice") => vec![ParamProblem {
                field: "kind".to_string(),
                value: "\"hybrid\"".to_string(),
                allowed: "hybrid sharing is defined for expert-choice routing only (spec §4), but the router is \
                          `token_choice`; use `recursion_wise` or `recursive_sharing`, or an expert-choice router"
                    .to_string(),
            }],
            _ => Vec::new(),
        }
    }

    fn accounting(_params: &NoParams, _ctx: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: None,
            kv_sharing: false,
            kv_full_context: true,
        }
    }
}

impl KvPolicyPlugin for Hybrid {
    fn build(_params: NoParams, ctx: &KvCtx) -> Result<Self> {
        Self::new(ctx.num_recursions)
    }
}

impl KvPolicy for Hybrid {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn projects_kv(&self, _step: usize) -> bool {
        true
    }

    fn keeps_first_step(&self) -> bool {
        true
    }

    /// Step 1 returns `fresh`. A later step returns `first` with the rows of the selected
    /// positions replaced by `fresh` (spec §4, "Hybrid"), differentiable with respect to
    /// both: the rows of `first` and `fresh` are stacked and one `index_select` picks each
    /// output row (its backward is an `index_add`; `scatter` is avoided, see PITFALLS).
    /// Padded entries of `fresh` (`PAD_POS`) overwrite nothing.
    fn training_kv(
        &self,
        step: usize,
        fresh: Option<&StepKv>,
        first: Option<&StepKv>,
        selected: &Tensor,
    ) -> Result<StepKv> {
        check_inputs(self, self.num_recursions, step, fresh, first)?;
        let fresh = fresh.ok_or_else(|| invalid(Self::NAME, "fresh K/V missing"))?;
        check_same_tokens(Self::NAME, "fresh", fresh, selected)?;
        if step == 1 {
            return Ok(fresh.clone());
        }
        let first = first.ok_or_else(|| invalid(Self::NAME, "first K/V missing"))?;
        overwrite_rows(first, fresh, selected)
    }

    fn cost(&self, num_recursions: usize, caps: &[f64]) -> KvCost {
        let mut caps = cost_capacities(num_recursions, caps);
        caps[0] = 1.0;
        let mean = caps.iter().sum::<f64>() / caps.len() as f64;
        KvCost {
            memory_ratio: mean,
            io_ratio: 1.0,
            attn_flops_ratio: caps,
        }
    }

    fn new_decode_cache(&self, spec: &DecodeCacheSpec) -> Result<Box<dyn DecodeCache>> {
        Ok(Box::new(PagedCache::new(
            Self::NAME,
            DecodeMode::Hybrid,
            spec,
        )?))
    }
}

register_kv_policy!(Hybrid);

/// `first` with the keys/values at the positions of `fresh` replaced by `fresh`.
fn overwrite_rows(first: &StepKv, fresh: &StepKv, selected: &Tensor) -> Result<StepKv> {
    const P: &str = Hybrid::NAME;
    let (b, hkv, l, dh) = kv_dims(P, "first", first)?;
    let (fb, fhkv, n, fdh) = kv_dims(P, "fresh", fresh)?;
    let vdh = first.v.dim(3)?;
    if (fb, fhkv, fdh) != (b, hkv, dh) || fresh.v.dim(3)? != vdh {
        return Err(invalid(
            P,
            format!(
                "fresh is k {:?} / v {:?} but first is k {:?} / v {:?}",
                fresh.k.dims(),
                fresh.v.dims(),
                first.k.dims(),
                first.v.dims()
            ),
        ));
    }
    let first_pos = first.pos.to_vec2::<u32>()?;
    let fresh_pos = fresh.pos.to_vec2::<u32>()?;
    let sel = selected.to_vec2::<u32>()?;
    if fresh_pos != sel {
        return Err(invalid(
            P,
            "fresh.pos differs from selected: fresh K/V must belong to the selected tokens",
        ));
    }
    // Output row `bi*l + j` reads stacked row `map[bi*l + j]`: rows `0..b*l` are `first`,
    // rows `b*l..b*l + b*n` are `fresh`.
    let mut map: Vec<u32> = Vec::with_capacity(b * l);
    let total = b * l + b * n;
    if u32::try_from(total).is_err() {
        return Err(invalid(
            P,
            format!("{total} K/V rows exceed the u32 index range"),
        ));
    }
    for bi in 0..b {
        let row = &first_pos[bi];
        if row
            .windows(2)
            .any(|w| w[0] >= w[1] && !(w[0] == PAD_POS && w[1] == PAD_POS))
        {
            return Err(invalid(
                P,
                format!("first.pos of row {bi} is not strictly ascending"),
            ));
        }
        let base = map.len();
        map.extend((0..l).map(|j| (bi * l + j) as u32));
        let mut prev: Option<u32> = None;
        for (i, &p) in fresh_pos[bi].iter().enumerate() {
            if p == PAD_POS {
                continue;
            }
            if prev.is_some_and(|q| q >= p) {
                return Err(invalid(
                    P,
                    format!("selected positions of row {bi} are not strictly ascending"),
                ));
            }
            prev = Some(p);
            let j = row.binary_search(&p).map_err(|_| {
                invalid(P, format!("selected position {p} of row {bi} has no step-1 K/V (it would read a step never written)"))
            })?;
            map[base + j] = (b * l + bi * n + i) as u32;
        }
    }
    let map = Tensor::from_vec(map, b * l, first.k.device())?;
    let pick = |a: &Tensor, f: &Tensor, d: usize| -> Result<Tensor> {
        let rows_a = a.transpose(1, 2)?.contiguous()?.reshape((b * l, hkv * d))?;
        let rows_f = f.transpose(1, 2)?.contiguous()?.reshape((b * n, hkv * d))?;
        let stacked = Tensor::cat(&[&rows_a, &rows_f], 0)?;
        Ok(stacked
            .index_select(&map, 0)?
            .reshape((b, l, hkv, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    Ok(StepKv {
        k: pick(&first.k, &fresh.k, dh)?,
        v: pick(&first.v, &fresh.v, vdh)?,
        pos: first.pos.clone(),
    })
}
