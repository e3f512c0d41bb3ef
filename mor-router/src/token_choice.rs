//! Token-choice router (spec §3.2).
//!
//! One router reads `H¹`, the input of the recursion stack, and gives every token its depth
//! up front: `z_t = θᵀ(H¹_t/temp) ∈ R^{N_r}`, `p_t = α·softmax(z_t)` (or `α·σ(z_t)`), the
//! 0-based choice `i_t = argmax_j (p_{t,j} + b_j)` and the gate `g_t = p_{t,i_t}`. The token
//! runs steps `1..=i_t+1`:
//!
//! ```text
//! depth(t) = i_t + 1
//! step r:  selected = { t active : depth(t) ≥ r }
//!          finishing: h_t ← H¹_t + g_t·f(h_t)          (depth(t) = r)
//!          continuing: h_t ← f(h_t)                     (depth(t) > r; × g_t when gate_intermediate)
//! ```
//!
//! The decision depends only on the token's own `H¹_t`, so the router is causal by
//! construction and every [`RouteMode`] routes the same way.
//!
//! Losses (spec §3.2, §3.3), over the `B·L` tokens of the forward:
//! - `balancing = "loss"`: `bal_coeff · Σ_i f_i·P_i`, `f_i = N_r·(share of tokens whose
//!   top-1 is i)` (not differentiated), `P_i = mean_t p_{t,i}`;
//! - `balancing = "loss_free"`: no loss; a bias `b ∈ R^{N_r}` enters only the top-1 choice
//!   and moves after each optimiser step by `b_i += u·sign(mean_j load_j − load_i)`;
//! - `z_loss`: `z_coeff · mean_t (logsumexp_j z_{t,j})²`.
//!
//! Two discrepancies of spec §8 are decided here:
//! - z-loss coefficient (discrepancy 2): the default is the paper's `1e-3` (the caption of
//!   its token-choice ablation table, and the `z_coeff` of the spec's config schema); the
//!   released config's `1e-5` is `z_coeff = 1e-5`;
//! - gating of the intermediate steps (discrepancy 3): the default follows the code
//!   (continuing tokens ungated); `gate_intermediate = true` gives the paper's equation.
//!
//! During the balancing warm-up (`train_step < bal_warmup_steps`, training forwards only)
//! every token is sent to depth N_r and the loss-free bias is held at zero. The balancing
//! loss keeps using the router's own top-1 choice, so the router is still pushed towards
//! balance while the depths are forced.

use crate::expert_choice::{
    check_active, check_hidden, check_non_negative, check_positive, check_router_ctx,
    problems_to_error, sum_scalars,
};
use crate::metrics::RouterStats;
use crate::net::{argmax, counter_uniform, logsumexp_rows, to_host_f64, RouterArch, RouterNet};
use crate::registry::{RouterCtx, RouterPlugin};
use crate::{
    DeviceStepRouting, Error, LogSlot, PendingLog, Result, RouteMode, Router, RouterOutput,
    RoutingKind, RoutingPath, RoutingState, StepRouting, Update,
};
use candle_core::{DType, Device, Tensor, Var, D};
use mor_core::registry::{AccountingHints, CheckCtx, Family, ParamProblem, Plugin};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const NAME: &str = "token_choice";

/// Name of the loss-free bias in [`Router::buffers`].
pub const BIAS_BUFFER: &str = "router.bias";

/// How the router's logits become depth probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRouterFunc {
    /// `p = α·softmax(z)` (the final recipe, α = 1).
    #[default]
    Softmax,
    /// `p = α·σ(z)` per depth (ablation, usually α = 0.1).
    Sigmoid,
}

/// Load-balancing method (spec §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancing {
    /// Auxiliary balancing loss `Σ_i f_i·P_i` (the final recipe).
    #[default]
    Loss,
    /// Loss-free bias on the selection, updated after each optimiser step.
    LossFree,
}

