//! Routers of Mixture-of-Recursions (spec §3).
//!
//! A [`Router`] decides, per token, how many recursion steps it takes:
//! - `expert_choice`: each step r has its own router; it keeps the top-k of the tokens still
//!   active (hierarchical filtering), with `k_r = max(1, floor(cap_r · L))` per sequence;
//! - `token_choice`: one router reads `H^1` and gives every token its depth up front.
//!
//! The model owns the recursion loop and calls the router once per forward
//! ([`Router::begin`]), once per step ([`Router::route`]) and once at the end
//! ([`Router::finish`]); the router returns which tokens run the step, their gates and the
//! update rule, and at the end its loss terms (already multiplied by their coefficients)
//! and metrics.
//!
//! ```text
//! begin(H¹, mode) -> state
//! for r in 1..=N_r:   route(r, h, active_r, state, mode) -> StepRouting { selected, gate, update }
//!                     (the model runs the shared block on `selected` and merges by `update`;
//!                      active_{r+1} = selected)
//! finish(state) -> RouterOutput { loss, aux_router_loss, terms, stats, pending }
//! ```
//!
//! A router that can decide a step on the hidden states' device
//! ([`Router::routes_on_device`]) is first offered [`Router::route_device`], with the active
//! positions as a `[b, c]` tensor; it returns the kept positions as a `[b, k]` tensor
//! ([`DeviceStepRouting`]), so a forward needs no host read per step.
//! [`Router::finish_pending`] then leaves the logged terms, statistics and token depths on
//! the device ([`PendingLog`]): the trainer reads those of every micro-batch of an
//! optimiser step with the step's loss and gradient norm in one host read
//! ([`RouterOutput::pending_values`], [`RouterOutput::apply_pending`]), and
//! [`Router::finish_with_depths`] reads them at once.
//!
//! # Examples
//! The built-in expert-choice router on plain candle tensors, without a model: build it by
//! name, then route three recursion steps of a batch of two sequences.
//! ```
//! use candle_core::{Device, Tensor};
//! use mor_kernels::BackendCtx;
//! use mor_router::{build_router, RouteMode, RouterCtx, Update};
//!
//! // The backends register in `mor-kernels`; naming the crate links it (see "Plugins").
//! use mor_kernels as _;
//!
//! let device = Device::Cpu;
//! let backend = mor_kernels::build_backend(
//!     "reference",
//!     &toml::Table::new(),
//!     &BackendCtx::new(device.clone()),
//! )?;
//! // Hidden size d = 8, N_r = 3 recursion steps, sequence length L = 6.
//! let ctx = RouterCtx::new(8, 3, 6, device.clone(), backend);
//! let params: toml::Table = "alpha = 0.1\naux_coeff = 0.001".parse()?;
//! let router = build_router("expert_choice", &params, &ctx)?;
//!
//! // h: [b, L, d]; the hidden states stay fixed here, a model would update them.
//! let h = Tensor::arange(0f32, 96.0, &device)?.reshape((2, 6, 8))?.sin()?;
//! let mut state = router.begin(&h, RouteMode::Train)?;
//! let mut active: Vec<Vec<u32>> = vec![(0..6).collect(); 2];
//! for step in 1..=3 {
//!     let routing = router.route(step, &h, &active, &mut state, RouteMode::Train)?;
//!     // cap = [1, 2/3, 1/3] (spec §3.1): k = 6, 4 and 2 tokens per sequence.
//!     let k = [6, 4, 2][step - 1];
//!     for (selected, candidates) in routing.selected.iter().zip(&active) {
//!         assert_eq!(selected.len(), k);
//!         assert!(selected.windows(2).all(|w| w[0] < w[1]), "ascending");
//!         assert!(selected.iter().all(|t| candidates.contains(t)), "nested");
//!     }
//!     // One gate g = α·σ(z) per selected token, merged as h ← h + g·f(h).
//!     let gate = routing.gate.as_ref().expect("expert-choice gates its tokens");
//!     assert_eq!(gate.dims(), [2 * k]);
//!     assert!(matches!(routing.update, Update::Residual));
//!     active = routing.selected;
//! }
//! let out = router.finish(state)?;
//! // Final depths: 2 tokens per sequence at each of the depths 1, 2 and 3.
//! assert_eq!(out.stats.tokens_per_depth, [4, 4, 4]);
//! assert!(out.loss.is_some(), "the aux BCE of spec §3.1, times aux_coeff");
//! assert_eq!(out.terms[0].0, "bce");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Plugins
//! A router is a plugin that a config selects by name (`[router] kind = "expert_choice"`).
//! To add one, implement [`Router`], [`mor_core::Plugin`] (name, description, typed
//! `Params`) and [`RouterPlugin`] (how to build it from a [`RouterCtx`]), and register the
//! type next to its `impl` with [`register_router!`]. See the example on [`Router`], and
//! the crate `mor-example-entropy-router` (`examples/entropy-router`) for a complete router
//! and KV policy outside this workspace's built-in crates.
//!
//! A crate's registrations are only visible in binaries and tests that link it: `rustc`
//! drops a library that nothing names. Every binary or test that builds routers by name
//! names each plugin crate once (`use my_plugins as _;`); a lookup of an unknown name lists
//! the registered routers and says so.

