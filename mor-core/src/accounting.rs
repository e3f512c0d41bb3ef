//! Parameter and FLOPs accounting (spec §1.4) and the conversion of a training budget into
//! optimiser steps (spec §1.3).
//!
//! Per layer slot and per sequence of length `L`, when `k` tokens run the slot (spec §1.4):
//!
//! ```text
//! linear = 2·(4d² + 3·d·d_inter)·k
//! attn   = 2·2·d_a·k(k+1)/2                 causal QKᵀ and AV, d_a = n_head·d_head
//! KV-sharing step r >= 2: linear uses 2d² instead of 4d² (no K/V projection),
//!                         attn = 2·2·d_a·k·(L+1)/2 (k queries over the full causal context)
//! hybrid step r >= 2:     linear as recursion-wise (4d², it projects fresh K/V),
//!                         attn = 2·2·d_a·k·(L+1)/2 (its queries read the full step-1 cache)
//! FLOPs per token = Σ_slots (linear + attn) / L
//! ```
//!
//! The hybrid row counts what the model computes: its step-r queries attend over the step-1
//! K/V of every earlier position with the selected ones overwritten (spec §4), so the
//! attention term is that of sharing; the spec's §1.4 rule gives no hybrid row, and
//! counting it as recursion-wise (`k(k+1)/2`) would understate the attention it runs.
//!
//! Prelude and coda slots, and every slot when there is no router, run all `L` tokens;
//! a slot of recursion step r runs `k_r = max(1, floor(cap_r·L))` tokens, with `cap_r` taken
//! from the router's [`AccountingHints`]. Embedding, LM head, norms and routers are not
//! counted.
//!
//! **The budget counts forward FLOPs only.** With that rule the 360M vanilla model costs
//! 833,679,360 FLOPs per token, so the 16.5e18 budget gives 19.79B tokens and
//! `ceil(19.79e9 / 2,097,152) = 9438` steps, the released step count (spec §1.3). Counting
//! forward and backward (3×) would give 3146 steps instead, which is not what was run.

use crate::config::{Budget, ModelDims, PluginSpec, Relaxation, ResolvedConfig};

mod memory;
use crate::plan::{RecursionPlan, Segment, Slot};
use crate::registry::{self, AccountingHints, CheckCtx, Family};
pub use memory::{
    available_memory, check_fits, human_bytes, memory_estimate, parse_meminfo, MemoryEstimate,
};
use serde::{Deserialize, Serialize};

/// Tokens that run a step of capacity `cap` in a sequence of `seq_len`:
/// `max(1, floor(cap·L))` (spec §3.1), at most `L`.
///
/// A tiny tolerance (1e-9) keeps exact fractions such as `3/4 · 2048` from rounding down
/// by float error.
pub fn active_tokens(cap: f64, seq_len: usize) -> usize {
    let k = (cap * seq_len as f64 + 1e-9).floor();
    if k.is_finite() && k >= 1.0 {
        (k as usize).min(seq_len)
    } else {
        1
    }
}

/// Active tokens per recursion step (index `r−1`): `k_r` from the capacities, or `L` for
/// every step when there are none.
///
/// # Errors
/// When the capacity list does not have one entry per step, or an entry is not in (0, 1].
pub fn step_tokens(
    hints: &AccountingHints,
    num_recursions: usize,
    seq_len: usize,
) -> Result<Vec<usize>, String> {
    match &hints.capacities {
        None => Ok(vec![seq_len; num_recursions]),
        Some(caps) => {
            if caps.len() != num_recursions {
                return Err(format!(
                    "the router reports {} capacities for {num_recursions} recursion steps",
                    caps.len()
                ));
            }
            caps.iter()
                .map(|&c| {
                    if c.is_finite() && c > 0.0 && c <= 1.0 {
                        Ok(active_tokens(c, seq_len))
                    } else {
                        Err(format!("capacity {c} is outside (0, 1]"))
                    }
                })
                .collect()
        }
    }
}

/// How one slot runs over a sequence: its active tokens, whether it reuses step-1 K/V
/// (no K/V projection) and whether its queries read the full causal context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SlotShape {
    /// Tokens that run the slot (`k`).
    pub(crate) k: f64,
    /// The slot projects no K/V of its own (KV sharing at a step >= 2).
    pub(crate) shared: bool,
    /// The slot's queries attend over the full context (`L` keys) instead of the `k`
    /// active tokens.
    pub(crate) full_context: bool,
}

