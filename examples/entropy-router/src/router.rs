//! `entropy_router`: an expert-choice-like router whose score is the entropy of a small
//! learned code distribution.
//!
//! Each recursion step r has its own head `W_r: [d, C]`. For a candidate token with hidden
//! state `h_t` the head gives logits `z_t = W_rᵀ h_t`, a distribution `p_t = softmax(z_t)`
//! over `C` codes, and the normalised entropy
//!
//! ```text
//! u_t = H(p_t) / ln C = −Σ_c p_{t,c} ln p_{t,c} / ln C      ∈ [0, 1]
//! g_t = α · u_t                                               (the gate)
//! ```
//!
//! A token the head is unsure about (`u` near 1) counts as "hard" and is kept for more
//! recursion; a token the head places confidently in one code (`u` near 0) stops early.
//! The selection follows expert-choice routing (spec §3.1):
//! - in [`RouteMode::Train`] and [`RouteMode::FullSequence`], each sequence keeps the
//!   `k_r = min(|active|, max(1, floor(cap_r · L)))` candidates of largest `u` (ties go to
//!   the lower position), with the capacity schedule of spec §3.1 (`"auto"`:
//!   `cap_r = (N_r − r + 1)/N_r`) or an explicit list;
//! - in [`RouteMode::Causal`], a step of capacity 1 keeps every candidate, and any other
//!   step keeps a candidate iff `u_t ≥ threshold`, which depends on `h_t` alone;
//! - the kept positions are returned ascending, with the update `h ← h + g·f(h)`
//!   ([`Update::Residual`], spec Eq. 2.1).
//!
//! The gate carries the LM loss gradient into `W_r`. An optional auxiliary loss teaches the
//! causal rule to agree with top-k, as the paper's aux BCE does (spec §3.1, "Causality fix
//! 1"): `aux_coeff · Σ_r mean_t BCEWithLogits(s·(u_t − threshold), 1[t kept])` with
//! sharpness `s`. Sampling accuracy (spec §3.1) counts candidates with
//! `(u_t ≥ threshold) == 1[t kept]`.

use candle_core::{DType, Tensor, Var};
use mor_core::registry::{AccountingHints, CheckCtx, Family, ParamProblem, Plugin};
use mor_core::rng::Rng;
use mor_router::expert_choice::{auto_capacities, tokens_kept, Capacity};
use mor_router::{
    Error, Result, RouteMode, Router, RouterCtx, RouterOutput, RouterPlugin, RouterStats,
    RoutingKind, RoutingState, StepRouting, Update,
};
use serde::{Deserialize, Serialize};

const NAME: &str = "entropy_router";

/// Parameters of `entropy_router`.
///
/// # Examples
/// ```
/// use mor_core::registry::{parse_params, CheckCtx, Plugin};
/// use mor_example_entropy_router::{EntropyParams, EntropyRouter};
///
/// let table: toml::Table = "num_codes = 8\nthreshold = 0.7".parse().unwrap();
/// let params: EntropyParams = parse_params(&table).unwrap();
/// assert_eq!(params.alpha, 0.1); // a default
/// let ctx = CheckCtx { num_recursions: 3, ..Default::default() };
/// assert!(EntropyRouter::check(&params, &ctx).is_empty());
///
/// let typo: toml::Table = "num_code = 8".parse().unwrap();
/// assert!(parse_params::<EntropyParams>(&typo).unwrap_err().contains("unknown field `num_code`"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EntropyParams {
    /// Codes `C` of each step's head (at least 2).
    pub num_codes: usize,
    /// `α` of the gate `g = α·u`.
    pub alpha: f64,
    /// Fraction of the sequence kept at each step: `"auto"` or one fraction per step.
    pub capacity: Capacity,
    /// The causal rule keeps a candidate iff `u ≥ threshold`; in (0, 1).
    pub threshold: f64,
    /// Coefficient of the auxiliary BCE that calibrates the causal rule; 0 turns it off.
    pub aux_coeff: f64,
    /// Sharpness `s` of the auxiliary BCE's logit `s·(u − threshold)`.
    pub sharpness: f64,
}

impl Default for EntropyParams {
    fn default() -> Self {
        EntropyParams {
            num_codes: 4,
            alpha: 0.1,
            capacity: Capacity::Auto,
            threshold: 0.5,
            aux_coeff: 0.001,
            sharpness: 10.0,
        }
    }
}