#![warn(missing_docs)]

use candle_core::{Device, Tensor, Var};
use std::fmt;

pub mod error;
pub use error::{Error, Result};

mod registry;
pub use registry::{build_router, RouterCtx, RouterEntry, RouterPlugin};

pub mod metrics;
pub use metrics::RouterStats;

mod net;
pub use net::{RouterArch, DRAWS_BUFFER};

pub mod expert_choice;
pub use expert_choice::{ExpertChoiceParams, ExpertChoiceRouter, RoutingPath};
pub mod token_choice;
pub use token_choice::{TokenChoiceParams, TokenChoiceRouter};

#[doc(hidden)]
pub mod __private {
    pub use mor_core::__private::*;
}

/// The two routing families of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingKind {
    /// Each step selects among the tokens still active (§3.1).
    ExpertChoice,
    /// Each token gets its depth up front (§3.2).
    TokenChoice,
}

/// Which selection rule a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Training: full-sequence top-k per step (expert-choice), routers trained.
    Train,
    /// Evaluation with the training-time full-sequence top-k (what the reference code
    /// reports; not causal).
    FullSequence,
    /// Causal evaluation / decoding: the rule decoding will use (expert-choice: threshold on
    /// the aux-loss router or the aux router; token-choice: the up-front depth). A token's
    /// decision depends only on its own hidden state.
    Causal,
}

/// How the block output of a step is merged into the hidden state.
#[derive(Debug, Clone)]
pub enum Update {
    /// `h_t ← h_t + g_t · y_t` for every selected token (`g_t = 1` when `gate` is `None`).
    /// Expert-choice (Eq. 2.1), recursive baseline.
    Residual,
    /// Token-choice (§3.2, code form): a selected token that continues after this step gets
    /// `h_t ← y_t` (times `g_t` when `gate_intermediate`); one that finishes here gets
    /// `h_t ← H¹_t + g_t · y_t`.
    TokenChoice {
        /// Per selected token (flattened in row-major order of `selected`): finishes at
        /// this step.
        finishing: Vec<bool>,
        /// Gate the continuing branch too (the paper's equation) instead of the code's
        /// ungated form.
        gate_intermediate: bool,
    },
}

/// The decision of one recursion step.
#[derive(Debug, Clone)]
pub struct StepRouting {
    /// Per batch row: ascending positions (indices into the sequence) of the tokens that run
    /// this step. A subset of the previous step's selection.
    pub selected: Vec<Vec<u32>>,
    /// Gate per selected token, flattened row-major in the order of `selected`, shape
    /// `[n_selected_total]`; differentiable w.r.t. router parameters. `None` = ungated.
    pub gate: Option<Tensor>,
    /// Merge rule.
    pub update: Update,
}

impl StepRouting {
    /// Total selected tokens.
    pub fn num_selected(&self) -> usize {
        self.selected.iter().map(Vec::len).sum()
    }
}