/// The [`SlotShape`] of `slot` under the per-step active tokens `k_steps` and `hints`.
pub(crate) fn slot_shape(
    dims: &ModelDims,
    slot: &Slot,
    k_steps: &[usize],
    hints: &AccountingHints,
) -> SlotShape {
    match slot.segment {
        Segment::Prelude | Segment::Coda => SlotShape {
            k: dims.seq_len as f64,
            shared: false,
            full_context: false,
        },
        Segment::Recursion { step, .. } => {
            let k = k_steps
                .get(step.wrapping_sub(1))
                .copied()
                .unwrap_or(dims.seq_len) as f64;
            let later = step >= 2;
            SlotShape {
                k,
                shared: hints.kv_sharing && later,
                full_context: (hints.kv_sharing || hints.kv_full_context) && later,
            }
        }
    }
}

/// FLOPs of one slot over one sequence (spec §1.4).
fn slot_flops(dims: &ModelDims, shape: SlotShape) -> f64 {
    let l = dims.seq_len as f64;
    let d = dims.hidden_size as f64;
    let d_attn = (dims.num_heads * dims.head_dim) as f64;
    let di = dims.intermediate_size as f64;
    let k = shape.k;
    let proj = if shape.shared { 2.0 } else { 4.0 };
    let linear = 2.0 * (proj * d * d + 3.0 * d * di) * k;
    let attn = if shape.full_context {
        2.0 * 2.0 * d_attn * k * (l + 1.0) / 2.0
    } else {
        2.0 * 2.0 * d_attn * k * (k + 1.0) / 2.0
    };
    linear + attn
}

/// Forward FLOPs per training token of the model (spec §1.4).
///
/// # Errors
/// When the capacities do not fit the plan (see [`step_tokens`]).
pub fn flops_per_token(
    dims: &ModelDims,
    plan: &RecursionPlan,
    hints: &AccountingHints,
) -> Result<f64, String> {
    let k_steps = step_tokens(hints, plan.num_recursions, dims.seq_len)?;
    let total: f64 = plan
        .slots
        .iter()
        .map(|s| slot_flops(dims, slot_shape(dims, s, &k_steps, hints)))
        .sum();
    Ok(total / dims.seq_len as f64)
}

/// `(d_in, d_out)` of a LoRA target projection.
fn lora_target_dims(dims: &ModelDims, target: &str) -> (u64, u64) {
    let d = dims.hidden_size as u64;
    let q = (dims.num_heads * dims.head_dim) as u64;
    let kv = (dims.num_kv_heads * dims.head_dim) as u64;
    match target {
        "q_proj" => (d, q),
        "k_proj" | "v_proj" => (d, kv),
        _ => (q, d),
    }
}

/// Whether a LoRA on `target` at a slot of shape `shape` is used: a slot that projects no
/// K/V of its own (KV sharing at steps >= 2) has no K/V LoRA (the model builds none).
fn lora_target_used(target: &str, shared: bool) -> bool {
    !(shared && matches!(target, "k_proj" | "v_proj"))
}

/// Parameters of the relaxation of the shared weights (spec §6), per recursion slot (one
/// depth r, one layer of the shared block):
///
/// ```text
/// recursion_encoding  N_r · d                                 (one vector per depth)
/// lora                Σ_targets rank · (d_in + d_out)         per recursion slot
/// dora                Σ_targets rank · (d_in + d_out) + d_out per recursion slot (m_r)
/// adaption_prompt     P · d + n_head                          per recursion slot (P_r, g_r)
/// ```
///
/// The LoRA / DoRA K/V targets are omitted at the slots that reuse the step-1 K/V when
/// `kv_sharing` (nothing would read them). `MorModel::named_vars` lists the same
/// parameters.
pub fn relaxation_params(
    dims: &ModelDims,
    plan: &RecursionPlan,
    relax: Option<&Relaxation>,
    kv_sharing: bool,
) -> u64 {
    let Some(relax) = relax else {
        return 0;
    };
    if let Relaxation::RecursionEncoding = relax {
        return plan.num_recursions as u64 * dims.hidden_size as u64;
    }
    let magnitude = matches!(relax, Relaxation::Dora { .. });
    plan.slots
        .iter()
        .map(|s| match (s.segment, relax) {
            (Segment::Recursion { .. }, Relaxation::AdaptionPrompt { prompt_len }) => {
                (*prompt_len * dims.hidden_size + dims.num_heads) as u64
            }
            (Segment::Recursion { step, .. }, _) => {
                let Some((rank, _, targets)) = relax.low_rank() else {
                    return 0;
                };
                targets
                    .iter()
                    .filter(|t| lora_target_used(t, kv_sharing && step >= 2))
                    .map(|t| {
                        let (i, o) = lora_target_dims(dims, t);
                        rank as u64 * (i + o) + if magnitude { o } else { 0 }
                    })
                    .sum()
            }
            _ => 0,
        })
        .sum()
}

