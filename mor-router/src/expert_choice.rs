//! Expert-choice router (spec §3.1).
//!
//! Every recursion step r = 1..N_r is an "expert" with its own router θ_r. At step r the
//! router scores the tokens still active (those selected at step r−1), `z = θ_rᵀ(h/temp)`,
//! `g = α·G(z)`, and keeps, per sequence, the `k_r = max(1, floor(cap_r·L))` candidates of
//! largest score (hierarchical filtering). Kept positions are returned in ascending order,
//! and the model merges the block output with `h ← h + g·f(h)` ([`Update::Residual`],
//! Eq. 2.1).
//!
//! Candidates are ranked by the logit `z`, not by `g`. Every `G` offered (sigmoid, tanh,
//! identity, with `α > 0`) is increasing, so both give the same order in exact arithmetic;
//! but `σ(z)` saturates to 1 in floating point for large `z` (in f32 from `z ≈ 17`), and a
//! ranking by `g` would then break those ties by position (the earliest token wins) instead
//! of by score.
//!
//! ```text
//! step 1:  active = 0..L          ── top-k_1 by z ──▶ selected_1
//! step 2:  active = selected_1    ── top-k_2 by z ──▶ selected_2 ⊆ selected_1
//!  ...                                                   (k_r = max(1, ⌊cap_r·L⌋))
//! ```
//!
//! Losses (spec §3.1, §3.3), summed over steps and weighted:
//! - `sampling = "aux_loss"`: `aux_coeff · aux_bce_scale · Σ_r BCEWithLogits(z_r, 1[kept])`,
//!   mean over the candidates of step r. `aux_bce_scale` (default 1) mirrors the released
//!   normalisation, in which the BCE was not divided by the per-device gradient
//!   accumulation, so its effective weight was `aux_coeff × 16` (spec §3.3; the paper
//!   configs set 16);
//! - `sampling = "aux_router"`: a second router per step, of the same architecture, reads the
//!   *detached* hidden states and is trained on the same targets by its own optimiser; its
//!   loss (not multiplied by `aux_coeff`) is [`RouterOutput::aux_router_loss`];
//! - `z_loss`: `z_coeff · Σ_r mean(z_r²)` (the one-logit form of the router z-loss).
//!
//! # Causal rule
//! Top-k over the sequence is not causal. In [`RouteMode::Causal`] a candidate continues to
//! step r when:
//! - `infer_rule = "threshold"` (default): `σ(z_r) ≥ threshold`, where `z_r` is the main
//!   router's *logit*. The aux BCE is taken on the logit for every `router_func`, so `σ(z)`
//!   is the quantity it calibrates as "probability of being kept"; the rule therefore
//!   compares `σ(z)` for `sigmoid`, `tanh` and `none` alike (for `sigmoid` this is the
//!   unscaled sigmoid, not `g = α·σ(z)`);
//! - `infer_rule = "aux_router"`: the auxiliary router's `σ(z_aux) ≥ threshold` (requires
//!   `sampling = "aux_router"`);
//! - `infer_rule = "full_sequence"`: the training-time top-k (not causal; what the released
//!   evaluation does, spec §6, §8 discrepancy 5).
//!
//! A step whose capacity is 1 (step 1 of the default schedule) keeps every active token in
//! every mode, as top-k does. With `rand_router` the causal rule keeps each candidate
//! independently with probability `cap_r / cap_{r−1}`, so the expected depth distribution
//! matches the capacities.
//!
//! The BCE targets and the sampling accuracy always use the top-k membership among the
//! step's candidates; in causal mode those candidates are the causally selected tokens.

use crate::metrics::RouterStats;
use crate::net::{
    bce_with_logits_mean, counter_uniform, draws_buffer, read_draws, sigmoid_f64, to_host_f64,
    top_k_ascending, RouterArch, RouterNet,
};
use crate::registry::{RouterCtx, RouterPlugin};
use crate::{
    DeviceStepRouting, Error, LogSlot, Result, RouteMode, Router, RouterOutput, RoutingKind,
    RoutingState, StepRouting, Update,
};
use candle_core::{DType, Device, Tensor, Var};
use mor_core::registry::{AccountingHints, CheckCtx, Family, ParamProblem, Plugin};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const NAME: &str = "expert_choice";

/// The squashing function `G` of `g = α·G(z)` (spec §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterFunc {
    /// `G = sigmoid` (the final recipe).
    #[default]
    Sigmoid,
    /// `G = tanh`.
    Tanh,
    /// Raw logits (`G = identity`); diverges in the paper's runs.
    None,
}

/// How the router learns a causal decision (spec §3.1, "Causality fix").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// No auxiliary objective.
    None,
    /// BCE between the main router's logit and the top-k target (the final recipe).
    #[default]
    AuxLoss,
    /// A separate auxiliary router trained on detached hidden states.
    AuxRouter,
}

/// How the gate enters the update (a code-only switch, spec §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    /// `h ← h + g·f(h)` (Eq. 2.1).
    #[default]
    Weighted,
    /// `h ← h + f(h)`: no multiplication by g (the router then learns only from its
    /// auxiliary objective).
    Additive,
}

/// Selection rule of [`RouteMode::Causal`] forwards (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InferRule {
    /// `σ(z) ≥ threshold` on the main router's logit.
    #[default]
    Threshold,
    /// The training-time full-sequence top-k (not causal).
    FullSequence,
    /// `σ(z_aux) ≥ threshold` on the auxiliary router's logit.
    AuxRouter,
}

/// Where the expert-choice selection of a full-sequence step is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPath {
    /// The device path when the hidden states are not on the CPU, the host path on it.
    #[default]
    Auto,
    /// Scores copied to the host, top-k, targets and statistics computed there (exact f64
    /// ranking; two or three host reads per step).
    Host,
    /// Top-k by the radix-select op ([`mor_kernels::cuda::topk_sorted`]: the CUDA kernel on
    /// a GPU, its CPU body on the CPU), targets, gates and statistics built with tensor
    /// ops on the scores' device. Through [`Router::route_device`] (what the model uses)
    /// the kept positions stay on the device and their depths are read with the logged
    /// values ([`Router::finish_pending`]: once per optimiser step in training, once per
    /// forward otherwise); through [`Router::route`] one host read per step
    /// remains, of the selected positions it returns. Causal rules with thresholds and rows
    /// with unequal candidate counts take the host path.
    Device,
}