/// Parameters of `token_choice` (spec §3.2, §9 `[mor.token]`); the defaults are the
/// paper's final recipe (balancing loss 0.1, softmax with α = 1, linear router, small
/// z-loss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenChoiceParams {
    /// Router network (`d → N_r`).
    pub router_arch: RouterArch,
    /// Hidden size multiple of `wide_mlp` (2 as in the code; the paper's text says 4).
    pub wide_mult: usize,
    /// Softmax or sigmoid probabilities.
    pub router_func: TokenRouterFunc,
    /// `α` in `p = α·G(z)`.
    pub alpha: f64,
    /// The router reads `H¹ / temperature`.
    pub temperature: f64,
    /// Balancing loss or loss-free bias.
    pub balancing: Balancing,
    /// Coefficient of the balancing loss.
    pub bal_coeff: f64,
    /// Step `u` of the loss-free bias update.
    pub bias_update_u: f64,
    /// Optimiser steps during which every token takes all N_r steps; 0 = off.
    pub bal_warmup_steps: usize,
    /// Add the router z-loss.
    pub z_loss: bool,
    /// Coefficient of the z-loss (paper `1e-3`; released config `1e-5`).
    pub z_coeff: f64,
    /// Gate the continuing branch too (the paper's equation) instead of the code's ungated
    /// form.
    pub gate_intermediate: bool,
    /// Uniform random logits from a seeded RNG instead of a learned router (the "rand"
    /// baseline); the router then has no parameters and no losses.
    pub rand_router: bool,
    /// Where the depths are chosen: `host` reads the probabilities once per forward and
    /// routes on the host; `device` chooses the depths, builds each step's subset (the
    /// selected positions, then padding) and the statistics with tensor ops on the hidden
    /// states' device, with no host read ([`Router::route_device`]: every step keeps the
    /// width `L`, padded, so the shared block runs `N_r·L` token-steps per row instead of
    /// the `Σ_r k_r` the routing selects, and the FLOPs accounting, which counts the
    /// selected tokens, understates what the device did); `auto` (default) is the host
    /// path on every device, keeping token choice's compute savings for one read per
    /// forward. Same routing, gates and losses either way (an execution detail, so `auto`
    /// is not written out).
    #[serde(skip_serializing_if = "RoutingPath::is_auto")]
    pub routing_path: RoutingPath,
}

impl Default for TokenChoiceParams {
    fn default() -> Self {
        TokenChoiceParams {
            router_arch: RouterArch::Linear,
            wide_mult: 2,
            router_func: TokenRouterFunc::Softmax,
            alpha: 1.0,
            temperature: 1.0,
            balancing: Balancing::Loss,
            bal_coeff: 0.1,
            bias_update_u: 0.001,
            bal_warmup_steps: 0,
            z_loss: true,
            z_coeff: 1e-3,
            gate_intermediate: false,
            rand_router: false,
            routing_path: RoutingPath::Auto,
        }
    }
}

impl TokenChoiceParams {
    /// Every problem of these parameters.
    pub fn problems(&self) -> Vec<ParamProblem> {
        let mut out = Vec::new();
        if self.wide_mult == 0 {
            out.push(ParamProblem {
                field: "wide_mult".into(),
                value: "0".into(),
                allowed: "an integer >= 1 (2 as in the code, 4 as in the paper's text)".into(),
            });
        }
        check_positive(&mut out, "alpha", self.alpha);
        check_positive(&mut out, "temperature", self.temperature);
        check_non_negative(&mut out, "bal_coeff", self.bal_coeff);
        check_non_negative(&mut out, "bias_update_u", self.bias_update_u);
        check_non_negative(&mut out, "z_coeff", self.z_coeff);
        out
    }
}

/// Per-forward state of the token-choice router.
#[derive(Debug)]
struct TcState {
    b: usize,
    l: usize,
    next_step: usize,
    /// 1-based depth per token, `[b·L]`.
    depth: Vec<u16>,
    /// Gate per token, `[b·L]`, differentiable.
    g: Tensor,
    g_host: Vec<f64>,
    balance: Option<Tensor>,
    zl: Option<Tensor>,
    stats: RouterStats,
    last_selected: Vec<Vec<u32>>,
    last_step: usize,
    /// The device path's values (see [`RoutingPath::Device`]); `depth` and `g_host` stay
    /// empty until a step routed by [`Router::route`] reads them.
    dev: Option<TcDev>,
}