/// Forward FLOPs per training token added by the relaxation (spec §1.4 counting, 2 per
/// multiply-add of the products), per active token of every recursion slot:
///
/// ```text
/// lora             Σ_targets 2 · rank · (d_in + d_out)
/// dora             Σ_targets 2 · rank · (d_in + d_out) + d_out   (the scale m_r / n_r)
/// adaption_prompt  2 · 2 · d_a · P                               (Q K_pᵀ and the weighted V_p)
/// recursion_encoding  0
/// ```
///
/// Additions and the tanh gate are not counted, as the residual additions are not. Work
/// done once per forward rather than per token is not counted either: DoRA's row norms
/// `‖W + s·B A‖` (`2·rank·d_in·d_out + 3·d_in·d_out` per target and slot) and the
/// adaption prompt's prefix K/V projections (`2·P·d·2·d_kv` per slot); the decode engine
/// computes both once at load.
///
/// # Errors
/// When the capacities do not fit the plan (see [`step_tokens`]).
pub fn relaxation_flops_per_token(
    dims: &ModelDims,
    plan: &RecursionPlan,
    hints: &AccountingHints,
    relax: Option<&Relaxation>,
) -> Result<f64, String> {
    let Some(relax) = relax else {
        return Ok(0.0);
    };
    let magnitude = matches!(relax, Relaxation::Dora { .. });
    let d_attn = (dims.num_heads * dims.head_dim) as u64;
    let per_slot = |shape: &SlotShape| -> u64 {
        match relax {
            Relaxation::RecursionEncoding => 0,
            Relaxation::AdaptionPrompt { prompt_len } => 2 * 2 * d_attn * *prompt_len as u64,
            Relaxation::Lora { .. } | Relaxation::Dora { .. } => {
                let Some((rank, _, targets)) = relax.low_rank() else {
                    return 0;
                };
                targets
                    .iter()
                    .filter(|t| lora_target_used(t, shape.shared))
                    .map(|t| {
                        let (i, o) = lora_target_dims(dims, t);
                        2 * rank as u64 * (i + o) + if magnitude { o } else { 0 }
                    })
                    .sum()
            }
        }
    };
    if matches!(relax, Relaxation::RecursionEncoding) {
        return Ok(0.0);
    }
    let k_steps = step_tokens(hints, plan.num_recursions, dims.seq_len)?;
    let total: f64 = plan
        .slots
        .iter()
        .filter(|s| matches!(s.segment, Segment::Recursion { .. }))
        .map(|s| {
            let shape = slot_shape(dims, s, &k_steps, hints);
            per_slot(&shape) as f64 * shape.k
        })
        .sum();
    Ok(total / dims.seq_len as f64)
}

/// Parameter counts of a model (spec §1.1 counting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCounts {
    /// Unique non-embedding parameters: every unique block's q/k/v/o (real GQA shapes),
    /// gate/up/down and two RMSNorms (per slot when norms are not shared), plus the final
    /// norm.
    pub non_embedding: u64,
    /// The embedding, plus the LM head when it is not tied.
    pub embedding: u64,
}

/// Counts the unique parameters of `dims` unrolled by `plan`.
///
/// With `ln_share = false` every slot has its own two norms, while the projections stay
/// shared (spec §2, "What is shared").
pub fn param_counts(dims: &ModelDims, plan: &RecursionPlan, ln_share: bool) -> ParamCounts {
    param_counts_with(dims, plan, ln_share, false)
}

/// As [`param_counts`], under a KV policy that makes steps >= 2 reuse the step-1 K/V when
/// `kv_sharing` ([`AccountingHints::kv_sharing`]): a block that runs only at steps >= 2
/// then has no K/V projections (spec §4: sharing "saves the K/V projections at r ≥ 2"), as
/// in a vanilla model with KV sharing, whose layers of step r >= 2 read the K/V of other
/// layers. The model lists the same parameters (`MorModel::named_vars`).
pub fn param_counts_with(
    dims: &ModelDims,
    plan: &RecursionPlan,
    ln_share: bool,
    kv_sharing: bool,
) -> ParamCounts {
    let d = dims.hidden_size as u64;
    let q = (dims.num_heads * dims.head_dim) as u64;
    let kv = (dims.num_kv_heads * dims.head_dim) as u64;
    let di = dims.intermediate_size as u64;
    let attn = d * q * 2 + d * kv * 2; // q, o and k, v
    let mlp = 3 * d * di;
    let norm_sets = if ln_share {
        plan.num_blocks
    } else {
        plan.num_slots()
    } as u64;
    let no_kv = plan
        .kv_projecting_blocks(kv_sharing)
        .iter()
        .filter(|&&p| !p)
        .count() as u64;
    let non_embedding =
        plan.num_blocks as u64 * (attn + mlp) - no_kv * d * kv * 2 + norm_sets * 2 * d + d;
    let emb = dims.vocab_size as u64 * d;
    ParamCounts {
        non_embedding,
        embedding: if dims.tie_embeddings { emb } else { 2 * emb },
    }
}