fn problem(field: &str, value: impl std::fmt::Display, allowed: &str) -> ParamProblem {
    ParamProblem {
        field: field.to_string(),
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

impl EntropyParams {
    /// `cap_r` of every step for a run with `num_recursions` steps.
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
            let ok_len = v.len() == num_recursions;
            let ok_range = v.iter().all(|c| c.is_finite() && *c > 0.0 && *c <= 1.0);
            let ok_order = v.windows(2).all(|w| w[1] <= w[0]);
            if !(ok_len && ok_range && ok_order) {
                out.push(problem(
                    "capacity",
                    format!("{v:?}"),
                    &format!(
                        "\"auto\" or {num_recursions} descending fractions in (0, 1], one per recursion step"
                    ),
                ));
            }
        }
        if self.num_codes < 2 {
            out.push(problem("num_codes", self.num_codes, "an integer >= 2"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            out.push(problem("alpha", self.alpha, "a finite number > 0"));
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            out.push(problem("threshold", self.threshold, "a number in (0, 1)"));
        }
        if !(self.aux_coeff.is_finite() && self.aux_coeff >= 0.0) {
            out.push(problem("aux_coeff", self.aux_coeff, "a finite number >= 0"));
        }
        if !(self.sharpness.is_finite() && self.sharpness > 0.0) {
            out.push(problem("sharpness", self.sharpness, "a finite number > 0"));
        }
        out
    }
}

/// Per-forward state, kept in [`RoutingState::data`].
#[derive(Debug)]
struct State {
    b: usize,
    l: usize,
    mode: RouteMode,
    next_step: usize,
    /// Steps run per token, `[b·L]`.
    depth: Vec<usize>,
    /// Mean auxiliary BCE of every routed step.
    bce: Vec<Tensor>,
    stats: RouterStats,
    last_selected: Vec<Vec<u32>>,
}

/// The entropy router (see the module docs).
#[derive(Debug)]
pub struct EntropyRouter {
    params: EntropyParams,
    caps: Vec<f64>,
    hidden_size: usize,
    dtype: DType,
    /// `(name, W_r: [d, C])` per step.
    heads: Vec<(String, Var)>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid {
        router: NAME,
        msg: msg.into(),
    }
}

/// The `k` largest scores as ascending indices; ties go to the lower index and NaN ranks
/// below every number.
fn top_k_ascending(scores: &[f64], k: usize) -> Vec<usize> {
    let key = |x: f64| if x.is_nan() { f64::NEG_INFINITY } else { x };
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| key(scores[b]).total_cmp(&key(scores[a])).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

impl EntropyRouter {
    /// The parameters the router was built with.
    pub fn params(&self) -> &EntropyParams {
        &self.params
    }

    /// `cap_r` of every step.
    pub fn capacities(&self) -> &[f64] {
        &self.caps
    }

    /// Normalised entropies `u = H(softmax(x·W_r)) / ln C` of the rows of `x`.
    ///
    /// Differentiable with respect to `W_r` and `x`; the softmax is written with core ops
    /// (the row maximum is detached, which leaves the value and the gradient exact).
    ///
    /// # Shapes
    /// `x: [n, d]` (any float dtype) → `[n]` in the router's dtype.
    ///
    /// # Errors
    /// `step` outside `1..=N_r`, or `x` not `[n, d]`.
    pub fn scores(&self, step: usize, x: &Tensor) -> Result<Tensor> {
        let (_, w) = step
            .checked_sub(1)
            .and_then(|i| self.heads.get(i))
            .ok_or_else(|| invalid(format!("step {step} is outside 1..={}", self.heads.len())))?;
        match x.dims() {
            [_, d] if *d == self.hidden_size => {}
            dims => {
                return Err(invalid(format!(
                    "x must be [n, {}], got {dims:?}",
                    self.hidden_size
                )))
            }
        }
        let z = x.to_dtype(self.dtype)?.matmul(w.as_tensor())?;
        let m = z.max_keepdim(1)?.detach();
        let zs = z.broadcast_sub(&m)?;
        let lse = zs.exp()?.sum_keepdim(1)?.log()?;
        let logp = zs.broadcast_sub(&lse)?;
        let h = (logp.exp()? * &logp)?.sum(1)?.neg()?;
        Ok((h / (self.params.num_codes as f64).ln())?)
    }
}

impl Plugin for EntropyRouter {
    const FAMILY: Family = Family::Router;
    const NAME: &'static str = NAME;
    const DESCRIPTION: &'static str =
        "entropy router: per-step top-k of the tokens whose learned code distribution has the highest entropy (an example plugin)";
    type Params = EntropyParams;

    fn check(params: &EntropyParams, ctx: &CheckCtx) -> Vec<ParamProblem> {
        params.problems(ctx.num_recursions)
    }

    /// The capacities drive the FLOPs accounting of spec §1.4, as for `expert_choice`.
    fn accounting(params: &EntropyParams, ctx: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: Some(params.capacities(ctx.num_recursions)),
            kv_sharing: false,
            ..Default::default()
        }
    }
}

impl RouterPlugin for EntropyRouter {
    fn build(params: EntropyParams, ctx: &RouterCtx) -> Result<Self> {
        if ctx.hidden_size == 0 || ctx.num_recursions == 0 {
            return Err(invalid(format!(
                "hidden_size ({}) and num_recursions ({}) must be >= 1",
                ctx.hidden_size, ctx.num_recursions
            )));
        }
        if !(ctx.init_std.is_finite() && ctx.init_std >= 0.0) {
            return Err(invalid(format!(
                "init_std must be a finite number >= 0, got {}",
                ctx.init_std
            )));
        }
        if !matches!(ctx.dtype, DType::F32 | DType::F64) {
            return Err(invalid(format!(
                "dtype must be f32 or f64, got {:?}",
                ctx.dtype
            )));
        }
        let problems = params.problems(ctx.num_recursions);
        if !problems.is_empty() {
            let msg = problems
                .iter()
                .map(|p| format!("`{}` = {}: allowed: {}", p.field, p.value, p.allowed))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(invalid(msg));
        }
        let (d, c) = (ctx.hidden_size, params.num_codes);
        let heads = (1..=ctx.num_recursions)
            .map(|r| {
                let name = format!("router.{r}.codes");
                // N(0, init_std²) from a stream named after the parameter (spec §1.1).
                let mut rng = Rng::derive(ctx.seed, &name);
                let w: Vec<f64> = (0..d * c).map(|_| rng.normal() * ctx.init_std).collect();
                let t = Tensor::from_vec(w, (d, c), &ctx.device)?.to_dtype(ctx.dtype)?;
                Ok((name, Var::from_tensor(&t)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EntropyRouter {
            caps: params.capacities(ctx.num_recursions),
            hidden_size: d,
            dtype: ctx.dtype,
            heads,
            params,
        })
    }
}

mor_router::register_router!(EntropyRouter);

/// Checks `h: [b, L, d]` and returns `(b, L)`.
fn check_hidden(h: &Tensor, d: usize) -> Result<(usize, usize)> {
    match h.dims() {
        [b, l, dd] if *dd == d => Ok((*b, *l)),
        dims => Err(invalid(format!(
            "hidden states must be [batch, seq, {d}], got {dims:?}"
        ))),
    }
}

impl Router for EntropyRouter {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> RoutingKind {
        RoutingKind::ExpertChoice
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.heads.clone()
    }

    fn begin(&self, h1: &Tensor, mode: RouteMode) -> Result<RoutingState> {
        let (b, l) = check_hidden(h1, self.hidden_size)?;
        let n_r = self.heads.len();
        Ok(RoutingState {
            data: Some(Box::new(State {
                b,
                l,
                mode,
                next_step: 1,
                depth: vec![0; b * l],
                bce: Vec::new(),
                stats: RouterStats::with_shape(n_r, l),
                last_selected: Vec::new(),
            })),
        })
    }

    /// Scores the active tokens and keeps the top-k (or applies the causal rule).
    ///
    /// # Shapes
    /// `h: [b, L, d]`; `active[b]`: ascending positions; the gate is `[n_selected_total]`
    /// in the dtype of `h`.
    ///
    /// # Errors
    /// Steps out of order, a mode or shape that differs from `begin`, a state from another
    /// router, `active` rows that are not strictly ascending positions `< L`.
    fn route(
        &self,
        step: usize,
        h: &Tensor,
        active: &[Vec<u32>],
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<StepRouting> {
        let st = state
            .data
            .as_mut()
            .and_then(|d| d.downcast_mut::<State>())
            .ok_or_else(|| invalid("the routing state was not created by this router's `begin`"))?;
        let n_r = self.heads.len();
        if step != st.next_step || step > n_r {
            return Err(invalid(format!(
                "step {step} routed out of order: expected step {} of 1..={n_r}",
                st.next_step
            )));
        }
        if mode != st.mode {
            return Err(invalid(format!(
                "mode {mode:?} differs from the forward's mode {:?}",
                st.mode
            )));
        }
        let (b, l) = check_hidden(h, self.hidden_size)?;
        if (b, l) != (st.b, st.l) {
            return Err(invalid(format!(
                "hidden states are [{b}, {l}, _] but the forward began with [{}, {}, _]",
                st.b, st.l
            )));
        }
        if active.len() != b {
            return Err(invalid(format!(
                "`active` has {} rows, the batch has {b}",
                active.len()
            )));
        }
        for (i, row) in active.iter().enumerate() {
            if row.iter().any(|&p| p as usize >= l) || row.windows(2).any(|w| w[1] <= w[0]) {
                return Err(invalid(format!(
                    "`active[{i}]` must hold strictly ascending positions < {l}"
                )));
            }
        }
        st.next_step += 1;
        let si = step - 1;
        let cap = self.caps[si];
        let k = tokens_kept(cap, l);
        let dev = h.device();

        // Flat row ids `bi·L + t` of the candidates, and where each row's candidates start.
        let mut ids = Vec::new();
        let mut offsets = vec![0usize];
        for (bi, row) in active.iter().enumerate() {
            ids.extend(row.iter().map(|&t| (bi * l) as u32 + t));
            offsets.push(ids.len());
        }
        let n = ids.len();
        st.stats.candidates_per_step[si] += n as u64;
        if n == 0 {
            st.last_selected = vec![Vec::new(); b];
            return Ok(StepRouting {
                selected: vec![Vec::new(); b],
                gate: Some(Tensor::zeros(0, h.dtype(), dev)?),
                update: Update::Residual,
            });
        }
        let ids = Tensor::from_vec(ids, n, dev)?;
        let x = h
            .reshape((b * l, self.hidden_size))?
            .index_select(&ids, 0)?;
        let u = self.scores(step, &x)?;
        let u_host = u.to_dtype(DType::F64)?.to_vec1::<f64>()?;

        // Top-k per row: the training selection and the auxiliary target.
        let mut target = vec![0f64; n];
        let mut kept: Vec<Vec<usize>> = Vec::with_capacity(b);
        for bi in 0..b {
            let (lo, hi) = (offsets[bi], offsets[bi + 1]);
            let top = top_k_ascending(&u_host[lo..hi], k);
            for &i in &top {
                target[lo + i] = 1.0;
            }
            kept.push(top);
        }
        let tau = self.params.threshold;
        if mode == RouteMode::Causal {
            kept = (0..b)
                .map(|bi| {
                    (0..offsets[bi + 1] - offsets[bi])
                        .filter(|&i| cap >= 1.0 || u_host[offsets[bi] + i] >= tau)
                        .collect()
                })
                .collect();
        }
        let correct = u_host
            .iter()
            .zip(&target)
            .filter(|(&u, &t)| (u >= tau) == (t == 1.0))
            .count();
        st.stats.sampling_correct[si] += correct as u64;
        st.stats.sampling_total[si] += n as u64;
        if self.params.aux_coeff > 0.0 {
            let t = Tensor::from_vec(target, n, dev)?.to_dtype(self.dtype)?;
            let logit = ((&u - tau)? * self.params.sharpness)?;
            // Stable BCE with logits: max(z, 0) − z·t + ln(1 + e^{−|z|}).
            let soft = (logit.abs()?.neg()?.exp()? + 1.0)?.log()?;
            let bce = ((logit.relu()? - (&logit * &t)?)? + soft)?.mean_all()?;
            st.bce.push(bce);
        }

        let mut selected = Vec::with_capacity(b);
        let mut flat = Vec::new();
        for (bi, row) in kept.iter().enumerate() {
            let lo = offsets[bi];
            let mut sel = Vec::with_capacity(row.len());
            for &i in row {
                let t = active[bi][i];
                sel.push(t);
                flat.push((lo + i) as u32);
                st.depth[bi * l + t as usize] = step;
                st.stats.gate_sum[si] += self.params.alpha * u_host[lo + i];
            }
            selected.push(sel);
        }
        let n_sel = flat.len();
        st.stats.selected_per_step[si] += n_sel as u64;
        st.stats.gate_count[si] += n_sel as u64;
        let gate = if n_sel == 0 {
            Tensor::zeros(0, h.dtype(), dev)?
        } else {
            let flat = Tensor::from_vec(flat, n_sel, dev)?;
            (u.index_select(&flat, 0)? * self.params.alpha)?.to_dtype(h.dtype())?
        };
        st.last_selected = selected.clone();
        Ok(StepRouting {
            selected,
            gate: Some(gate),
            update: Update::Residual,
        })
    }

    fn finish(&self, state: RoutingState) -> Result<RouterOutput> {
        let st = state
            .data
            .and_then(|d| d.downcast::<State>().ok())
            .ok_or_else(|| invalid("the routing state was not created by this router's `begin`"))?;
        let mut stats = st.stats;
        for &d in &st.depth {
            match d {
                0 => stats.tokens_depth_zero += 1,
                d => stats.tokens_per_depth[d - 1] += 1,
            }
        }
        if st.next_step > 1 {
            for row in &st.last_selected {
                for &t in row {
                    stats.last_step_selected_per_position[t as usize] += 1;
                }
            }
            stats.sequences = st.b as u64;
        }
        let (loss, terms) = if st.bce.is_empty() {
            (None, Vec::new())
        } else {
            let sum = Tensor::stack(&st.bce, 0)?.sum_all()?;
            let value = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            (
                Some((sum * self.params.aux_coeff)?),
                vec![("bce".to_string(), value)],
            )
        };
        Ok(RouterOutput {
            loss,
            aux_router_loss: None,
            terms,
            stats,
            ..Default::default()
        })
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