impl crate::ForwardState for TcState {
    fn next_step(&self) -> usize {
        self.next_step
    }
    fn shape(&self) -> (usize, usize) {
        (self.b, self.l)
    }
}

/// The device path's per-forward values of the token-choice router.
#[derive(Debug)]
struct TcDev {
    /// 1-based depth per token, `[b, L]` f32.
    depth: Tensor,
    /// `Σ_t p_{t,i}`, `[N_r]` f64.
    prob_sum: Tensor,
    /// Statistics of the steps routed on the device, read in `finish`.
    pending: PendingLog,
    /// The last routed step was routed on the device.
    last_on_device: bool,
}

/// The token-choice router of spec §3.2 (see the module docs).
#[derive(Debug)]
pub struct TokenChoiceRouter {
    params: TokenChoiceParams,
    num_recursions: usize,
    hidden_size: usize,
    dtype: DType,
    device: Device,
    net: Option<RouterNet>,
    bias: Mutex<Vec<f64>>,
    seed: u64,
    forwards: AtomicU64,
    train_step: AtomicUsize,
}

impl TokenChoiceRouter {
    /// The parameters the router was built with.
    pub fn params(&self) -> &TokenChoiceParams {
        &self.params
    }

    /// The current loss-free bias `b` (zeros unless `balancing = "loss_free"`).
    pub fn bias(&self) -> Vec<f64> {
        self.bias.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid {
            router: NAME,
            msg: msg.into(),
        }
    }

    fn in_warmup(&self) -> bool {
        self.train_step.load(Ordering::Relaxed) < self.params.bal_warmup_steps
    }

    /// The forward's state for step `step`, checked (order, shape of `h`), with `(b, L)`.
    fn step_state<'a>(
        &self,
        step: usize,
        h: &Tensor,
        state: &'a mut RoutingState,
    ) -> Result<(&'a mut TcState, usize, usize)> {
        crate::step_state(NAME, state, step, self.num_recursions, h, self.hidden_size)
    }

    /// The depth choice of `begin` on the device (spec §3.2): the top-1 of the biased
    /// probabilities in f64 (NaN ranked lowest, ties to the lower depth, as on the host),
    /// or depth N_r during the warm-up; the gates, the balancing fractions `f_i` and the
    /// probability sums, all without a host read.
    #[allow(clippy::type_complexity)]
    fn choose_on_device(
        &self,
        probs: &Tensor,
        bias: &[f64],
        warm: bool,
        (b, l): (usize, usize),
    ) -> Result<(TcDev, Tensor, Option<Tensor>)> {
        let nr = self.num_recursions;
        let n = b * l;
        let dev = probs.device();
        let pf = probs.to_dtype(DType::F64)?;
        let biased = pf.broadcast_add(&Tensor::from_vec(bias.to_vec(), (1, nr), dev)?)?;
        let low = Tensor::full(f64::NEG_INFINITY, (n, nr), dev)?;
        let biased = biased.ne(&biased)?.where_cond(&low, &biased)?;
        let top1 = biased.argmax(1)?;
        let choice = if warm {
            Tensor::full((nr - 1) as u32, n, dev)?
        } else {
            top1.clone()
        };
        let g = probs
            .contiguous()?
            .gather(&choice.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let depth = (choice.to_dtype(DType::F32)? + 1.0)?.reshape((b, l))?;
        // f_i = N_r · (share of tokens whose top-1 is i), in the host's order of operations.
        let f = if self.params.balancing == Balancing::Loss && self.net.is_some() {
            let counts = crate::expert_choice::depth_histogram(&top1, nr - 1)?;
            let f = counts
                .broadcast_mul(&Tensor::new(nr as f64, dev)?)?
                .broadcast_div(&Tensor::new(n as f64, dev)?)?;
            Some(f.to_dtype(self.dtype)?)
        } else {
            None
        };
        let st = TcDev {
            depth,
            prob_sum: pf.sum(0)?,
            pending: PendingLog::default(),
            last_on_device: false,
        };
        Ok((st, g, f))
    }

    /// Whether forwards on `device` take the device path.
    fn device_path(&self, _device: &Device) -> bool {
        match self.params.routing_path {
            RoutingPath::Host => false,
            RoutingPath::Device => true,
            // The host path: each step runs only the tokens that reach it, for one read
            // per forward. The device path saves that read but runs every step at the
            // width `L` (padding), which costs token choice its compute savings.
            RoutingPath::Auto => false,
        }
    }
}