impl RoutingPath {
    /// Whether this is [`RoutingPath::Auto`].
    pub fn is_auto(&self) -> bool {
        *self == RoutingPath::Auto
    }
}

/// Capacity schedule: `"auto"` or an explicit list of fractions, one per step.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Capacity {
    /// `cap_r = (N_r − r + 1) / N_r` (spec §3.1).
    #[default]
    Auto,
    /// Explicit `cap_r`, descending, each in (0, 1], one per recursion step.
    List(Vec<f64>),
}

impl Serialize for Capacity {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Capacity::Auto => s.serialize_str("auto"),
            Capacity::List(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Capacity;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"auto\" or a list of fractions in (0, 1], one per recursion step")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Capacity, E> {
                if v == "auto" {
                    Ok(Capacity::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Capacity, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<f64>()? {
                    v.push(x);
                }
                Ok(Capacity::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `cap_r = (N_r − r + 1) / N_r` for r = 1..=N_r (spec §3.1).
pub fn auto_capacities(num_recursions: usize) -> Vec<f64> {
    (1..=num_recursions)
        .map(|r| (num_recursions - r + 1) as f64 / num_recursions as f64)
        .collect()
}

/// Tokens kept per sequence at a step of capacity `cap`: `max(1, floor(cap·L))` (spec §3.1,
/// as the reference code's `int(cap * L)`).
///
/// # Examples
/// ```
/// use mor_router::expert_choice::{auto_capacities, tokens_kept};
/// // N_r = 3 at L = 2048 keeps 2048, 1365 and 682 tokens (spec §3.1).
/// let k: Vec<usize> = auto_capacities(3).iter().map(|&c| tokens_kept(c, 2048)).collect();
/// assert_eq!(k, [2048, 1365, 682]);
/// ```
pub fn tokens_kept(cap: f64, seq_len: usize) -> usize {
    ((cap * seq_len as f64).floor() as usize).max(1)
}

/// Capacity during the cosine capacity warm-up (spec §3.1):
/// `cap_t = cap + (1 − cap)·½(1 + cos(π·min(1, t/T)))`; `cap` itself when `T = 0`. Here `t`
/// and `T` count optimiser steps (`cap_warmup_steps`), where the reference code counts
/// forward calls; the two agree without gradient accumulation.
pub fn warmup_capacity(cap: f64, train_step: usize, warmup_steps: usize) -> f64 {
    if warmup_steps == 0 {
        return cap;
    }
    let x = (train_step as f64 / warmup_steps as f64).min(1.0);
    cap + (1.0 - cap) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
}

/// Parameters of `expert_choice` (spec §3.1, §9 `[mor.expert]`); the defaults are the
/// paper's final recipe (aux loss 0.001, sigmoid, α = 0.1, linear router, no capacity
/// warm-up, no z-loss).
///
/// # Examples
/// ```
/// use mor_core::registry::{parse_params, CheckCtx, Plugin};
/// use mor_router::{ExpertChoiceParams, ExpertChoiceRouter};
///
/// let table: toml::Table = "capacity = [1.0, 0.5]\nalpha = 0.1".parse().unwrap();
/// let params: ExpertChoiceParams = parse_params(&table).unwrap();
/// // Two capacities for three recursion steps: reported against the field `capacity`.
/// let ctx = CheckCtx { num_recursions: 3, ..Default::default() };
/// let problems = ExpertChoiceRouter::check(&params, &ctx);
/// assert_eq!(problems[0].field, "capacity");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpertChoiceParams {
    /// Router network.
    pub router_arch: RouterArch,
    /// Hidden size multiple of `wide_mlp` (2 as in the code; the paper's text says 4).
    pub wide_mult: usize,
    /// `G` in `g = α·G(z)`.
    pub router_func: RouterFunc,
    /// `α` in `g = α·G(z)`.
    pub alpha: f64,
    /// The router reads `h / temperature`.
    pub temperature: f64,
    /// Fraction of the sequence kept at each step.
    pub capacity: Capacity,
    /// Length `T` of the cosine capacity warm-up from 1 to `cap_r`, in **optimiser steps**;
    /// 0 = off (the final recipe). The reference code counts forward calls (spec §3.1):
    /// with `A` micro-batches per optimiser step, its `T` forward calls are `T / A` steps
    /// here, and every micro-batch of one step uses the same capacity.
    pub cap_warmup_steps: usize,
    /// Auxiliary objective for causal decisions.
    pub sampling: Sampling,
    /// Coefficient of the aux BCE (`sampling = "aux_loss"`).
    pub aux_coeff: f64,
    /// Learning-rate multiplier of the auxiliary router's optimiser.
    pub aux_router_lr_mult: f64,
    /// Extra factor on the aux BCE term: its weight in the loss is `aux_coeff ·
    /// aux_bce_scale` relative to the mean CE. The released code did not normalise the BCE by
    /// the per-device gradient accumulation (16 micro-batches per GPU), so its effective
    /// factor was 16 (spec §3.3, §8 discrepancy 4); default 1.
    pub aux_bce_scale: f64,
    /// Add the router z-loss.
    pub z_loss: bool,
    /// Coefficient of the z-loss.
    pub z_coeff: f64,
    /// Weighted or additive update.
    pub gating: Gating,
    /// Uniform random scores from a seeded RNG instead of a learned router (the "rand"
    /// baseline); the router then has no parameters and no losses.
    pub rand_router: bool,
    /// Rule of causal forwards.
    pub infer_rule: InferRule,
    /// Threshold of the causal rules.
    pub threshold: f64,
    /// Where the selection of a full-sequence step is computed (same selections either
    /// way; an execution detail, so the default `auto` is not written out and leaves the
    /// resolved parameters, and what is derived from them, as they were).
    #[serde(skip_serializing_if = "RoutingPath::is_auto")]
    pub routing_path: RoutingPath,
}

impl Default for ExpertChoiceParams {
    fn default() -> Self {
        ExpertChoiceParams {
            router_arch: RouterArch::Linear,
            wide_mult: 2,
            router_func: RouterFunc::Sigmoid,
            alpha: 0.1,
            temperature: 1.0,
            capacity: Capacity::Auto,
            cap_warmup_steps: 0,
            sampling: Sampling::AuxLoss,
            aux_coeff: 0.001,
            aux_router_lr_mult: 10.0,
            aux_bce_scale: 1.0,
            z_loss: false,
            z_coeff: 1e-3,
            gating: Gating::Weighted,
            rand_router: false,
            infer_rule: InferRule::Threshold,
            threshold: 0.5,
            routing_path: RoutingPath::Auto,
        }
    }
}

fn problem(field: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> ParamProblem {
    ParamProblem {
        field: field.to_string(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// Problems of a positive finite value.
pub(crate) fn check_positive(out: &mut Vec<ParamProblem>, field: &str, v: f64) {
    if !(v.is_finite() && v > 0.0) {
        out.push(problem(field, v, "a finite number > 0"));
    }
}

/// Problems of a non-negative finite value.
pub(crate) fn check_non_negative(out: &mut Vec<ParamProblem>, field: &str, v: f64) {
    if !(v.is_finite() && v >= 0.0) {
        out.push(problem(field, v, "a finite number >= 0"));
    }
}

impl ExpertChoiceParams {
    /// The capacity of each step for `num_recursions` steps (the explicit list as written).
    pub fn capacities(&self, num_recursions: usize) -> Vec<f64> {
        match &self.capacity {
            Capacity::Auto => auto_capacities(num_recursions),
            Capacity::List(v) => v.clone(),
        }
    }

    /// Every problem of these parameters for a run with `num_recursions` steps.
    pub fn problems(&self, num_recursions: usize) -> Vec<ParamProblem> {
        let mut out = Vec::new();
        if let Capacity::List(v) = &self.capacity {
            let allowed = format!(
                "\"auto\" or a list of {num_recursions} fractions (one per recursion step), each in \
                 (0, 1], descending (equal neighbours allowed), e.g. {:?}",
                auto_capacities(num_recursions)
            );
            let bad_len = v.len() != num_recursions;
            let bad_range = v.iter().any(|c| !(c.is_finite() && *c > 0.0 && *c <= 1.0));
            let bad_order = v.windows(2).any(|w| w[1] > w[0]);
            if bad_len || bad_range || bad_order {
                let mut why = Vec::new();
                if bad_len {
                    why.push(format!("has {} entries", v.len()));
                }
                if bad_range {
                    why.push("has an entry outside (0, 1]".to_string());
                }
                if bad_order {
                    why.push("is not descending".to_string());
                }
                out.push(problem(
                    "capacity",
                    format!("{v:?} ({})", why.join(", ")),
                    allowed,
                ));
            }
        }
        if self.wide_mult == 0 {
            out.push(problem(
                "wide_mult",
                self.wide_mult,
                "an integer >= 1 (2 as in the code, 4 as in the paper's text)",
            ));
        }
        check_positive(&mut out, "alpha", self.alpha);
        check_positive(&mut out, "temperature", self.temperature);
        check_non_negative(&mut out, "aux_coeff", self.aux_coeff);
        check_non_negative(&mut out, "aux_bce_scale", self.aux_bce_scale);
        check_positive(&mut out, "aux_router_lr_mult", self.aux_router_lr_mult);
        check_non_negative(&mut out, "z_coeff", self.z_coeff);
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            out.push(problem(
                "threshold",
                self.threshold,
                "a probability in (0, 1)",
            ));
        }
        if self.infer_rule == InferRule::AuxRouter
            && self.sampling != Sampling::AuxRouter
            && !self.rand_router
        {
            out.push(problem(
                "infer_rule",
                "\"aux_router\"",
                "\"threshold\" or \"full_sequence\"; \"aux_router\" needs sampling = \"aux_router\"",
            ));
        }
        out
    }
}

/// Converts parameter problems into one error that names the router and, per problem, the
/// field, the value and what is allowed.
pub(crate) fn problems_to_error(problems: Vec<ParamProblem>, router: &str) -> Error {
    let msg = problems
        .iter()
        .map(|p| format!("`{}` = {}: allowed: {}", p.field, p.value, p.allowed))
        .collect::<Vec<_>>()
        .join("; ");
    Error::Core(mor_core::Error::Plugin {
        family: Family::Router,
        name: router.to_string(),
        msg,
    })
}

/// Checks the parts of a [`RouterCtx`] every router needs.
pub(crate) fn check_router_ctx(ctx: &RouterCtx, router: &'static str) -> Result<()> {
    let bad = |msg: String| Err(Error::Invalid { router, msg });
    if ctx.hidden_size == 0 {
        return bad("hidden_size must be >= 1".into());
    }
    if ctx.num_recursions == 0 {
        return bad("num_recursions must be >= 1".into());
    }
    if ctx.num_recursions > u16::MAX as usize {
        return bad(format!(
            "num_recursions {} is larger than {}",
            ctx.num_recursions,
            u16::MAX
        ));
    }
    if !(ctx.init_std.is_finite() && ctx.init_std >= 0.0) {
        return bad(format!(
            "init_std must be a finite number >= 0, got {}",
            ctx.init_std
        ));
    }
    if !matches!(
        ctx.dtype,
        DType::F32 | DType::F64 | DType::BF16 | DType::F16
    ) {
        return bad(format!(
            "dtype must be f32, f64, bf16 or f16, got {:?}",
            ctx.dtype
        ));
    }
    Ok(())
}

/// Checks `h: [b, L, d]` and returns `(b, L)`.
pub(crate) fn check_hidden(h: &Tensor, d: usize, router: &'static str) -> Result<(usize, usize)> {
    match h.dims() {
        [b, l, dd] if *dd == d => Ok((*b, *l)),
        dims => Err(Error::Invalid {
            router,
            msg: format!("hidden states must be [batch, seq, {d}], got {dims:?}"),
        }),
    }
}

/// Checks that `active` has one strictly ascending row of positions `< l` per batch row.
pub(crate) fn check_active(
    active: &[Vec<u32>],
    b: usize,
    l: usize,
    router: &'static str,
) -> Result<()> {
    if active.len() != b {
        return Err(Error::Invalid {
            router,
            msg: format!("`active` has {} rows, the batch has {b}", active.len()),
        });
    }
    for (i, row) in active.iter().enumerate() {
        if let Some(&last) = row.last() {
            if last as usize >= l {
                return Err(Error::Invalid {
                    router,
                    msg: format!(
                        "`active[{i}]` holds position {last}, the sequence has length {l}"
                    ),
                });
            }
        }
        if row.windows(2).any(|w| w[1] <= w[0]) {
            return Err(Error::Invalid {
                router,
                msg: format!("`active[{i}]` is not strictly ascending"),
            });
        }
    }
    Ok(())
}

/// The histogram of token depths `[n]` (small integers in any float dtype) as `N_r + 1`
/// counts (f64): the tokens at depth 0, 1, ..., `N_r`, on the depths' device.
pub(crate) fn depth_histogram(depth: &Tensor, num_recursions: usize) -> Result<Tensor> {
    let dev = depth.device();
    let levels = Tensor::arange(0u32, num_recursions as u32 + 1, dev)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let d = depth.to_dtype(DType::F32)?.unsqueeze(0)?;
    Ok(d.broadcast_eq(&levels)?.to_dtype(DType::F64)?.sum(1)?)
}

/// `Σ` of scalar tensors, `None` when empty.
pub(crate) fn sum_scalars(v: &[Tensor]) -> Result<Option<Tensor>> {
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::stack(v, 0)?.sum_all()?))
}

/// Per-forward state of the expert-choice router.
#[derive(Debug)]
struct EcState {
    b: usize,
    l: usize,
    mode: RouteMode,
    forward_id: u64,
    next_step: usize,
    /// Steps taken per token, `[b·L]`.
    depth: Vec<u16>,
    bce: Vec<Tensor>,
    zsq: Vec<Tensor>,
    aux: Vec<Tensor>,
    stats: RouterStats,
    last_selected: Vec<Vec<u32>>,
    last_step: usize,
    /// Device-path statistics, read once in `finish`: per step, the sum of the kept
    /// gates and the count of correct sampling predictions (f64 scalars).
    dev_gate_sum: Vec<Option<Tensor>>,
    dev_correct: Vec<Option<Tensor>>,
    /// Steps decided by [`Router::route_device`] per token, `[b·L]` f32 (the depth is the
    /// host depth plus this count: selections are nested); `None` until such a step.
    dev_depth: Option<Tensor>,
    /// The kept positions `[b, k]` of the last step when [`Router::route_device`] decided
    /// it.
    dev_last_sel: Option<Tensor>,
}

impl crate::ForwardState for EcState {
    fn next_step(&self) -> usize {
        self.next_step
    }
    fn shape(&self) -> (usize, usize) {
        (self.b, self.l)
    }
}

/// The expert-choice router of spec §3.1 (see the module docs).
#[derive(Debug)]
pub struct ExpertChoiceRouter {
    params: ExpertChoiceParams,
    num_recursions: usize,
    hidden_size: usize,
    dtype: DType,
    caps: Vec<f64>,
    nets: Vec<RouterNet>,
    aux_nets: Vec<RouterNet>,
    seed: u64,
    forwards: AtomicU64,
    train_step: AtomicUsize,
}

impl ExpertChoiceRouter {
    /// The parameters the router was built with.
    pub fn params(&self) -> &ExpertChoiceParams {
        &self.params
    }

    /// `cap_r` of every step (without warm-up).
    pub fn capacities(&self) -> &[f64] {
        &self.caps
    }

    /// Capacity used at `step` (1-based) by a forward in `mode`: the warm-up schedule
    /// applies to [`RouteMode::Train`] only.
    pub fn capacity_at(&self, step: usize, mode: RouteMode) -> f64 {
        let cap = self.caps.get(step.wrapping_sub(1)).copied().unwrap_or(0.0);
        if mode == RouteMode::Train {
            warmup_capacity(
                cap,
                self.train_step.load(Ordering::Relaxed),
                self.params.cap_warmup_steps,
            )
        } else {
            cap
        }
    }

    fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid {
            router: NAME,
            msg: msg.into(),
        }
    }

    /// The forward's state for step `step`, checked (order, mode, shape of `h`), with
    /// `(b, L)`.
    fn step_state<'a>(
        &self,
        step: usize,
        h: &Tensor,
        state: &'a mut RoutingState,
        mode: RouteMode,
    ) -> Result<(&'a mut EcState, usize, usize)> {
        let (st, b, l) = crate::step_state::<EcState>(
            NAME,
            state,
            step,
            self.num_recursions,
            h,
            self.hidden_size,
        )?;
        if mode != st.mode {
            return Err(Self::invalid(format!(
                "mode {mode:?} differs from the forward's mode {:?}",
                st.mode
            )));
        }
        Ok((st, b, l))
    }

    /// Whether a forward in `mode` selects step `step` by top-k (the device path's rule).
    fn topk_rule(&self, step: usize, mode: RouteMode) -> bool {
        match mode {
            RouteMode::Train | RouteMode::FullSequence => true,
            RouteMode::Causal => {
                self.capacity_at(step, mode) < 1.0
                    && !self.params.rand_router
                    && self.params.infer_rule == InferRule::FullSequence
            }
        }
    }

    /// The device path of a top-k step (see [`RoutingPath::Device`]): the same selection,
    /// targets, losses, gates and statistics as the host path, with one host read (the
    /// selected positions, which the [`Router`] interface returns on the host).
    #[allow(clippy::too_many_arguments)]
    fn route_on_device(
        &self,
        st: &mut EcState,
        step: usize,
        (b, l, c, k): (usize, usize, usize, usize),
        active: &[Vec<u32>],
        x: &Tensor,
        z: &Tensor,
        g: &Tensor,
        out_dtype: DType,
    ) -> Result<StepRouting> {
        // Candidate positions `[b, c]` (uploaded, not read back).
        let map: Vec<u32> = active.iter().flatten().copied().collect();
        let map = Tensor::from_vec(map, (b, c), z.device())?;
        let (sel, gate) = self.select_on_device(st, step, (b, c, k), &map, x, z, g, out_dtype)?;
        // The one host read of the step: the absolute positions kept, `[b, k]`.
        let sel = mor_kernels::host_sync::to_host::<u32>(&sel)?;
        let selected: Vec<Vec<u32>> = sel.chunks(k).map(<[u32]>::to_vec).collect();
        for (bi, row) in selected.iter().enumerate() {
            for &q in row {
                st.depth[bi * l + q as usize] = step as u16;
            }
        }
        st.last_selected = selected.clone();
        st.dev_last_sel = None;
        st.last_step = step;
        Ok(StepRouting {
            selected,
            gate,
            update: Update::Residual,
        })
    }

    /// The selection, targets, losses, gates and statistics of a device-path step with
    /// the candidate positions `map: [b, c]` on the device: the kept positions `[b, k]`
    /// (ascending) and the gates `[b·k]` (`None` when additive), without a host read.
    #[allow(clippy::too_many_arguments)]
    fn select_on_device(
        &self,
        st: &mut EcState,
        step: usize,
        (b, c, k): (usize, usize, usize),
        map: &Tensor,
        x: &Tensor,
        z: &Tensor,
        g: &Tensor,
        out_dtype: DType,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let p = &self.params;
        let si = step - 1;
        let dev = z.device();
        let n = b * c;
        // The radix-select top-k by z: ties to the earlier candidate, as `top_k_ascending`.
        let scores = z.reshape((b, c))?;
        let scores = if scores.dtype() == DType::F64 || scores.dtype() == DType::F32 {
            scores
        } else {
            scores.to_dtype(DType::F32)?
        };
        let top = mor_kernels::cuda::topk_sorted(&scores, k, Some(map))?;
        // Flat candidate indices of the kept tokens, row-major: `keep + row·c`.
        let row0: Vec<u32> = (0..b).map(|bi| (bi * c) as u32).collect();
        let row0 = Tensor::from_vec(row0, (b, 1), dev)?;
        let kept_flat = top.keep.broadcast_add(&row0)?.flatten_all()?;
        let target = Tensor::zeros(n, self.dtype, dev)?.index_add(
            &kept_flat,
            &Tensor::ones(b * k, self.dtype, dev)?,
            0,
        )?;
        let learned = !p.rand_router;

        let aux = match self.aux_nets.get(si) {
            Some(net) if learned => {
                let za = net.forward(&x.detach())?.squeeze(1)?;
                st.aux.push(bce_with_logits_mean(&za, &target)?);
                Some(za)
            }
            _ => None,
        };
        let kept_g = g.index_select(&kept_flat, 0)?;
        let gsum = kept_g.to_dtype(DType::F64)?.sum_all()?;
        st.dev_gate_sum[si] = Some(match st.dev_gate_sum[si].take() {
            Some(a) => (a + gsum)?,
            None => gsum,
        });
        st.stats.selected_per_step[si] += (b * k) as u64;
        st.stats.gate_count[si] += (b * k) as u64;
        if learned {
            if p.sampling == Sampling::AuxLoss {
                st.bce.push(bce_with_logits_mean(z, &target)?);
            }
            if p.z_loss {
                st.zsq.push(z.sqr()?.mean_all()?);
            }
            // σ(pred) ≥ 0.5 ⇔ pred ≥ 0 (false for NaN, as on the host).
            let pred = aux.as_ref().unwrap_or(z);
            let said = pred.ge(0.0)?.to_dtype(DType::F64)?;
            let truth = target.ge(0.5)?.to_dtype(DType::F64)?;
            let correct = said.eq(&truth)?.to_dtype(DType::F64)?.sum_all()?;
            st.dev_correct[si] = Some(match st.dev_correct[si].take() {
                Some(a) => (a + correct)?,
                None => correct,
            });
            st.stats.sampling_total[si] += n as u64;
        }

        let gate = match p.gating {
            Gating::Additive => None,
            Gating::Weighted => Some(kept_g.to_dtype(out_dtype)?),
        };
        Ok((top.sel, gate))
    }

    fn squash(&self, z: &Tensor) -> Result<Tensor> {
        let gz = match self.params.router_func {
            RouterFunc::Sigmoid => candle_nn::ops::sigmoid(z)?,
            RouterFunc::Tanh => z.tanh()?,
            RouterFunc::None => z.clone(),
        };
        Ok((gz * self.params.alpha)?)
    }
}

impl Plugin for ExpertChoiceRouter {
    const FAMILY: Family = Family::Router;
    const NAME: &'static str = NAME;
    const DESCRIPTION: &'static str =
        "expert-choice MoR router: per-step top-k of the active tokens, aux BCE for causal decoding (spec §3.1)";
    type Params = ExpertChoiceParams;

    fn check(params: &Self::Params, ctx: &CheckCtx) -> Vec<ParamProblem> {
        params.problems(ctx.num_recursions)
    }

    fn accounting(params: &Self::Params, ctx: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: Some(params.capacities(ctx.num_recursions)),
            kv_sharing: false,
            kv_full_context: false,
        }
    }
}

impl RouterPlugin for ExpertChoiceRouter {
    fn build(params: Self::Params, ctx: &RouterCtx) -> Result<Self> {
        check_router_ctx(ctx, NAME)?;
        let problems = params.problems(ctx.num_recursions);
        if !problems.is_empty() {
            return Err(problems_to_error(problems, NAME));
        }
        let n_r = ctx.num_recursions;
        let mk = |prefix: &str| -> Result<Vec<RouterNet>> {
            (1..=n_r)
                .map(|r| {
                    RouterNet::new(
                        &format!("{prefix}.{r}"),
                        params.router_arch,
                        ctx.hidden_size,
                        1,
                        params.wide_mult,
                        ctx.init_std,
                        ctx.seed,
                        ctx.dtype,
                        &ctx.device,
                    )
                })
                .collect()
        };
        let nets = if params.rand_router {
            Vec::new()
        } else {
            mk("router")?
        };
        let aux_nets = if !params.rand_router && params.sampling == Sampling::AuxRouter {
            mk("aux_router")?
        } else {
            Vec::new()
        };
        Ok(ExpertChoiceRouter {
            caps: params.capacities(n_r),
            num_recursions: n_r,
            hidden_size: ctx.hidden_size,
            dtype: ctx.dtype,
            nets,
            aux_nets,
            seed: ctx.seed,
            forwards: AtomicU64::new(0),
            train_step: AtomicUsize::new(0),
            params,
        })
    }
}

crate::register_router!(ExpertChoiceRouter);

impl Router for ExpertChoiceRouter {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> RoutingKind {
        RoutingKind::ExpertChoice
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.nets.iter().flat_map(RouterNet::vars).collect()
    }

    fn aux_vars(&self) -> Vec<(String, Var)> {
        self.aux_nets.iter().flat_map(RouterNet::vars).collect()
    }

    fn aux_lr_mult(&self) -> f64 {
        self.params.aux_router_lr_mult
    }

    fn begin(&self, h1: &Tensor, mode: RouteMode) -> Result<RoutingState> {
        let (b, l) = check_hidden(h1, self.hidden_size, NAME)?;
        let st = EcState {
            b,
            l,
            mode,
            forward_id: self.forwards.fetch_add(1, Ordering::Relaxed),
            next_step: 1,
            depth: vec![0; b * l],
            bce: Vec::new(),
            zsq: Vec::new(),
            aux: Vec::new(),
            stats: RouterStats::with_shape(self.num_recursions, l),
            last_selected: Vec::new(),
            last_step: 0,
            dev_gate_sum: vec![None; self.num_recursions],
            dev_correct: vec![None; self.num_recursions],
            dev_depth: None,
            dev_last_sel: None,
        };
        Ok(RoutingState {
            data: Some(Box::new(st)),
        })
    }

    /// Decides step `step`: scores the active tokens, keeps the top-k (or applies the causal
    /// rule) and returns the kept positions with their gates `g = α·G(z)`.
    ///
    /// # Shapes
    /// `h: [b, L, d]`; `active[b]`: ascending positions; the gate is `[n_selected_total]`.
    ///
    /// # Errors
    /// Steps out of order, a state from another router, wrong shapes, unsorted or
    /// out-of-range positions.
    fn route(
        &self,
        step: usize,
        h: &Tensor,
        active: &[Vec<u32>],
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<StepRouting> {
        let (st, b, l) = self.step_state(step, h, state, mode)?;
        check_active(active, b, l, NAME)?;
        st.next_step += 1;
        let p = &self.params;
        let si = step - 1;
        let cap = self.capacity_at(step, mode);
        let k = tokens_kept(cap, l);

        let mut ids = Vec::new();
        let mut offsets = Vec::with_capacity(b + 1);
        offsets.push(0usize);
        for (bi, row) in active.iter().enumerate() {
            ids.extend(row.iter().map(|&q| (bi * l) as u32 + q));
            offsets.push(ids.len());
        }
        let n = ids.len();
        st.stats.candidates_per_step[si] += n as u64;
        let dev = h.device();
        if n == 0 {
            let selected = vec![Vec::new(); b];
            st.last_selected = selected.clone();
            st.last_step = step;
            st.dev_last_sel = None;
            let gate = match p.gating {
                Gating::Weighted => Some(Tensor::zeros(0, h.dtype(), dev)?),
                Gating::Additive => None,
            };
            return Ok(StepRouting {
                selected,
                gate,
                update: Update::Residual,
            });
        }
        let ids_t = Tensor::from_vec(ids, n, dev)?;
        let x = h
            .reshape((b * l, self.hidden_size))?
            .index_select(&ids_t, 0)?
            .to_dtype(self.dtype)?;
        let x = if p.temperature != 1.0 {
            (x / p.temperature)?
        } else {
            x
        };

        // The device path: every row with the same candidate count and a top-k rule.
        let c = n / b;
        let topk_rule = match mode {
            RouteMode::Train | RouteMode::FullSequence => true,
            RouteMode::Causal => {
                cap < 1.0 && !p.rand_router && p.infer_rule == InferRule::FullSequence
            }
        };
        let device_path = topk_rule
            && k.min(c) >= 1
            && active.iter().all(|r| r.len() == c)
            && match p.routing_path {
                RoutingPath::Host => false,
                RoutingPath::Device => true,
                RoutingPath::Auto => !dev.is_cpu(),
            };

        let (z, z_host) = if p.rand_router {
            let mut u = Vec::with_capacity(n);
            for (bi, row) in active.iter().enumerate() {
                for &q in row {
                    u.push(counter_uniform(
                        self.seed,
                        [st.forward_id, bi as u64, q as u64, step as u64],
                    ));
                }
            }
            (
                Tensor::from_vec(u.clone(), n, dev)?.to_dtype(self.dtype)?,
                u,
            )
        } else {
            let z = self.nets[si].forward(&x)?.squeeze(1)?;
            let zh = if device_path {
                Vec::new()
            } else {
                to_host_f64(&z)?
            };
            (z, zh)
        };
        let g = self.squash(&z)?;
        if device_path {
            let kk = k.min(c);
            return self.route_on_device(st, step, (b, l, c, kk), active, &x, &z, &g, h.dtype());
        }
        let g_host = to_host_f64(&g)?;

        // Top-k by z among each row's candidates: the training selection and the BCE target
        // (ranked by the logit, not by the saturating gate; see the module docs).
        let mut target = vec![0f64; n];
        let mut topk: Vec<Vec<usize>> = Vec::with_capacity(b);
        for bi in 0..b {
            let (lo, hi) = (offsets[bi], offsets[bi + 1]);
            let kept = top_k_ascending(&z_host[lo..hi], k);
            for &i in &kept {
                target[lo + i] = 1.0;
            }
            topk.push(kept);
        }
        let learned = !p.rand_router;
        let target_t = if learned {
            Some(Tensor::from_vec(target.clone(), n, dev)?.to_dtype(self.dtype)?)
        } else {
            None
        };

        let aux_host = match (&target_t, self.aux_nets.get(si)) {
            (Some(t), Some(net)) => {
                let za = net.forward(&x.detach())?.squeeze(1)?;
                st.aux.push(bce_with_logits_mean(&za, t)?);
                Some(to_host_f64(&za)?)
            }
            _ => None,
        };

        // The rows' kept candidates (indices within the row).
        let keep_where = |pred: &dyn Fn(usize) -> bool| -> Vec<Vec<usize>> {
            (0..b)
                .map(|bi| {
                    (0..offsets[bi + 1] - offsets[bi])
                        .filter(|&i| pred(offsets[bi] + i))
                        .collect()
                })
                .collect()
        };
        let kept: Vec<Vec<usize>> = match mode {
            RouteMode::Train | RouteMode::FullSequence => topk,
            RouteMode::Causal if cap >= 1.0 => keep_where(&|_| true),
            RouteMode::Causal if p.rand_router => {
                let prev = if si == 0 { 1.0 } else { self.caps[si - 1] };
                let ratio = if prev > 0.0 { cap / prev } else { 0.0 };
                keep_where(&|j| z_host[j] >= 1.0 - ratio)
            }
            RouteMode::Causal => match p.infer_rule {
                InferRule::FullSequence => topk,
                InferRule::Threshold => keep_where(&|j| sigmoid_f64(z_host[j]) >= p.threshold),
                InferRule::AuxRouter => {
                    let a = aux_host.as_ref().ok_or_else(|| {
                        Self::invalid("infer_rule = \"aux_router\" needs sampling = \"aux_router\"")
                    })?;
                    keep_where(&|j| sigmoid_f64(a[j]) >= p.threshold)
                }
            },
        };

        let mut selected = Vec::with_capacity(b);
        let mut kept_flat = Vec::new();
        for (bi, row) in kept.iter().enumerate() {
            let lo = offsets[bi];
            let mut sel = Vec::with_capacity(row.len());
            for &i in row {
                let q = active[bi][i];
                sel.push(q);
                kept_flat.push((lo + i) as u32);
                st.depth[bi * l + q as usize] = step as u16;
                st.stats.gate_sum[si] += g_host[lo + i];
            }
            selected.push(sel);
        }
        let n_sel = kept_flat.len();
        st.stats.selected_per_step[si] += n_sel as u64;
        st.stats.gate_count[si] += n_sel as u64;

        if let Some(t) = &target_t {
            if p.sampling == Sampling::AuxLoss {
                st.bce.push(bce_with_logits_mean(&z, t)?);
            }
            if p.z_loss {
                st.zsq.push(z.sqr()?.mean_all()?);
            }
            let pred = aux_host.as_deref().unwrap_or(&z_host);
            let correct = pred
                .iter()
                .zip(&target)
                .filter(|(&zz, &t)| (sigmoid_f64(zz) >= 0.5) == (t == 1.0))
                .count();
            st.stats.sampling_correct[si] += correct as u64;
            st.stats.sampling_total[si] += n as u64;
        }

        let gate = match p.gating {
            Gating::Additive => None,
            Gating::Weighted if n_sel == 0 => Some(Tensor::zeros(0, h.dtype(), dev)?),
            Gating::Weighted => {
                let kt = Tensor::from_vec(kept_flat, n_sel, dev)?;
                Some(g.index_select(&kt, 0)?.to_dtype(h.dtype())?)
            }
        };
        st.last_selected = selected.clone();
        st.last_step = step;
        st.dev_last_sel = None;
        Ok(StepRouting {
            selected,
            gate,
            update: Update::Residual,
        })
    }

    fn routes_on_device(&self, device: &Device) -> bool {
        !self.params.rand_router
            && match self.params.routing_path {
                RoutingPath::Host => false,
                RoutingPath::Device => true,
                RoutingPath::Auto => !device.is_cpu(),
            }
    }

    /// Decides a top-k step on the device path with the active positions as a tensor: the
    /// same selection, gates, losses and statistics as [`Router::route`], no host read
    /// (the token depths and the last step's positions are read in
    /// [`Router::finish_with_depths`]). `None` for the host path's steps (the routing
    /// path, `rand_router`, causal threshold rules, a step of capacity 1 in causal mode,
    /// no candidates). The positions in `active` are not checked against `L` (that would
    /// read them); they are the previous step's `sel`.
    ///
    /// # Errors
    /// Those of [`Router::route`], and `active` that is not `[b, c]` u32 with `c <= L`.
    fn route_device(
        &self,
        step: usize,
        h: &Tensor,
        active: &Tensor,
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<Option<DeviceStepRouting>> {
        if !self.routes_on_device(h.device()) || !self.topk_rule(step, mode) {
            return Ok(None);
        }
        let (st, b, l) = self.step_state(step, h, state, mode)?;
        let c = match active.dims() {
            [ab, c] if *ab == b && *c <= l && active.dtype() == DType::U32 => *c,
            dims => {
                return Err(Self::invalid(format!(
                    "`active` must be [{b}, c <= {l}] u32, got {dims:?} {:?}",
                    active.dtype()
                )))
            }
        };
        let k = tokens_kept(self.capacity_at(step, mode), l).min(c);
        if k == 0 {
            return Ok(None);
        }
        st.next_step += 1;
        let p = &self.params;
        let si = step - 1;
        st.stats.candidates_per_step[si] += (b * c) as u64;
        let dev = h.device();
        // Flat ids `q + row·L` of the candidates (row offsets uploaded, as on the host).
        let row0: Vec<u32> = (0..b).map(|bi| (bi * l) as u32).collect();
        let row0 = Tensor::from_vec(row0, (b, 1), dev)?;
        let ids = active.broadcast_add(&row0)?.flatten_all()?;
        let x = h
            .reshape((b * l, self.hidden_size))?
            .index_select(&ids, 0)?
            .to_dtype(self.dtype)?;
        let x = if p.temperature != 1.0 {
            (x / p.temperature)?
        } else {
            x
        };
        let z = self.nets[si].forward(&x)?.squeeze(1)?;
        let g = self.squash(&z)?;
        let (sel, gate) =
            self.select_on_device(st, step, (b, c, k), active, &x, &z, &g, h.dtype())?;
        // One more step for every kept token (selections are nested).
        let kept = sel.broadcast_add(&row0)?.flatten_all()?;
        let depth = match st.dev_depth.take() {
            Some(d) => d,
            None => Tensor::zeros(b * l, DType::F32, dev)?,
        };
        st.dev_depth = Some(depth.index_add(&kept, &Tensor::ones(b * k, DType::F32, dev)?, 0)?);
        st.dev_last_sel = Some(sel.clone());
        st.last_step = step;
        Ok(Some(DeviceStepRouting::new(sel, gate, Update::Residual)))
    }

    fn finish(&self, state: RoutingState) -> Result<RouterOutput> {
        let mut out = self.finish_pending(state)?;
        out.resolve(false)?;
        Ok(out)
    }

    /// [`Router::finish`] with the logged terms and the device-path statistics left on the
    /// device ([`RouterOutput::pending`]), and the token depths when a step was decided by
    /// [`Router::route_device`]: no host read.
    fn finish_pending(&self, state: RoutingState) -> Result<RouterOutput> {
        let st: EcState = crate::take_state(NAME, state)?;
        let mut stats = st.stats;
        let p = &self.params;
        let mut pending = crate::PendingLog::default();
        let mut parts = Vec::new();
        if let Some(bce) = sum_scalars(&st.bce)? {
            pending.push(LogSlot::Term("bce".to_string()), bce.clone());
            parts.push((bce * (p.aux_coeff * p.aux_bce_scale))?);
        }
        if let Some(z) = sum_scalars(&st.zsq)? {
            pending.push(LogSlot::Term("z".to_string()), z.clone());
            parts.push((z * p.z_coeff)?);
        }
        let aux_router_loss = sum_scalars(&st.aux)?;
        if let Some(a) = &aux_router_loss {
            pending.push(LogSlot::Term("aux_router_bce".to_string()), a.clone());
        }
        for (si, (gs, cc)) in st.dev_gate_sum.iter().zip(&st.dev_correct).enumerate() {
            if let Some(t) = gs {
                pending.push(LogSlot::GateSum(si), t.clone());
            }
            if let Some(t) = cc {
                pending.push(LogSlot::SamplingCorrect(si), t.clone());
            }
        }
        match &st.dev_depth {
            // Device-path steps: the depth is the host depth plus the steps counted on the
            // device (selections are nested); its histogram is taken there too.
            Some(d) => {
                let dev = d.device();
                let base: Vec<f32> = st.depth.iter().map(|&x| x as f32).collect();
                let depth = (Tensor::from_vec(base, st.b * st.l, dev)? + d)?;
                pending.push(
                    LogSlot::DepthHistogram,
                    depth_histogram(&depth, self.num_recursions)?,
                );
                pending.set_depths(depth);
            }
            None => {
                for &d in &st.depth {
                    if d == 0 {
                        stats.tokens_depth_zero += 1;
                    } else {
                        stats.tokens_per_depth[d as usize - 1] += 1;
                    }
                }
            }
        }
        if st.last_step > 0 {
            match &st.dev_last_sel {
                Some(sel) => {
                    let n = sel.elem_count();
                    let counts = Tensor::zeros(st.l, DType::F32, sel.device())?.index_add(
                        &sel.flatten_all()?,
                        &Tensor::ones(n, DType::F32, sel.device())?,
                        0,
                    )?;
                    pending.push(LogSlot::LastStepPerPosition, counts);
                }
                None => {
                    for row in &st.last_selected {
                        for &q in row {
                            stats.last_step_selected_per_position[q as usize] += 1;
                        }
                    }
                }
            }
            stats.sequences = st.b as u64;
        }
        Ok(RouterOutput {
            loss: sum_scalars(&parts)?,
            aux_router_loss,
            terms: Vec::new(),
            stats,
            pending,
        })
    }

    fn after_optimizer_step(&self, _stats: &[RouterStats], train_step: usize) -> Result<()> {
        self.train_step.store(train_step + 1, Ordering::Relaxed);
        Ok(())
    }

    fn set_train_step(&self, train_step: usize) {
        self.train_step.store(train_step, Ordering::Relaxed);
    }

    /// With `rand_router`, the draw counter ([`crate::DRAWS_BUFFER`]): the random
    /// scores of a forward depend on it, so a resumed run needs it to draw what an
    /// uninterrupted run draws.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        if self.params.rand_router {
            draws_buffer(self.forwards.load(Ordering::Relaxed))
        } else {
            Vec::new()
        }
    }

    /// Restores the draw counter saved by [`Router::buffers`]; other names are ignored.
    ///
    /// # Errors
    /// A counter buffer that is not one count >= 0.
    fn load_buffers(&self, buffers: &[(String, Tensor)]) -> Result<()> {
        if let Some(c) = read_draws(buffers, NAME)? {
            self.forwards.store(c, Ordering::Relaxed);
        }
        Ok(())
    }
}