/// Router parameters, reported apart from the model's, for the layout of the built-in
/// routers (spec §3.1, §3.2): expert-choice has one network `d → 1` per recursion step
/// (twice that with `sampling = "aux_router"`); `token_choice` has one network `d → N_r`.
/// A network is `router_arch = "linear"` (`d·out`, the paper's final choice for both),
/// `"mlp"` (`d → 2d → out`) or `"wide_mlp"` (`d → wide_mult·d → out`), all without
/// biases. 0 without a router. The built model's `Router::vars()` is authoritative.
pub fn router_params(dims: &ModelDims, num_recursions: usize, router: Option<&PluginSpec>) -> u64 {
    let Some(r) = router else { return 0 };
    let d = dims.hidden_size as u64;
    let n_r = num_recursions as u64;
    let hidden = match r.params.get("router_arch").and_then(|v| v.as_str()) {
        Some("mlp") => Some(2 * d),
        Some("wide_mlp") => {
            let m = r
                .params
                .get("wide_mult")
                .and_then(|v| v.as_integer())
                .unwrap_or(2)
                .max(0) as u64;
            Some(m * d)
        }
        _ => None,
    };
    let net = |out: u64| match hidden {
        Some(h) => d * h + h * out,
        None => d * out,
    };
    if r.kind == "token_choice" {
        net(n_r)
    } else {
        let aux = r.params.get("sampling").and_then(|v| v.as_str()) == Some("aux_router");
        n_r * net(1) * if aux { 2 } else { 1 }
    }
}

/// The accounting hints of a run: the router's capacities and whether the KV policy (or
/// the router) shares step-1 K/V.
///
/// # Errors
/// When a slot's plugin is not registered.
pub fn hints(
    router: Option<&PluginSpec>,
    kv: &PluginSpec,
    ctx: &CheckCtx,
) -> Result<AccountingHints, String> {
    let mut out = AccountingHints::default();
    if let Some(r) = router {
        let info = registry::find(Family::Router, &r.kind).map_err(|e| e.to_string())?;
        out = (info.accounting)(&r.params, ctx);
    }
    let info = registry::find(Family::KvPolicy, &kv.kind).map_err(|e| e.to_string())?;
    let kv_hints = (info.accounting)(&kv.params, ctx);
    out.kv_sharing |= kv_hints.kv_sharing;
    out.kv_full_context |= kv_hints.kv_full_context;
    Ok(out)
}

/// Optimiser steps a budget gives (spec §1.3): FLOPs → tokens `= flops / flops_per_token`,
/// steps rounded up (9437.5 → 9438); tokens → steps rounded down (`int(10e9/(1024·2048)) =
/// 4768`), at least 1.
///
/// # Errors
/// When the budget gives more than 10^15 steps, or the inputs are not positive.
pub fn budget_steps(
    budget: Budget,
    flops_per_token: f64,
    tokens_per_step: u64,
) -> Result<u64, String> {
    if tokens_per_step == 0 || !(flops_per_token.is_finite() && flops_per_token > 0.0) {
        return Err("the model has no tokens per step or no FLOPs per token".to_string());
    }
    let steps = match budget {
        Budget::Steps(s) => s as f64,
        Budget::Tokens(t) => (t / tokens_per_step as f64 + 1e-9).floor().max(1.0),
        Budget::Flops(f) => (f / flops_per_token / tokens_per_step as f64 - 1e-9)
            .ceil()
            .max(1.0),
    };
    if !steps.is_finite() || steps > 1e15 {
        return Err(format!(
            "the budget gives {steps:e} steps; at most 1e15 are allowed"
        ));
    }
    Ok(steps as u64)
}

/// Warmup steps of `auto` (spec §1.3): `round(0.05 · steps_ref)`, where `steps_ref` is the
/// step count of `warmup_ref_flops` when set (spec: 5% of the smallest budget, 2e18: 57
/// steps for vanilla 360M, 86 for MoR N_r = 3), else of this run.
pub fn auto_warmup(
    steps: u64,
    ref_flops: Option<f64>,
    flops_per_token: f64,
    tokens_per_step: u64,
) -> u64 {
    let reference = match ref_flops {
        Some(f) => {
            budget_steps(Budget::Flops(f), flops_per_token, tokens_per_step).unwrap_or(steps)
        }
        None => steps,
    };
    (0.05 * reference as f64).round() as u64
}