impl Plugin for TokenChoiceRouter {
    const FAMILY: Family = Family::Router;
    const NAME: &'static str = NAME;
    const DESCRIPTION: &'static str =
        "token-choice MoR router: one router on H¹ assigns each token its depth, balancing loss or loss-free bias (spec §3.2)";
    type Params = TokenChoiceParams;

    fn check(params: &Self::Params, _ctx: &CheckCtx) -> Vec<ParamProblem> {
        params.problems()
    }

    /// Spec §1.4: token-choice FLOPs assume perfect balance, i.e. the share of tokens that
    /// run step r is `(N_r − r + 1)/N_r`.
    fn accounting(_params: &Self::Params, ctx: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: Some(crate::expert_choice::auto_capacities(ctx.num_recursions)),
            kv_sharing: false,
            kv_full_context: false,
        }
    }
}

impl RouterPlugin for TokenChoiceRouter {
    fn build(params: Self::Params, ctx: &RouterCtx) -> Result<Self> {
        check_router_ctx(ctx, NAME)?;
        let problems = params.problems();
        if !problems.is_empty() {
            return Err(problems_to_error(problems, NAME));
        }
        let net = if params.rand_router {
            None
        } else {
            Some(RouterNet::new(
                "router",
                params.router_arch,
                ctx.hidden_size,
                ctx.num_recursions,
                params.wide_mult,
                ctx.init_std,
                ctx.seed,
                ctx.dtype,
                &ctx.device,
            )?)
        };
        Ok(TokenChoiceRouter {
            num_recursions: ctx.num_recursions,
            hidden_size: ctx.hidden_size,
            dtype: ctx.dtype,
            device: ctx.device.clone(),
            net,
            bias: Mutex::new(vec![0.0; ctx.num_recursions]),
            seed: ctx.seed,
            forwards: AtomicU64::new(0),
            train_step: AtomicUsize::new(0),
            params,
        })
    }
}

crate::register_router!(TokenChoiceRouter);

impl Router for TokenChoiceRouter {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> RoutingKind {
        RoutingKind::TokenChoice
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.net.as_ref().map(RouterNet::vars).unwrap_or_default()
    }