/// The decision of one recursion step taken on the hidden states' device
/// ([`Router::route_device`]): the same decision as a [`StepRouting`], with the kept
/// positions as a device tensor instead of host rows, so no host read is needed.
#[derive(Debug, Clone)]
pub struct DeviceStepRouting {
    /// `[b, k]` u32: per batch row, the `k` ascending positions that run this step (every
    /// row keeps the same number), or with `valid`, the row's selected positions ascending
    /// followed by distinct unselected ones ascending (padding). The entries that run the
    /// step are a subset of the step's active positions; padding may be any position.
    pub sel: Tensor,
    /// `[b, k]` u8, 1 where `sel` holds a token that runs the step and 0 at padding; `None`
    /// when every entry runs it.
    pub valid: Option<Tensor>,
    /// Gate per entry of `sel`, flattened row-major, shape `[b·k]`, zero at padding;
    /// `None` = ungated.
    pub gate: Option<Tensor>,
    /// Merge rule. For [`Update::TokenChoice`] the host `finishing` list is empty: the
    /// flags are `finishing` below.
    pub update: Update,
    /// Token choice: `[b, k]` u8, 1 where the entry of `sel` finishes at this step (0 at
    /// padding); `None` otherwise.
    pub finishing: Option<Tensor>,
}

impl DeviceStepRouting {
    /// A decision whose every entry of `sel` runs the step (no padding): `valid` and
    /// `finishing` are `None`. Prefer this to a struct literal in a router outside this
    /// crate, so that a field added later does not break it.
    pub fn new(sel: Tensor, gate: Option<Tensor>, update: Update) -> Self {
        DeviceStepRouting {
            sel,
            valid: None,
            gate,
            update,
            finishing: None,
        }
    }

    /// This decision with padding: `valid` marks the entries of `sel` that run the step,
    /// `finishing` (token choice) those that finish at it.
    pub fn padded(mut self, valid: Tensor, finishing: Option<Tensor>) -> Self {
        self.valid = Some(valid);
        self.finishing = finishing;
        self
    }
}

/// Per-forward state a router keeps between `begin`, `route` and `finish`.
#[derive(Debug, Default)]
pub struct RoutingState {
    /// Router-specific data (losses accumulated per step, assigned depths, ...).
    pub data: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// Where a logged value of a [`PendingLog`] goes when it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSlot {
    /// The loss term of this name, appended to [`RouterOutput::terms`]: one value.
    Term(String),
    /// Added to `stats.gate_sum[i]`: one value.
    GateSum(usize),
    /// Added to `stats.sampling_correct[i]`: one count.
    SamplingCorrect(usize),
    /// Added to `stats.tokens_depth_zero` (first value) and `stats.tokens_per_depth`
    /// (the `N_r` others): `N_r + 1` counts.
    DepthHistogram,
    /// Added to `stats.last_step_selected_per_position`: `L` counts.
    LastStepPerPosition,
    /// Added to `stats.candidates_per_step[i]`: one count.
    CandidatesPerStep(usize),
    /// Added to `stats.selected_per_step[i]` and `stats.gate_count[i]`: one count.
    SelectedPerStep(usize),
    /// Added to `stats.prob_sum`: `N_r` values.
    ProbSum,
}

/// Logged values of a forward still on the hidden states' device: what
/// [`RouterOutput::terms`] and [`RouterOutput::stats`] lack until they are read.
///
/// A router that decides its steps on the device returns its loss terms and statistics
/// as tensors here ([`Router::finish_pending`]), so that the caller reads them with its own
/// values in one host read: [`RouterOutput::resolve`] reads them alone,
/// [`RouterOutput::pending_values`] and [`RouterOutput::apply_pending`] let the trainer put
/// the values of every micro-batch of an optimiser step, its loss and its gradient norm in
/// one read.
#[derive(Debug, Clone, Default)]
pub struct PendingLog {
    entries: Vec<(LogSlot, Tensor)>,
    depths: Option<Tensor>,
}

impl PendingLog {
    /// Adds `values` (any shape, flattened; a float or integer dtype), to go to `slot`.
    /// The values are kept detached: a pending value never holds its forward's autograd
    /// graph (and its activations) alive.
    pub fn push(&mut self, slot: LogSlot, values: Tensor) {
        self.entries.push((slot, values.detach()));
    }

    /// Sets every token's final depth, `[b·L]` (row-major; 0 = no step), read only by the
    /// callers that ask for it (kept detached, as [`PendingLog::push`]).
    pub fn set_depths(&mut self, depths: Tensor) {
        self.depths = Some(depths.detach());
    }

    /// The slots of the pending values, in order.
    pub fn slots(&self) -> impl Iterator<Item = &LogSlot> {
        self.entries.iter().map(|(s, _)| s)
    }

    /// The pending values and their slots, in order.
    pub(crate) fn entries(&self) -> &[(LogSlot, Tensor)] {
        &self.entries
    }