/// The `cargo xtask plan` report of a resolved config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Sharing strategy.
    pub strategy: String,
    /// `N_r`.
    pub num_recursions: usize,
    /// `B_d`.
    pub base_depth: usize,
    /// Unique parameter blocks.
    pub num_blocks: usize,
    /// Unrolled layer slots `L_eff`.
    pub num_slots: usize,
    /// One entry per slot, in execution order: its block and segment.
    pub slots: Vec<Slot>,
    /// Router capacities per step, when routed.
    pub capacities: Option<Vec<f64>>,
    /// Tokens per sequence that run each recursion step (`k_r`).
    pub active_tokens: Vec<usize>,
    /// Whether steps >= 2 reuse the step-1 K/V.
    pub kv_sharing: bool,
    /// Forward FLOPs per training token (spec §1.4).
    pub flops_per_token: f64,
    /// Unique non-embedding parameters.
    pub non_embedding_params: u64,
    /// Embedding (plus untied LM head) parameters.
    pub embedding_params: u64,
    /// Router parameters (linear routers; see [`router_params`]).
    pub router_params: u64,
    /// Relaxation parameters ([`relaxation_params`]; 0 without a relaxation).
    #[serde(default)]
    pub relaxation_params: u64,
    /// `non_embedding_params + embedding_params + router_params`.
    pub total_params: u64,
    /// The budget as written.
    pub budget: Budget,
    /// Optimiser steps.
    pub steps: u64,
    /// Tokens per step (`batch_seqs · seq_len`).
    pub tokens_per_step: u64,
    /// Tokens trained: `steps · tokens_per_step`.
    pub tokens: u64,
    /// Forward FLOPs of those tokens: `tokens · flops_per_token` (the budget's unit).
    pub flops: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Trapezoid cooldown steps.
    pub decay_steps: u64,
    /// Estimated training memory (see [`memory_estimate`]).
    pub memory: MemoryEstimate,
}

/// Builds the report of `cfg`.
///
/// # Errors
/// [`Error::Plan`](crate::Error::Plan) when the plugins' accounting hints do not fit the plan.
pub fn report(cfg: &ResolvedConfig) -> crate::Result<Report> {
    let ctx = cfg.check_ctx();
    let h = hints(cfg.router.as_ref(), &cfg.kv, &ctx).map_err(crate::Error::Plan)?;
    let relax = cfg.recursion.relaxation.as_ref();
    let fpt = flops_per_token(&cfg.model, &cfg.plan, &h).map_err(crate::Error::Plan)?
        + relaxation_flops_per_token(&cfg.model, &cfg.plan, &h, relax)
            .map_err(crate::Error::Plan)?;
    let relaxation = relaxation_params(&cfg.model, &cfg.plan, relax, h.kv_sharing);
    let k =
        step_tokens(&h, cfg.plan.num_recursions, cfg.model.seq_len).map_err(crate::Error::Plan)?;
    let params = param_counts_with(&cfg.model, &cfg.plan, cfg.recursion.ln_share, h.kv_sharing);
    let router = router_params(
        &cfg.model,
        cfg.recursion.num_recursions,
        cfg.router.as_ref(),
    );
    let tokens = cfg.budget_tokens();
    Ok(Report {
        strategy: cfg.plan.strategy.clone(),
        num_recursions: cfg.plan.num_recursions,
        base_depth: cfg.plan.base_depth,
        num_blocks: cfg.plan.num_blocks,
        num_slots: cfg.plan.num_slots(),
        slots: cfg.plan.slots.clone(),
        capacities: h.capacities.clone(),
        active_tokens: k,
        kv_sharing: h.kv_sharing,
        flops_per_token: fpt,
        non_embedding_params: params.non_embedding,
        embedding_params: params.embedding,
        router_params: router,
        relaxation_params: relaxation,
        total_params: params.non_embedding + params.embedding + router + relaxation,
        budget: cfg.train.budget,
        steps: cfg.train.steps,
        tokens_per_step: cfg.tokens_per_step(),
        tokens,
        flops: tokens as f64 * fpt,
        warmup_steps: cfg.train.warmup_steps,
        decay_steps: cfg.train.decay_steps(),
        memory: memory_estimate(cfg),
    })
}

#[cfg(test)]
#[path = "accounting_tests.rs"]
mod tests;