    /// Scores every token of `h1` once and fixes its depth, gate and the forward's losses.
    ///
    /// # Shapes
    /// `h1: [b, L, d]`.
    fn begin(&self, h1: &Tensor, mode: RouteMode) -> Result<RoutingState> {
        let (b, l) = check_hidden(h1, self.hidden_size, NAME)?;
        let n = b * l;
        let nr = self.num_recursions;
        let p = &self.params;
        let dev = h1.device();
        let mut stats = RouterStats::with_shape(nr, l);
        stats.prob_sum = vec![0.0; nr];
        if n == 0 {
            let st = TcState {
                b,
                l,
                next_step: 1,
                depth: Vec::new(),
                g: Tensor::zeros(0, self.dtype, dev)?,
                g_host: Vec::new(),
                balance: None,
                zl: None,
                stats,
                last_selected: Vec::new(),
                last_step: 0,
                dev: None,
            };
            return Ok(RoutingState {
                data: Some(Box::new(st)),
            });
        }
        let x = h1.reshape((n, self.hidden_size))?.to_dtype(self.dtype)?;
        let x = if p.temperature != 1.0 {
            (x / p.temperature)?
        } else {
            x
        };
        let z = match &self.net {
            Some(net) => net.forward(&x)?,
            None => {
                let fid = self.forwards.fetch_add(1, Ordering::Relaxed);
                let mut u = Vec::with_capacity(n * nr);
                for t in 0..n {
                    for j in 0..nr {
                        u.push(counter_uniform(
                            self.seed,
                            [fid, (t / l) as u64, (t % l) as u64, j as u64],
                        ));
                    }
                }
                Tensor::from_vec(u, (n, nr), dev)?.to_dtype(self.dtype)?
            }
        };
        let probs = match p.router_func {
            TokenRouterFunc::Softmax => candle_nn::ops::softmax(&z, D::Minus1)?,
            TokenRouterFunc::Sigmoid => candle_nn::ops::sigmoid(&z)?,
        };
        let probs = (probs * p.alpha)?;
        let warm = mode == RouteMode::Train && self.in_warmup();
        let bias = if warm || p.balancing == Balancing::Loss {
            vec![0.0; nr]
        } else {
            self.bias
                .lock()
                .map_err(|_| Self::invalid("bias lock poisoned"))?
                .clone()
        };
        let zl = if p.z_loss && self.net.is_some() {
            Some(logsumexp_rows(&z)?.sqr()?.mean_all()?)
        } else {
            None
        };
        if self.device_path(dev) {
            let (tc, g, f) = self.choose_on_device(&probs, &bias, warm, (b, l))?;
            let balance = match f {
                Some(f_t) => Some((probs.mean(0)? * f_t)?.sum_all()?),
                None => None,
            };
            stats.prob_tokens = n as u64;
            let st = TcState {
                b,
                l,
                next_step: 1,
                depth: Vec::new(),
                g,
                g_host: Vec::new(),
                balance,
                zl,
                stats,
                last_selected: Vec::new(),
                last_step: 0,
                dev: Some(tc),
            };
            return Ok(RoutingState {
                data: Some(Box::new(st)),
            });
        }
        let p_host = to_host_f64(&probs)?;

        let mut top1 = Vec::with_capacity(n);
        let mut biased = vec![0.0; nr];
        for t in 0..n {
            let row = &p_host[t * nr..(t + 1) * nr];
            for j in 0..nr {
                biased[j] = row[j] + bias[j];
                stats.prob_sum[j] += row[j];
            }
            top1.push(argmax(&biased));
        }
        stats.prob_tokens = n as u64;
        let choice: Vec<u32> = if warm {
            vec![(nr - 1) as u32; n]
        } else {
            top1.iter().map(|&i| i as u32).collect()
        };
        let depth: Vec<u16> = choice.iter().map(|&i| i as u16 + 1).collect();
        let idx = Tensor::from_vec(choice.clone(), (n, 1), dev)?;
        let g = probs.contiguous()?.gather(&idx, 1)?.squeeze(1)?;
        let g_host: Vec<f64> = choice
            .iter()
            .enumerate()
            .map(|(t, &i)| p_host[t * nr + i as usize])
            .collect();

        let balance = if p.balancing == Balancing::Loss && self.net.is_some() {
            let mut f = vec![0f64; nr];
            for &i in &top1 {
                f[i] += 1.0;
            }
            let f: Vec<f64> = f.iter().map(|c| nr as f64 * c / n as f64).collect();
            let f_t = Tensor::from_vec(f, nr, dev)?.to_dtype(self.dtype)?;
            let big_p = probs.mean(0)?;
            Some((big_p * f_t)?.sum_all()?)
        } else {
            None
        };
        let st = TcState {
            b,
            l,
            next_step: 1,
            depth,
            g,
            g_host,
            balance,
            zl,
            stats,
            last_selected: Vec::new(),
            last_step: 0,
            dev: None,
        };
        Ok(RoutingState {
            data: Some(Box::new(st)),
        })
    }