    /// Whether the forward's token depths are pending.
    pub fn has_depths(&self) -> bool {
        self.depths.is_some()
    }

    /// Whether no value is pending (the depths, read only on request, aside).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The per-forward state a built-in router keeps in [`RoutingState::data`].
pub(crate) trait ForwardState: std::any::Any + Send + Sync {
    /// The next step to route (1-based).
    fn next_step(&self) -> usize;
    /// `(b, L)` of the forward's hidden states.
    fn shape(&self) -> (usize, usize);
}

fn foreign_state(router: &'static str) -> Error {
    Error::Invalid {
        router,
        msg: "the routing state was not created by this router's `begin`".into(),
    }
}

/// `router`'s state of type `S` for step `step`, checked: created by its `begin`, the step
/// routed in order (of `1..=num_recursions`), `h: [b, L, hidden_size]` of the forward's
/// shape. Returns the state and `(b, L)`.
pub(crate) fn step_state<'a, S: ForwardState>(
    router: &'static str,
    state: &'a mut RoutingState,
    step: usize,
    num_recursions: usize,
    h: &Tensor,
    hidden_size: usize,
) -> Result<(&'a mut S, usize, usize)> {
    let st = state
        .data
        .as_mut()
        .and_then(|d| d.downcast_mut::<S>())
        .ok_or_else(|| foreign_state(router))?;
    let bad = |msg: String| Err(Error::Invalid { router, msg });
    if step != st.next_step() || step > num_recursions {
        return bad(format!(
            "step {step} routed out of order: expected step {} of 1..={num_recursions}",
            st.next_step()
        ));
    }
    let (b, l) = expert_choice::check_hidden(h, hidden_size, router)?;
    let (sb, sl) = st.shape();
    if (b, l) != (sb, sl) {
        return bad(format!(
            "hidden states are [{b}, {l}, _] but the forward began with [{sb}, {sl}, _]"
        ));
    }
    Ok((st, b, l))
}

/// `router`'s state of type `S`, taken out of `state` (at the end of a forward).
pub(crate) fn take_state<S: ForwardState>(router: &'static str, state: RoutingState) -> Result<S> {
    let st = state
        .data
        .and_then(|d| d.downcast::<S>().ok())
        .ok_or_else(|| foreign_state(router))?;
    Ok(*st)
}

/// Loss terms and metrics of one forward.
///
/// A router outside this crate that builds one with a struct literal should end it with
/// `..Default::default()`, so that a field added later does not break it.
#[derive(Debug, Default)]
pub struct RouterOutput {
    /// Sum of the router's loss terms, each already multiplied by its coefficient, to be
    /// added to the LM loss (spec §3.3). `None` when the router adds no loss.
    pub loss: Option<Tensor>,
    /// Loss of the auxiliary router (trained by its own optimiser on detached inputs);
    /// `None` when there is none.
    pub aux_router_loss: Option<Tensor>,
    /// Named scalar loss terms before coefficients, for logging (`bce`, `z`, `balance`, ...).
    pub terms: Vec<(String, f64)>,
    /// Routing metrics of this forward.
    pub stats: RouterStats,
    /// Logged values not yet read to the host (part of `terms` and `stats`); empty from
    /// [`Router::finish`]. See [`RouterOutput::resolve`].
    pub pending: PendingLog,
}

impl RouterOutput {
    /// The pending values as one 1-D f64 tensor on their device, in the order
    /// [`RouterOutput::apply_pending`] takes them (the token depths last, when
    /// `with_depths` and the forward has them); `None` when nothing is to be read.
    ///
    /// # Errors
    /// A candle error.
    pub fn pending_values(&self, with_depths: bool) -> Result<Option<Tensor>> {
        let mut parts = self
            .pending
            .entries
            .iter()
            .map(|(_, t)| t.flatten_all()?.to_dtype(candle_core::DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if let (true, Some(d)) = (with_depths, &self.pending.depths) {
            parts.push(d.flatten_all()?.to_dtype(candle_core::DType::F64)?);
        }
        Ok(match parts.len() {
            0 => None,
            1 => parts.pop(),
            _ => Some(Tensor::cat(&parts, 0)?),
        })
    }

    /// Applies `values`, read from [`RouterOutput::pending_values`] with the same
    /// `with_depths`: terms appended in order, statistics added; the pending values are
    /// then gone. Returns the token depths when they were read.
    ///
    /// # Errors
    /// `values` of another length than the pending values (nothing applied, the values
    /// stay pending); a slot index outside the statistics.
    pub fn apply_pending(&mut self, values: &[f64], with_depths: bool) -> Result<Option<Vec<u16>>> {
        let depth_len = match (&self.pending.depths, with_depths) {
            (Some(d), true) => Some(d.elem_count()),
            _ => None,
        };
        let want: usize = self
            .pending
            .entries
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum::<usize>()
            + depth_len.unwrap_or(0);
        let bad = |msg: String| Error::Invalid {
            router: "pending log",
            msg,
        };
        if values.len() != want {
            return Err(bad(format!(
                "{} values read for {want} pending ones",
                values.len()
            )));
        }
        let pending = std::mem::take(&mut self.pending);
        let mut rest = values;
        let stats = &mut self.stats;
        for (slot, t) in pending.entries {
            let (v, tail) = rest.split_at(t.elem_count());
            rest = tail;
            let one = |v: &[f64]| -> Result<f64> {
                match v {
                    [x] => Ok(*x),
                    _ => Err(bad(format!(
                        "slot {slot:?} holds {} values, not one",
                        v.len()
                    ))),
                }
            };
            let at = |len: usize, i: usize| -> Result<usize> {
                if i < len {
                    Ok(i)
                } else {
                    Err(bad(format!("slot {slot:?} is outside the {len} steps")))
                }
            };
            match &slot {
                LogSlot::Term(name) => self.terms.push((name.clone(), one(v)?)),
                LogSlot::GateSum(i) => {
                    let i = at(stats.gate_sum.len(), *i)?;
                    stats.gate_sum[i] += one(v)?;
                }
                LogSlot::SamplingCorrect(i) => {
                    let i = at(stats.sampling_correct.len(), *i)?;
                    stats.sampling_correct[i] += one(v)? as u64;
                }
                LogSlot::DepthHistogram => {
                    let (zero, per) = v
                        .split_first()
                        .ok_or_else(|| bad("an empty depth histogram".into()))?;
                    stats.tokens_depth_zero += *zero as u64;
                    if stats.tokens_per_depth.len() < per.len() {
                        stats.tokens_per_depth.resize(per.len(), 0);
                    }
                    for (c, &n) in stats.tokens_per_depth.iter_mut().zip(per) {
                        *c += n as u64;
                    }
                }
                LogSlot::CandidatesPerStep(i) => {
                    let i = at(stats.candidates_per_step.len(), *i)?;
                    stats.candidates_per_step[i] += one(v)? as u64;
                }
                LogSlot::SelectedPerStep(i) => {
                    let i = at(
                        stats.selected_per_step.len().min(stats.gate_count.len()),
                        *i,
                    )?;
                    let n = one(v)? as u64;
                    stats.selected_per_step[i] += n;
                    stats.gate_count[i] += n;
                }
                LogSlot::ProbSum => {
                    if stats.prob_sum.len() < v.len() {
                        stats.prob_sum.resize(v.len(), 0.0);
                    }
                    for (c, &x) in stats.prob_sum.iter_mut().zip(v) {
                        *c += x;
                    }
                }
                LogSlot::LastStepPerPosition => {
                    let c = &mut stats.last_step_selected_per_position;
                    if c.len() < v.len() {
                        c.resize(v.len(), 0);
                    }
                    for (c, &n) in c.iter_mut().zip(v) {
                        *c += n as u64;
                    }
                }
            }
        }
        Ok(depth_len.map(|_| rest.iter().map(|&d| d as u16).collect()))
    }

    /// Reads the pending values in one host read (none when nothing is pending) and
    /// applies them ([`RouterOutput::apply_pending`]); returns the token depths when
    /// `with_depths` and the forward has them.
    ///
    /// # Errors
    /// A candle error.
    pub fn resolve(&mut self, with_depths: bool) -> Result<Option<Vec<u16>>> {
        let values = match self.pending_values(with_depths)? {
            Some(t) => mor_kernels::host_sync::to_host_f64(&t)?,
            None => Vec::new(),
        };
        self.apply_pending(&values, with_depths)
    }
}

/// A router: which tokens run each recursion step, with what gate and update rule.
///
/// Implementations are `Send + Sync + Debug`; per-forward state lives in the
/// [`RoutingState`] that [`Router::begin`] returns, so one router serves concurrent
/// forwards. Parameters are candle [`Var`]s owned by the router and trained by the model's
/// optimiser ([`Router::vars`]).
///
/// # Contract
/// - `route(step, ..)` is called for `step = 1..=N_r` in order, with `active` equal to the
///   previous step's `selected` (all positions `0..L` at step 1) and `h: [b, L, d]` the
///   current full hidden state.
/// - The returned `selected[b]` is ascending and a subset of `active[b]`; in `Train` and
///   `FullSequence` mode an expert-choice router keeps exactly
///   `min(|active[b]|, max(1, floor(cap_r · L)))` tokens per row.
/// - In `Causal` mode the decision for token t depends only on `h[b, t]` (and the decision
///   at earlier steps), never on other tokens.
/// - Gates are differentiable with respect to [`Router::vars`]; the auxiliary router, if
///   any, only sees detached hidden states and owns [`Router::aux_vars`].
/// - Bad input (steps out of order, wrong shapes, unsorted `active`, a state from another
///   router) is an [`Error`], never a panic.
///
/// # Implementing a router
/// A registrable router implements this trait, [`mor_core::Plugin`] and [`RouterPlugin`],
/// and is registered with [`register_router!`]. The smallest useful one sends every active
/// token through every step, ungated (the recursive baseline of spec §2):
/// ```
/// use candle_core::{Tensor, Var};
/// use mor_core::registry::{Family, Plugin};
/// use mor_router::{
///     Result, RouteMode, Router, RouterCtx, RouterOutput, RouterPlugin, RoutingKind,
///     RoutingState, StepRouting, Update,
/// };
///
/// /// Parameters: none, and unknown fields are rejected.
/// #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
/// #[serde(deny_unknown_fields, default)]
/// struct AllTokensParams {}
///
/// #[derive(Debug)]
/// struct AllTokens;
///
/// impl Plugin for AllTokens {
///     const FAMILY: Family = Family::Router;
///     const NAME: &'static str = "all_tokens";
///     const DESCRIPTION: &'static str = "every token runs every step, ungated";
///     type Params = AllTokensParams;
/// }
///
/// impl RouterPlugin for AllTokens {
///     fn build(_params: AllTokensParams, _ctx: &RouterCtx) -> Result<Self> {
///         Ok(AllTokens)
///     }
/// }
///
/// impl Router for AllTokens {
///     fn name(&self) -> &'static str {
///         Self::NAME
///     }
///     fn kind(&self) -> RoutingKind {
///         RoutingKind::ExpertChoice
///     }
///     fn vars(&self) -> Vec<(String, Var)> {
///         Vec::new()
///     }
///     fn begin(&self, _h1: &Tensor, _mode: RouteMode) -> Result<RoutingState> {
///         Ok(RoutingState::default())
///     }
///     fn route(
///         &self,
///         _step: usize,
///         _h: &Tensor,
///         active: &[Vec<u32>],
///         _state: &mut RoutingState,
///         _mode: RouteMode,
///     ) -> Result<StepRouting> {
///         Ok(StepRouting { selected: active.to_vec(), gate: None, update: Update::Residual })
///     }
///     fn finish(&self, _state: RoutingState) -> Result<RouterOutput> {
///         Ok(RouterOutput::default())
///     }
/// }
///
/// // Next to the impl, at item level.
/// mor_router::register_router!(AllTokens);
///
/// fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
///     let info = mor_core::registry::find(Family::Router, "all_tokens")?;
///     assert_eq!(info.description, "every token runs every step, ungated");
///     // Unknown fields are rejected with the serde message.
///     let typo: toml::Table = "alhpa = 1".parse()?;
///     assert!((info.validate)(&typo).unwrap_err().contains("unknown field `alhpa`"));
///     Ok(())
/// }
/// ```
pub trait Router: Send + Sync + fmt::Debug {
    /// The registered name.
    fn name(&self) -> &'static str;
    /// Expert- or token-choice.
    fn kind(&self) -> RoutingKind;
    /// Trainable parameters of the main optimiser, with stable names (checkpoint keys),
    /// e.g. `router.1.weight`.
    fn vars(&self) -> Vec<(String, Var)>;
    /// Parameters of the auxiliary router (own optimiser), if any.
    fn aux_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// Learning-rate multiplier of the auxiliary router's optimiser.
    fn aux_lr_mult(&self) -> f64 {
        1.0
    }
    /// Starts a forward. `h1: [b, L, d]` is the input of the recursion stack (`H¹`).
    fn begin(&self, h1: &Tensor, mode: RouteMode) -> Result<RoutingState>;
    /// Decides recursion step `step` (1-based).
    ///
    /// # Shapes
    /// `h: [b, L, d]`; `active[b]`: ascending positions.
    fn route(
        &self,
        step: usize,
        h: &Tensor,
        active: &[Vec<u32>],
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<StepRouting>;
    /// Ends a forward: loss terms and metrics.
    fn finish(&self, state: RoutingState) -> Result<RouterOutput>;
    /// Whether this router may decide steps on `device` with [`Router::route_device`].
    /// The model hands it the active positions as a device tensor only when this is true;
    /// the default is `false` (every step through [`Router::route`]).
    fn routes_on_device(&self, _device: &Device) -> bool {
        false
    }
    /// Decides recursion step `step` on the device, without a host read: `Some` with the
    /// kept positions as a tensor, or `None` (the state untouched) when this step takes
    /// [`Router::route`] instead, which the caller then calls with the same `active` rows
    /// read to the host, padding entries dropped. The default is `None`.
    ///
    /// # Shapes
    /// `h: [b, L, d]`; `active: [b, c]` u32, ascending positions per row, or, after a step
    /// this router decided with padding ([`DeviceStepRouting::valid`]), that step's `sel`
    /// as it returned it, padding included.
    fn route_device(
        &self,
        _step: usize,
        _h: &Tensor,
        _active: &Tensor,
        _state: &mut RoutingState,
        _mode: RouteMode,
    ) -> Result<Option<DeviceStepRouting>> {
        Ok(None)
    }
    /// Ends a forward like [`Router::finish`], but leaves on the device the logged values a
    /// host read would wait for ([`RouterOutput::pending`]), and the token depths when the
    /// forward routed a step with [`Router::route_device`]; the caller reads them with its
    /// own ([`RouterOutput::resolve`]). The default is [`Router::finish`] (nothing pending).
    ///
    /// A router whose `finish` is written as `finish_pending` followed by a read (as the
    /// built-in ones do) must implement `finish_pending` itself: with both defaults in
    /// place the two would call each other without end. A router that routes on the
    /// device and keeps only [`Router::finish_with_depths`] works too: the model calls it
    /// whenever it needs the depths of a forward routed on the device.
    fn finish_pending(&self, state: RoutingState) -> Result<RouterOutput> {
        self.finish(state)
    }
    /// Ends a forward like [`Router::finish`] and also returns every token's final depth
    /// (`[b·L]`, row-major; 0 = no step) when the forward routed a step with
    /// [`Router::route_device`], read in the same host read as the logged terms
    /// ([`Router::finish_pending`], then [`RouterOutput::resolve`]).
    fn finish_with_depths(&self, state: RoutingState) -> Result<(RouterOutput, Option<Vec<u16>>)> {
        let mut out = self.finish_pending(state)?;
        let depths = out.resolve(true)?;
        Ok((out, depths))
    }
    /// Called after every optimiser step with the stats of the micro-batches of that step
    /// (the loss-free bias update of §3.2 happens here). `train_step` is the 0-based step
    /// just taken (used by capacity and balancing warm-ups).
    fn after_optimizer_step(&self, _stats: &[RouterStats], _train_step: usize) -> Result<()> {
        Ok(())
    }
    /// Informs the router of the training progress before a forward (0-based optimiser
    /// step), for capacity warm-up.
    fn set_train_step(&self, _train_step: usize) {}
    /// Non-trainable state to checkpoint (e.g. the loss-free bias), by name.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Restores state saved by [`Router::buffers`].
    fn load_buffers(&self, _buffers: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
    /// Informs the router of the number of micro-batches accumulated per optimiser step. The
    /// trainer divides every micro-batch loss by that number, so a router's loss terms are
    /// weighted as means over the step; no built-in router needs it (the expert-choice BCE
    /// factor of the released code is the explicit parameter `aux_bce_scale`, spec §3.3).
    /// The default ignores it.
    fn set_grad_accum(&self, _micro_batches: usize) {}
}