    /// Selects the active tokens whose depth reaches `step`.
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
        _mode: RouteMode,
    ) -> Result<StepRouting> {
        let (st, b, l) = self.step_state(step, h, state)?;
        check_active(active, b, l, NAME)?;
        if let Some(tc) = st.dev.as_mut() {
            // A device-path forward routed on the host: its depths and gates, read once.
            if st.depth.is_empty() && b * l > 0 {
                let dg = Tensor::cat(
                    &[
                        tc.depth.flatten_all()?.to_dtype(DType::F64)?,
                        st.g.flatten_all()?.to_dtype(DType::F64)?,
                    ],
                    0,
                )?;
                let mut both = to_host_f64(&dg)?;
                st.g_host = both.split_off(tc.depth.elem_count());
                st.depth = both.into_iter().map(|d| d as u16).collect();
            }
            tc.last_on_device = false;
        }
        st.next_step += 1;
        let si = step - 1;
        let mut selected = Vec::with_capacity(b);
        let mut flat = Vec::new();
        let mut finishing = Vec::new();
        for (bi, row) in active.iter().enumerate() {
            let mut sel = Vec::new();
            for &q in row {
                let t = bi * l + q as usize;
                let d = st.depth[t] as usize;
                if d >= step {
                    sel.push(q);
                    flat.push(t as u32);
                    finishing.push(d == step);
                    st.stats.gate_sum[si] += st.g_host[t];
                }
            }
            selected.push(sel);
        }
        let n_sel = flat.len();
        st.stats.candidates_per_step[si] += active.iter().map(Vec::len).sum::<usize>() as u64;
        st.stats.selected_per_step[si] += n_sel as u64;
        st.stats.gate_count[si] += n_sel as u64;
        let gate = if n_sel == 0 {
            Tensor::zeros(0, h.dtype(), h.device())?
        } else {
            let ft = Tensor::from_vec(flat, n_sel, h.device())?;
            st.g.index_select(&ft, 0)?.to_dtype(h.dtype())?
        };
        st.last_selected = selected.clone();
        st.last_step = step;
        Ok(StepRouting {
            selected,
            gate: Some(gate),
            update: Update::TokenChoice {
                finishing,
                gate_intermediate: self.params.gate_intermediate,
            },
        })
    }

    fn routes_on_device(&self, device: &Device) -> bool {
        self.device_path(device)
    }

    /// Step `step` of a device-path forward with no host read: per row, the positions
    /// whose depth reaches `step` (ascending), then the row's other positions (ascending)
    /// as padding, so every step keeps the width `L`: the subset the host path builds for
    /// its widest row, and padded the same way. The flags, gates (zero at padding) and
    /// step statistics are tensors; `active` (the previous step's `sel`) is not read, the
    /// depths imply it. `None` for a forward that began on the host path.
    ///
    /// # Errors
    /// Those of [`Router::route`]; `active` that is not `[b, c]`.
    fn route_device(
        &self,
        step: usize,
        h: &Tensor,
        active: &Tensor,
        state: &mut RoutingState,
        _mode: RouteMode,
    ) -> Result<Option<DeviceStepRouting>> {
        let (st, b, l) = self.step_state(step, h, state)?;
        if st.dev.is_none() || b * l == 0 {
            return Ok(None);
        }
        if active.dims().len() != 2 || active.dims()[0] != b {
            return Err(Self::invalid(format!(
                "`active` must be [{b}, c], got {:?}",
                active.dims()
            )));
        }
        st.next_step += 1;
        let si = step - 1;
        let dev = h.device();
        let (g, tc) = match st.dev.as_mut() {
            Some(tc) => (&st.g, tc),
            None => return Ok(None),
        };
        let runs = tc.depth.ge(step as f64)?.to_dtype(DType::F32)?;
        // Rank of each position in the step's layout: selected ones first, the others
        // after them, each in position order (exact small integers in f32).
        let before = runs.cumsum(1)?;
        let count = before.narrow(1, l - 1, 1)?;
        let idle = runs.affine(-1.0, 1.0)?;
        let rank = ((&runs * (&before - 1.0)?)?
            + (&idle * (idle.cumsum(1)?.broadcast_add(&count)? - 1.0)?)?)?;
        let positions = Tensor::arange(0f32, l as f32, dev)?
            .unsqueeze(0)?
            .broadcast_as((b, l))?
            .contiguous()?;
        let sel = Tensor::zeros((b, l), DType::F32, dev)?
            .scatter(&rank.to_dtype(DType::U32)?, &positions, 1)?
            .to_dtype(DType::U32)?;
        let valid_f = positions.broadcast_lt(&count)?.to_dtype(DType::F32)?;
        let finishing = tc
            .depth
            .eq(step as f64)?
            .to_dtype(DType::F32)?
            .gather(&sel, 1)?
            .to_dtype(DType::U8)?;
        let row0: Vec<u32> = (0..b).map(|bi| (bi * l) as u32).collect();
        let ids = sel
            .broadcast_add(&Tensor::from_vec(row0, (b, 1), dev)?)?
            .flatten_all()?;
        let gate = g
            .index_select(&ids, 0)?
            .mul(&valid_f.flatten_all()?.to_dtype(g.dtype())?)?
            .to_dtype(h.dtype())?;
        // Statistics: candidates (the tokens of the previous step), selected, gate sums.
        let candidates = if step == 1 {
            Tensor::new((b * l) as f64, dev)?
        } else {
            tc.depth
                .ge((step - 1) as f64)?
                .to_dtype(DType::F64)?
                .sum_all()?
        };
        tc.pending.push(LogSlot::CandidatesPerStep(si), candidates);
        tc.pending.push(
            LogSlot::SelectedPerStep(si),
            runs.to_dtype(DType::F64)?.sum_all()?,
        );
        let gsum =
            (g.to_dtype(DType::F64)? * runs.flatten_all()?.to_dtype(DType::F64)?)?.sum_all()?;
        tc.pending.push(LogSlot::GateSum(si), gsum);
        tc.last_on_device = true;
        st.last_step = step;
        Ok(Some(DeviceStepRouting {
            sel,
            // Every token runs step 1 (depths are >= 1): no padding.
            valid: (step > 1)
                .then(|| valid_f.to_dtype(DType::U8))
                .transpose()?,
            gate: Some(gate),
            update: Update::TokenChoice {
                finishing: Vec::new(),
                gate_intermediate: self.params.gate_intermediate,
            },
            finishing: Some(finishing),
        }))
    }

    fn finish(&self, state: RoutingState) -> Result<RouterOutput> {
        let mut out = self.finish_pending(state)?;
        out.resolve(false)?;
        Ok(out)
    }

    /// [`Router::finish`] with the logged loss terms left on the device
    /// ([`RouterOutput::pending`]).
    fn finish_pending(&self, state: RoutingState) -> Result<RouterOutput> {
        let st: TcState = crate::take_state(NAME, state)?;
        let mut stats = st.stats;
        let p = &self.params;
        let mut pending = PendingLog::default();
        let mut parts = Vec::new();
        let mut dev_depth = None;
        match &st.dev {
            Some(tc) => {
                let depth = tc.depth.flatten_all()?;
                pending.push(
                    LogSlot::DepthHistogram,
                    crate::expert_choice::depth_histogram(&depth, self.num_recursions)?,
                );
                pending.push(LogSlot::ProbSum, tc.prob_sum.clone());
                for (slot, t) in tc.pending.entries() {
                    pending.push(slot.clone(), t.clone());
                }
                // The steps each token ran: its depth, up to the last routed step.
                dev_depth = Some(depth.clamp(0f32, st.last_step as f32)?);
            }
            None => {
                for &d in &st.depth {
                    stats.tokens_per_depth[d as usize - 1] += 1;
                }
            }
        }
        if st.last_step > 0 {
            match &st.dev {
                Some(tc) if tc.last_on_device => {
                    let last = tc.depth.ge(st.last_step as f64)?.to_dtype(DType::F32)?;
                    pending.push(LogSlot::LastStepPerPosition, last.sum(0)?);
                }
                _ => {
                    for row in &st.last_selected {
                        for &q in row {
                            stats.last_step_selected_per_position[q as usize] += 1;
                        }
                    }
                }
            }
            stats.sequences = st.b as u64;
        }
        if let Some(d) = dev_depth {
            pending.set_depths(d);
        }
        if let Some(bal) = st.balance {
            pending.push(LogSlot::Term("balance".into()), bal.clone());
            parts.push((bal * p.bal_coeff)?);
        }
        if let Some(z) = st.zl {
            pending.push(LogSlot::Term("z".into()), z.clone());
            parts.push((z * p.z_coeff)?);
        }
        Ok(RouterOutput {
            loss: sum_scalars(&parts)?,
            aux_router_loss: None,
            terms: Vec::new(),
            stats,
            pending,
        })
    }

    /// Loss-free balancing (spec §3.2): `b_i += u·sign(mean_j load_j − load_i)`, with
    /// `load_i` the share of tokens at depth i averaged over the micro-batches of the step.
    /// During the balancing warm-up the bias is reset to zero instead.
    ///
    /// # Errors
    /// Stats whose `tokens_per_depth` has a length other than N_r.
    fn after_optimizer_step(&self, stats: &[RouterStats], train_step: usize) -> Result<()> {
        self.train_step.store(train_step + 1, Ordering::Relaxed);
        if self.params.balancing != Balancing::LossFree {
            return Ok(());
        }
        let nr = self.num_recursions;
        let mut bias = self
            .bias
            .lock()
            .map_err(|_| Self::invalid("bias lock poisoned"))?;
        if train_step < self.params.bal_warmup_steps {
            bias.iter_mut().for_each(|b| *b = 0.0);
            return Ok(());
        }
        let mut load = vec![0f64; nr];
        let mut used = 0usize;
        for s in stats {
            if s.tokens_per_depth.len() != nr {
                return Err(Self::invalid(format!(
                    "stats hold {} depths, the router has {nr}",
                    s.tokens_per_depth.len()
                )));
            }
            let l = s.loads();
            if l.is_empty() {
                continue;
            }
            for (a, x) in load.iter_mut().zip(&l) {
                *a += x;
            }
            used += 1;
        }
        if used == 0 {
            return Ok(());
        }
        load.iter_mut().for_each(|x| *x /= used as f64);
        let mean = load.iter().sum::<f64>() / nr as f64;
        for (b, &li) in bias.iter_mut().zip(&load) {
            let diff = mean - li;
            let sign = if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            *b += self.params.bias_update_u * sign;
        }
        Ok(())
    }

    fn set_train_step(&self, train_step: usize) {
        self.train_step.store(train_step, Ordering::Relaxed);
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        let b = self.bias();
        let n = b.len();
        let mut out = match Tensor::from_vec(b, n, &self.device) {
            Ok(t) => vec![(BIAS_BUFFER.to_string(), t)],
            Err(_) => Vec::new(),
        };
        if self.params.rand_router {
            // The random scores depend on the draw counter (see `crate::DRAWS_BUFFER`).
            out.extend(crate::net::draws_buffer(
                self.forwards.load(Ordering::Relaxed),
            ));
        }
        out
    }

    /// Restores the loss-free bias from [`BIAS_BUFFER`]; other names are ignored.
    ///
    /// # Errors
    /// A bias of a length other than N_r.
    fn load_buffers(&self, buffers: &[(String, Tensor)]) -> Result<()> {
        if let Some(c) = crate::net::read_draws(buffers, NAME)? {
            self.forwards.store(c, Ordering::Relaxed);
        }
        let Some((_, t)) = buffers.iter().find(|(n, _)| n == BIAS_BUFFER) else {
            return Ok(());
        };
        let v = to_host_f64(t)?;
        if v.len() != self.num_recursions {
            return Err(Self::invalid(format!(
                "`{BIAS_BUFFER}` has {} entries, the router has {} depths",
                v.len(),
                self.num_recursions
            )));
        }
        *self
            .bias
            .lock()
            .map_err(|_| Self::invalid("bias lock poisoned"))? = v;
        Ok(())
    }
}
