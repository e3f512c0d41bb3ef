//! The Llama-style Mixture-of-Recursions decoder (spec §1.1, §2, §3).
//!
//! One stack of shared layers is applied up to `N_r` times. The recursion plan of the
//! sharing strategy says which unique parameter block each unrolled layer slot uses:
//!
//! ```text
//! ids -> embed -> prelude slots (all tokens)
//!     -> for r in 1..=N_r: router picks the tokens of step r (sorted, causal order)
//!          -> gather -> shared block layers of step r (RoPE at original positions,
//!             attention over the keys/values the KV policy gives)
//!          -> merge back (h + g·y for expert-choice, spec Eq. 2.1)
//!     -> coda slots (all tokens) -> final RMSNorm -> LM head (tied) -> CE + router losses
//! ```
//!
//! - Vanilla is the plan of sharing `none`: one "recursion step" of every layer, no router.
//!   With KV sharing (`kv.share_pattern`, spec §4) its unique layers carry the (step, layer)
//!   labels of a Seq/Cyc pattern with `N_r = loops`, and the KV policy makes the layer of
//!   step r >= 2 read the step-1 K/V of its layer index, in the cyclic path (Cyc, M-Cyc) or
//!   the plan order of the sequence path (Seq) like the recursive baseline.
//! - The recursive baseline (spec §2) has a plan with `N_r` steps and no router: every token
//!   runs every step with the plain update `h ← block(h)`.
//! - MoR adds a [`Router`]; its [`Update`] rule says how the block output is merged.
//!
//! Parameters tied by the sharing strategy have one storage: the model keeps one set of
//! `Var`s per unique block and every slot that uses the block reads the same `Var`s (the
//! reference code once lost these ties, spec §8, \[I#17\]; a test guards it).

use crate::relax::{LoraPair, Relax};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use mor_core::config::ResolvedConfig;
use mor_core::plan::{RecursionPlan, Segment};
use mor_core::rng::Rng;
use mor_kernels::{AttentionWeights, Backend, BackendCtx, PAD_POS};
use mor_kvcache::{KvCtx, KvPolicy, StepKv};
use mor_router::{RouteMode, Router, RouterCtx, RouterOutput, RouterStats, RoutingKind, Update};
use std::sync::Arc;

/// Parameters of one Llama decoder layer (one unique block of the plan).
#[derive(Debug, Clone)]
pub struct LayerParams {
    /// Pre-attention RMSNorm weight `[d]`.
    pub attn_norm: Var,
    /// Query projection `[hq·dh, d]`.
    pub q: Var,
    /// Key projection `[hkv·dh, d]`.
    pub k: Var,
    /// Value projection `[hkv·dh, d]`.
    pub v: Var,
    /// Output projection `[d, hq·dh]`.
    pub o: Var,
    /// Pre-MLP RMSNorm weight `[d]`.
    pub mlp_norm: Var,
    /// SwiGLU gate projection `[di, d]`.
    pub gate: Var,
    /// SwiGLU up projection `[di, d]`.
    pub up: Var,
    /// SwiGLU down projection `[d, di]`.
    pub down: Var,
}

/// Per-slot RMSNorm weights, used when `ln_share = false`.
#[derive(Debug, Clone)]
pub struct SlotNorms {
    /// Pre-attention norm `[d]`.
    pub attn_norm: Var,
    /// Pre-MLP norm `[d]`.
    pub mlp_norm: Var,
}

/// Loss and diagnostics of one forward.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Logits `[b, t, vocab]`.
    pub logits: Tensor,
    /// Router output (loss terms, stats); empty without a router.
    pub router: RouterOutput,
    /// Per row and position, the number of recursion steps the token ran (1..=N_r).
    pub depths: Vec<Vec<u8>>,
}

/// Output of [`MorModel::forward_loss`].
#[derive(Debug)]
pub struct LossOutput {
    /// Mean next-token cross-entropy (scalar, differentiable).
    pub ce: Tensor,
    /// Router output (loss terms, stats); empty without a router.
    pub router: RouterOutput,
    /// Per row and position, the number of recursion steps the token ran (1..=N_r).
    pub depths: Vec<Vec<u8>>,
}

/// Output of [`MorModel::forward_loss_deferred`].
#[derive(Debug)]
pub struct DeferredLossOutput {
    /// Mean next-token cross-entropy (scalar, differentiable).
    pub ce: Tensor,
    /// Router output: loss tensors, with its logged values still pending
    /// ([`RouterOutput::resolve`] reads them); empty without a router.
    pub router: RouterOutput,
}

/// The model.
#[derive(Debug)]
pub struct MorModel {
    cfg: ResolvedConfig,
    backend: Arc<dyn Backend>,
    kv: Arc<dyn KvPolicy>,
    router: Option<Box<dyn Router>>,
    embed: Var,
    lm_head: Option<Var>,
    blocks: Vec<LayerParams>,
    /// Per block, whether its K/V projections are used (see
    /// [`RecursionPlan::kv_projecting_blocks`]); the unused ones are not parameters.
    kv_blocks: Vec<bool>,
    slot_norms: Option<Vec<SlotNorms>>,
    final_norm: Var,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    /// Test-time depth cap ([`MorModel::set_max_depth`]); 0 = every recursion step.
    max_depth: std::sync::atomic::AtomicUsize,
    /// Relaxation of the shared weights per depth (spec §6), if configured.
    relax: Option<Relax>,
}

/// A named parameter.
pub type NamedVar = (String, Var);

fn init_var(
    seed: u64,
    name: &str,
    shape: &[usize],
    std: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Var> {
    let n: usize = shape.iter().product();
    let mut rng = Rng::derive(seed, name);
    let data = rng.normal_vec(n, std);
    let t = Tensor::from_vec(data, shape, dev)?.to_dtype(dtype)?;
    Ok(Var::from_tensor(&t)?)
}

fn ones_var(shape: &[usize], dtype: DType, dev: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::ones(shape, dtype, dev)?)?)
}

impl MorModel {
    /// Builds a freshly initialised model from a resolved config (N(0, init_std) weights,
    /// RMSNorm weights at 1, drawn from the config seed; spec §1.1), on the device of the
    /// config's backend (`backend.kind`; the CPU unless that backend runs elsewhere).
    pub fn new(cfg: &ResolvedConfig) -> Result<Self> {
        Self::new_with(cfg, DType::F32, Device::Cpu)
    }

    /// As [`MorModel::new`], with an explicit dtype (f64 is used by gradient checks) and a
    /// requested device. The backend is built for the request and has the last word: the
    /// parameters, RoPE tables and router live on [`Backend::device`] (one source of truth;
    /// e.g. the `cuda` backend given an `ordinal` picks its GPU whatever was requested).
    pub fn new_with(cfg: &ResolvedConfig, dtype: DType, requested: Device) -> Result<Self> {
        let m = &cfg.model;
        let backend = mor_kernels::build_backend(
            &cfg.backend.kind,
            &cfg.backend.params,
            &BackendCtx::new(requested).with_precision(cfg.train.precision),
        )?;
        let device = backend.device().clone();
        let kv = mor_kvcache::build_kv_policy(
            &cfg.kv.kind,
            &cfg.kv.params,
            &KvCtx {
                num_recursions: cfg.plan.num_recursions,
                backend: backend.clone(),
            },
        )?;
        let seed = cfg.seed;
        let std = m.init_std;
        let (d, hq, hkv, dh, di) = (
            m.hidden_size,
            m.num_heads,
            m.num_kv_heads,
            m.head_dim,
            m.intermediate_size,
        );
        let dev = &device;
        let embed = init_var(
            seed,
            "model.embed_tokens.weight",
            &[m.vocab_size, d],
            std,
            dtype,
            dev,
        )?;
        let lm_head = if m.tie_embeddings {
            None
        } else {
            Some(init_var(
                seed,
                "lm_head.weight",
                &[m.vocab_size, d],
                std,
                dtype,
                dev,
            )?)
        };
        let mut blocks = Vec::with_capacity(cfg.plan.num_blocks);
        for b in 0..cfg.plan.num_blocks {
            let p = format!("model.layers.{b}");
            blocks.push(LayerParams {
                attn_norm: ones_var(&[d], dtype, dev)?,
                q: init_var(
                    seed,
                    &format!("{p}.self_attn.q_proj.weight"),
                    &[hq * dh, d],
                    std,
                    dtype,
                    dev,
                )?,
                k: init_var(
                    seed,
                    &format!("{p}.self_attn.k_proj.weight"),
                    &[hkv * dh, d],
                    std,
                    dtype,
                    dev,
                )?,
                v: init_var(
                    seed,
                    &format!("{p}.self_attn.v_proj.weight"),
                    &[hkv * dh, d],
                    std,
                    dtype,
                    dev,
                )?,
                o: init_var(
                    seed,
                    &format!("{p}.self_attn.o_proj.weight"),
                    &[d, hq * dh],
                    std,
                    dtype,
                    dev,
                )?,
                mlp_norm: ones_var(&[d], dtype, dev)?,
                gate: init_var(
                    seed,
                    &format!("{p}.mlp.gate_proj.weight"),
                    &[di, d],
                    std,
                    dtype,
                    dev,
                )?,
                up: init_var(
                    seed,
                    &format!("{p}.mlp.up_proj.weight"),
                    &[di, d],
                    std,
                    dtype,
                    dev,
                )?,
                down: init_var(
                    seed,
                    &format!("{p}.mlp.down_proj.weight"),
                    &[d, di],
                    std,
                    dtype,
                    dev,
                )?,
            });
        }
        let slot_norms = if cfg.recursion.ln_share {
            None
        } else {
            let mut v = Vec::new();
            for _ in 0..cfg.plan.num_slots() {
                v.push(SlotNorms {
                    attn_norm: ones_var(&[d], dtype, dev)?,
                    mlp_norm: ones_var(&[d], dtype, dev)?,
                });
            }
            Some(v)
        };
        let final_norm = ones_var(&[d], dtype, dev)?;
        let router = match &cfg.router {
            None => None,
            Some(spec) => {
                if !cfg.plan.is_cyclic() {
                    return Err(Error::msg(format!(
                        "routing needs a cyclic plan (sharing cycle or middle_cycle); `{}` is not",
                        cfg.plan.strategy
                    )));
                }
                let ctx = RouterCtx {
                    hidden_size: d,
                    num_recursions: cfg.plan.num_recursions,
                    seq_len: m.seq_len,
                    init_std: std,
                    seed,
                    device: device.clone(),
                    backend: backend.clone(),
                    dtype,
                };
                Some(mor_router::build_router(&spec.kind, &spec.params, &ctx)?)
            }
        };
        // f64 tables for an f64 model: f32 ones would cap an f64 forward's agreement with an
        // f64 reference at about 1e-10.
        let (cos, sin) =
            mor_kernels::rope_tables_in(m.seq_len.max(1) * 4, dh, m.rope_theta, dtype, dev)?;
        // Steps >= 2 reuse the step-1 K/V and project none (spec §4): in a vanilla model with
        // KV sharing the blocks of those slots have K/V projections that nothing reads.
        let later_steps_share = kv.keeps_first_step() && !kv.projects_kv(2);
        let kv_blocks = cfg.plan.kv_projecting_blocks(later_steps_share);
        let weight = |block: usize, target: &str| block_weight(&blocks, block, target);
        let relax = Relax::new(cfg, dtype, &device, &|step| kv.projects_kv(step), &weight)?;
        Ok(MorModel {
            cfg: cfg.clone(),
            backend,
            kv,
            router,
            embed,
            lm_head,
            blocks,
            kv_blocks,
            slot_norms,
            final_norm,
            cos,
            sin,
            dtype,
            max_depth: std::sync::atomic::AtomicUsize::new(0),
            relax,
        })
    }

    /// Caps the recursion depth of every later forward at `depth` steps (test-time depth,
    /// spec Fig. 5c); `None` restores all N_r steps. Expert-choice routing stops after step
    /// `depth`; a token-choice token assigned a deeper depth finishes at step `depth` (its
    /// update is the finishing one, `H¹ + g·y`), as the decode engine's `max_depth` does.
    ///
    /// # Errors
    /// `depth` outside `1..=N_r`, or below N_r for a plan that is not cyclic (sequence
    /// sharing has no early exit).
    pub fn set_max_depth(&self, depth: Option<usize>) -> Result<()> {
        let n_r = self.cfg.plan.num_recursions;
        let d = match depth {
            None => 0,
            Some(d) if d == n_r => 0,
            Some(d) if (1..n_r).contains(&d) && self.cfg.plan.is_cyclic() => d,
            Some(d) => {
                return Err(Error::msg(format!(
                    "max depth {d} is not allowed for this model: use 1..={n_r}{}",
                    if self.cfg.plan.is_cyclic() {
                        ""
                    } else {
                        " (a non-cyclic plan allows only N_r)"
                    }
                )))
            }
        };
        self.max_depth
            .store(d, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The recursion steps a forward runs at most: the cap of
    /// [`MorModel::set_max_depth`], else N_r.
    pub fn max_depth(&self) -> usize {
        match self.max_depth.load(std::sync::atomic::Ordering::Relaxed) {
            0 => self.cfg.plan.num_recursions,
            d => d,
        }
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ResolvedConfig {
        &self.cfg
    }

    /// The recursion plan.
    pub fn plan(&self) -> &RecursionPlan {
        &self.cfg.plan
    }

    /// The router, if any.
    pub fn router(&self) -> Option<&dyn Router> {
        self.router.as_deref()
    }

    /// The compute backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The KV policy.
    pub fn kv_policy(&self) -> &Arc<dyn KvPolicy> {
        &self.kv
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The unique blocks.
    pub fn blocks(&self) -> &[LayerParams] {
        &self.blocks
    }

    /// Every trainable parameter of the main optimiser with its checkpoint name
    /// (Llama-style names for the unique blocks), each storage listed once. The K/V
    /// projections of a block that never computes K/V (a layer of step r >= 2 in a vanilla
    /// model with KV sharing, spec §4) are not listed: nothing reads them.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut v: Vec<NamedVar> = vec![("model.embed_tokens.weight".into(), self.embed.clone())];
        for (b, p) in self.blocks.iter().enumerate() {
            let n = |s: &str| format!("model.layers.{b}.{s}");
            if self.slot_norms.is_none() {
                v.push((n("input_layernorm.weight"), p.attn_norm.clone()));
                v.push((n("post_attention_layernorm.weight"), p.mlp_norm.clone()));
            }
            v.push((n("self_attn.q_proj.weight"), p.q.clone()));
            if self.kv_blocks.get(b).copied().unwrap_or(true) {
                v.push((n("self_attn.k_proj.weight"), p.k.clone()));
                v.push((n("self_attn.v_proj.weight"), p.v.clone()));
            }
            v.push((n("self_attn.o_proj.weight"), p.o.clone()));
            v.push((n("mlp.gate_proj.weight"), p.gate.clone()));
            v.push((n("mlp.up_proj.weight"), p.up.clone()));
            v.push((n("mlp.down_proj.weight"), p.down.clone()));
        }
        if let Some(norms) = &self.slot_norms {
            for (s, p) in norms.iter().enumerate() {
                v.push((
                    format!("model.slots.{s}.input_layernorm.weight"),
                    p.attn_norm.clone(),
                ));
                v.push((
                    format!("model.slots.{s}.post_attention_layernorm.weight"),
                    p.mlp_norm.clone(),
                ));
            }
        }
        v.push(("model.norm.weight".into(), self.final_norm.clone()));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".into(), h.clone()));
        }
        if let Some(r) = &self.router {
            for (name, var) in r.vars() {
                v.push((format!("model.{name}"), var));
            }
        }
        if let Some(r) = &self.relax {
            v.extend(r.named_vars());
        }
        v
    }

    /// The relaxation of the shared weights (spec §6), if the config has one.
    pub fn relaxation(&self) -> Option<&Relax> {
        self.relax.as_ref()
    }

    /// Sets every DoRA magnitude `m_r` to the row norms of its current shared weight (see
    /// [`Relax::reset_magnitudes`]): call it after replacing the shared weights of a fresh
    /// model (an uptraining initialisation), so that the untrained DoRA model equals its
    /// base model again. A no-op without DoRA.
    ///
    /// # Errors
    /// Tensor operations.
    pub fn reset_dora_magnitudes(&self) -> Result<()> {
        match &self.relax {
            Some(r) => {
                r.reset_magnitudes(&|block, target| block_weight(&self.blocks, block, target))
            }
            None => Ok(()),
        }
    }

    /// Parameters of the auxiliary router (its own optimiser), if any.
    pub fn aux_named_vars(&self) -> Vec<NamedVar> {
        match &self.router {
            Some(r) => r
                .aux_vars()
                .into_iter()
                .map(|(n, v)| (format!("model.{n}"), v))
                .collect(),
            None => Vec::new(),
        }
    }

    /// True when the parameter is excluded from weight decay (RMSNorm weights; spec §1.3).
    pub fn no_decay(name: &str) -> bool {
        name.ends_with("layernorm.weight") || name == "model.norm.weight" || name.ends_with(".bias")
    }

    fn norms_for_slot(&self, slot: usize, block: usize) -> (&Var, &Var) {
        match &self.slot_norms {
            Some(n) => (&n[slot].attn_norm, &n[slot].mlp_norm),
            None => (&self.blocks[block].attn_norm, &self.blocks[block].mlp_norm),
        }
    }

    /// Runs one decoder layer on `h: [b, n, d]` whose tokens sit at positions `pos: [b, n]`.
    ///
    /// `kv` decides the keys/values: `None` = the layer's own fresh K/V (prelude, coda,
    /// plain runs); `Some((policy, step, first))` = a recursion slot under the KV policy.
    /// Returns the new hidden state and the fresh K/V (when computed).
    fn layer(
        &self,
        h: &Tensor,
        pos: &Tensor,
        slot: usize,
        block: usize,
        kv: Option<(usize, Option<&StepKv>)>,
    ) -> Result<(Tensor, Option<StepKv>)> {
        let m = &self.cfg.model;
        let be = &self.backend;
        let p = &self.blocks[block];
        let (an, mn) = self.norms_for_slot(slot, block);
        let mlp = |h: &Tensor| {
            be.mlp_block(
                h,
                mn.as_tensor(),
                m.rms_eps,
                p.gate.as_tensor(),
                p.up.as_tensor(),
                p.down.as_tensor(),
            )
        };
        let own_kv_only = match kv {
            None => true,
            // Recursion slots whose policy attends to the fresh K/V only and keeps nothing
            // for later steps.
            Some((step, _)) => self.kv.trains_on_fresh_kv(step) && !self.kv.keeps_first_step(),
        };
        let lora = self.relax.as_ref().and_then(|r| r.lora(slot));
        let adapted = self.relax.as_ref().is_some_and(|r| r.adapts_slot(slot));
        let (step, first) = match kv {
            Some(kv) if !own_kv_only => kv,
            _ if adapted => {
                // A relaxed recursion slot attending to its own fresh K/V: unfused, so the
                // low-rank terms enter each projection and the prompt the attention output.
                return self.layer_relaxed_own_kv(h, pos, slot, p, (an, mn), lora);
            }
            _ => {
                // The layer's own K/V, needed by nothing else: the whole attention half is one
                // backend op (fused on the cpu backend).
                let w = AttentionWeights {
                    norm: an.as_tensor(),
                    eps: m.rms_eps,
                    q: p.q.as_tensor(),
                    k: p.k.as_tensor(),
                    v: p.v.as_tensor(),
                    o: p.o.as_tensor(),
                    heads: m.num_heads,
                    kv_heads: m.num_kv_heads,
                };
                let h = be.attention_block(h, &w, pos, &self.cos, &self.sin)?;
                return Ok((mlp(&h)?, None));
            }
        };
        let x = be.rms_norm(h, an.as_tensor(), m.rms_eps)?;
        let proj = |x: &Tensor, w: &Var, pick: fn(&crate::relax::SlotLora) -> Option<&LoraPair>| {
            self.project(x, w, lora.and_then(pick))
        };
        // Each projection is one op and each head split/merge another (see
        // `Backend::linear`, `Backend::rope_heads`): the fused backends then pay one
        // gradient buffer per op instead of one per reshape and transpose.
        let q = be.rope_heads(
            &proj(&x, &p.q, |l| l.q.as_ref())?,
            m.num_heads,
            pos,
            &self.cos,
            &self.sin,
        )?;
        let project = self.kv.projects_kv(step);
        let fresh = if project {
            let k = be.rope_heads(
                &proj(&x, &p.k, |l| l.k.as_ref())?,
                m.num_kv_heads,
                pos,
                &self.cos,
                &self.sin,
            )?;
            let v = be.split_heads(&proj(&x, &p.v, |l| l.v.as_ref())?, m.num_kv_heads)?;
            Some(StepKv {
                k,
                v,
                pos: pos.clone(),
            })
        } else {
            None
        };
        let eff = self.kv.training_kv(step, fresh.as_ref(), first, pos)?;
        let att = be.attention(&q, &eff.k, &eff.v, pos, &eff.pos)?;
        let att = be.merge_heads(&self.add_prompt(att, slot, &q, p)?)?;
        let h = (h + proj(&att, &p.o, |l| l.o.as_ref())?)?;
        Ok((mlp(&h)?, fresh))
    }

    /// `W x`, plus the relaxation's low-rank term when `pair` is given.
    fn project(&self, x: &Tensor, w: &Var, pair: Option<&LoraPair>) -> Result<Tensor> {
        match (&self.relax, pair) {
            (Some(r), Some(_)) => r.project(&*self.backend, x, w.as_tensor(), pair),
            _ => Ok(self.backend.linear(x, w.as_tensor())?),
        }
    }

    /// `att + ` the adaption prompt's term of slot `slot` (spec §6.4; see
    /// [`Relax::prompt_attention`]) on `att, q: [b, n_head, t, d_head]`; `att` itself
    /// without a prompt.
    fn add_prompt(&self, att: Tensor, slot: usize, q: &Tensor, p: &LayerParams) -> Result<Tensor> {
        let Some(r) = &self.relax else {
            return Ok(att);
        };
        match r.prompt_attention(
            &*self.backend,
            slot,
            q,
            p.k.as_tensor(),
            p.v.as_tensor(),
            self.cfg.model.num_kv_heads,
        )? {
            Some(extra) => Ok((att + extra)?),
            None => Ok(att),
        }
    }

    /// One decoder layer with relaxed projections (LoRA, DoRA) or an adaption prompt,
    /// attending to its own fresh K/V (no KV policy involved): the unfused form of
    /// `Backend::attention_block`.
    fn layer_relaxed_own_kv(
        &self,
        h: &Tensor,
        pos: &Tensor,
        slot: usize,
        p: &LayerParams,
        (an, mn): (&Var, &Var),
        lora: Option<&crate::relax::SlotLora>,
    ) -> Result<(Tensor, Option<StepKv>)> {
        let m = &self.cfg.model;
        let be = &self.backend;
        let x = be.rms_norm(h, an.as_tensor(), m.rms_eps)?;
        let pick = |f: fn(&crate::relax::SlotLora) -> Option<&LoraPair>| lora.and_then(f);
        let q = be.rope_heads(
            &self.project(&x, &p.q, pick(|l| l.q.as_ref()))?,
            m.num_heads,
            pos,
            &self.cos,
            &self.sin,
        )?;
        let k = be.rope_heads(
            &self.project(&x, &p.k, pick(|l| l.k.as_ref()))?,
            m.num_kv_heads,
            pos,
            &self.cos,
            &self.sin,
        )?;
        let v = be.split_heads(
            &self.project(&x, &p.v, pick(|l| l.v.as_ref()))?,
            m.num_kv_heads,
        )?;
        let att = be.attention(&q, &k, &v, pos, pos)?;
        let att = be.merge_heads(&self.add_prompt(att, slot, &q, p)?)?;
        let h = (h + self.project(&att, &p.o, pick(|l| l.o.as_ref()))?)?;
        let h = be.mlp_block(
            &h,
            mn.as_tensor(),
            m.rms_eps,
            p.gate.as_tensor(),
            p.up.as_tensor(),
            p.down.as_tensor(),
        )?;
        Ok((h, None))
    }

    /// Runs the layer slots `slots` (indices into the plan) on all tokens.
    fn run_full_slots(&self, mut h: Tensor, pos: &Tensor, slots: &[usize]) -> Result<Tensor> {
        for &s in slots {
            let block = self.cfg.plan.slots[s].block;
            h = self.layer(&h, pos, s, block, None)?.0;
        }
        Ok(h)
    }

    /// Full forward.
    ///
    /// # Shapes
    /// `ids: [b, t]` (u32) → logits `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor, mode: RouteMode) -> Result<ForwardOutput> {
        let (h, router, depths) = self.trunk(ids, mode, true)?;
        let logits = self.backend.linear(&h, self.lm_head_weight().as_tensor())?;
        Ok(ForwardOutput {
            logits,
            router,
            depths,
        })
    }

    /// Forward pass and mean next-token cross-entropy against `targets: [b, t]` (u32), for
    /// training: the same loss as [`MorModel::cross_entropy`] of [`MorModel::forward`]'s
    /// logits, but the LM head and the loss are one backend op
    /// ([`Backend::linear_cross_entropy`]), so the `[b·t, vocab]` logits never enter the
    /// autograd graph.
    pub fn forward_loss(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        mode: RouteMode,
    ) -> Result<LossOutput> {
        let (h, router, depths) = self.trunk(ids, mode, true)?;
        let ce =
            self.backend
                .linear_cross_entropy(&h, self.lm_head_weight().as_tensor(), targets)?;
        Ok(LossOutput { ce, router, depths })
    }

    /// [`MorModel::forward_loss`] without reading anything to the host: the router's
    /// logged terms and statistics stay on the device in [`RouterOutput::pending`] (the
    /// trainer reads those of every micro-batch of a step with the step's loss, in one
    /// host read), and the token depths are not returned. On the device routing path the
    /// forward makes no host read at all.
    pub fn forward_loss_deferred(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        mode: RouteMode,
    ) -> Result<DeferredLossOutput> {
        let (h, router, _) = self.trunk(ids, mode, false)?;
        let ce =
            self.backend
                .linear_cross_entropy(&h, self.lm_head_weight().as_tensor(), targets)?;
        Ok(DeferredLossOutput { ce, router })
    }

    /// Everything up to and including the final norm: `[b, t, d]`, router output, depths;
    /// without `resolve` the router's logged values stay pending (see
    /// [`MorModel::forward_loss_deferred`]).
    fn trunk(
        &self,
        ids: &Tensor,
        mode: RouteMode,
        resolve: bool,
    ) -> Result<(Tensor, RouterOutput, Vec<Vec<u8>>)> {
        let (b, t) = ids.dims2()?;
        if t == 0 || b == 0 {
            return Err(Error::msg("forward needs at least one token per row"));
        }
        if t > self.cos.dim(0)? {
            return Err(Error::msg(format!(
                "sequence of {t} tokens exceeds the RoPE table ({})",
                self.cos.dim(0)?
            )));
        }
        let dev = ids.device();
        let d = self.cfg.model.hidden_size;
        let h = self
            .embed
            .as_tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let pos_row: Vec<u32> = (0..t as u32).collect();
        let pos = Tensor::from_vec(pos_row.repeat(b), (b, t), dev)?;
        let plan = &self.cfg.plan;
        let prelude: Vec<usize> = (0..plan.num_slots())
            .filter(|&s| plan.slots[s].segment == Segment::Prelude)
            .collect();
        let coda: Vec<usize> = (0..plan.num_slots())
            .filter(|&s| plan.slots[s].segment == Segment::Coda)
            .collect();
        let h = self.run_full_slots(h, &pos, &prelude)?;
        let n_r = plan.num_recursions;
        let mut depths = vec![vec![0u8; t]; b];
        let (h, router_out) = if !plan.is_cyclic() {
            // Non-cyclic plans (sequence sharing, and the Seq patterns of vanilla KV sharing)
            // only exist without a router: every token runs every recursion slot in plan
            // order.
            for row in depths.iter_mut() {
                row.iter_mut().for_each(|x| *x = n_r as u8);
            }
            (self.sequence_recursion(h, &pos)?, RouterOutput::default())
        } else {
            self.recursion(h, &pos, mode, &mut depths, resolve)?
        };
        let h = self.run_full_slots(h, &pos, &coda)?;
        let h = self
            .backend
            .rms_norm(&h, self.final_norm.as_tensor(), self.cfg.model.rms_eps)?;
        Ok((h, router_out, depths))
    }

    /// The recursion slots of a non-cyclic plan (sequence, middle_sequence), in plan order,
    /// every token at every slot. The KV policy applies as in the cyclic path, by block
    /// layer: the slot of step r >= 2 and layer j reads the step-1 K/V of layer j when the
    /// policy keeps step 1 (spec §4: "layer j of step r ≥ 2 reuses the step-1 K/V of
    /// layer j"); under sequence sharing that is the first of the consecutive applications
    /// of the same block.
    fn sequence_recursion(&self, mut h: Tensor, pos: &Tensor) -> Result<Tensor> {
        let keeps_first = self.kv.keeps_first_step();
        let mut first_kv: std::collections::HashMap<usize, StepKv> = Default::default();
        for (slot, s) in self.cfg.plan.slots.iter().enumerate() {
            let Segment::Recursion { step, layer } = s.segment else {
                continue;
            };
            let first = if step >= 2 && keeps_first {
                Some(first_kv.get(&layer).ok_or_else(|| {
                    Error::msg(format!(
                        "slot {slot} (step {step}, layer {layer}) reuses the step-1 K/V of layer                          {layer}, which no earlier slot computed"
                    ))
                })?)
            } else {
                None
            };
            if layer == 0 {
                // The recursion encoding of step r enters with the hidden state (spec §6).
                if let Some(r) = &self.relax {
                    h = r.encode(&h, step)?;
                }
            }
            let (ny, fresh) = self.layer(&h, pos, slot, s.block, Some((step, first)))?;
            if step == 1 && keeps_first {
                let fresh = fresh
                    .ok_or_else(|| Error::msg("KV policy kept step 1 but did not project it"))?;
                first_kv.insert(layer, fresh);
            }
            h = ny;
        }
        Ok(h)
    }

    /// Slot indices of recursion step `step`, in order.
    fn step_slots(&self, step: usize) -> Vec<(usize, usize)> {
        self.cfg
            .plan
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.segment {
                Segment::Recursion { step: r, .. } if r == step => Some((i, s.block)),
                _ => None,
            })
            .collect()
    }

    /// The recursion steps (cyclic plan), with or without a router.
    /// With `resolve`, the router's logged values (and the depths of a forward routed on
    /// the device) are read to the host; without, they stay in [`RouterOutput::pending`]
    /// and `depths` holds the host-routed steps only.
    fn recursion(
        &self,
        mut h: Tensor,
        pos: &Tensor,
        mode: RouteMode,
        depths: &mut [Vec<u8>],
        resolve: bool,
    ) -> Result<(Tensor, RouterOutput)> {
        let (b, t, _) = h.dims3()?;
        let dev = h.device().clone();
        let n_r = self.cfg.plan.num_recursions;
        let cap = self.max_depth();
        let h1 = h.clone();
        let mut active: Vec<Vec<u32>> = vec![(0..t as u32).collect(); b];
        // The active positions `[b, c]` on the device when the last step was decided by
        // `route_device` (then `active` is stale); the next step reads them to the host
        // only if it takes the host path.
        let mut active_dev: Option<Tensor> = None;
        // The `valid` mask of a padded `active_dev` (1 = the entry ran the last step).
        let mut active_valid: Option<Tensor> = None;
        let device_routing = self
            .router
            .as_ref()
            .is_some_and(|r| r.routes_on_device(&dev));
        let mut routed_on_device = false;
        let mut state = match &self.router {
            Some(r) => Some(r.begin(&h1, mode)?),
            None => None,
        };
        let keeps_first = self.kv.keeps_first_step();
        let mut first_kv: Vec<StepKv> = Vec::new();
        for step in 1..=cap.min(n_r) {
            let mut dev_routing = None;
            if device_routing {
                if let (Some(r), Some(st)) = (&self.router, state.as_mut()) {
                    let act = match &active_dev {
                        Some(a) => Some(a.clone()),
                        None => uniform_rows(&active, &dev)?,
                    };
                    if let Some(act) = act {
                        dev_routing = r.route_device(step, &h, &act, st, mode)?;
                    }
                }
            }
            if dev_routing.is_none() {
                if let Some(a) = active_dev.take() {
                    // The last step's positions (and its padding mask, in the same read):
                    // padding entries did not run it, so they are not active now.
                    let c = a.dim(1)?.max(1);
                    let valid = active_valid.take();
                    let both = match &valid {
                        Some(v) => Tensor::cat(
                            &[&a.flatten_all()?, &v.flatten_all()?.to_dtype(DType::U32)?],
                            0,
                        )?,
                        None => a.flatten_all()?,
                    };
                    let flat = mor_kernels::host_sync::to_host::<u32>(&both)?;
                    let (sel, valid) = flat.split_at(a.elem_count());
                    active = sel
                        .chunks(c)
                        .enumerate()
                        .map(|(i, row)| {
                            row.iter()
                                .enumerate()
                                .filter(|&(j, _)| valid.is_empty() || valid[i * c + j] != 0)
                                .map(|(_, &p)| p)
                                .collect()
                        })
                        .collect();
                }
            }
            let mut routing = match (&dev_routing, &self.router, state.as_mut()) {
                (None, Some(r), Some(st)) => Some(r.route(step, &h, &active, st, mode)?),
                _ => None,
            };
            // At the depth cap every token-choice token still running finishes here.
            let cap_finish = step == cap && cap < n_r;
            if cap_finish {
                let update = match (&mut dev_routing, &mut routing) {
                    (Some(d), _) => Some(&mut d.update),
                    (None, Some(r)) => Some(&mut r.update),
                    _ => None,
                };
                if let Some(Update::TokenChoice { finishing, .. }) = update {
                    finishing.iter_mut().for_each(|f| *f = true);
                }
            }
            let (idx_t, pos_sel, full, valid, kmax, selected) = match &dev_routing {
                Some(d) => {
                    // Every row keeps `k` positions: no padding, indices and positions
                    // are the kept positions themselves.
                    let (rows, k) = d.sel.dims2()?;
                    if rows != b || k == 0 || k > t {
                        return Err(Error::msg(format!(
                            "router `{}` kept positions of shape [{rows}, {k}] on the device; \
                             [{b}, 1..={t}] expected",
                            self.router.as_ref().map_or("", |r| r.name())
                        )));
                    }
                    if step == 1 && keeps_first && (k != t || d.valid.is_some()) {
                        return Err(self.first_step_error());
                    }
                    // Without padding, `k = t` keeps every position in order.
                    let full = k == t && d.valid.is_none();
                    let pos_sel = match &d.valid {
                        _ if full => pos.clone(),
                        None => d.sel.clone(),
                        // Padding: PAD_POS neither attends nor is attended to.
                        Some(v) => v.where_cond(&d.sel, &Tensor::full(PAD_POS, (b, k), &dev)?)?,
                    };
                    (d.sel.clone(), pos_sel, full, vec![true; b * k], k, None)
                }
                None => {
                    let selected: Vec<Vec<u32>> = match &routing {
                        Some(rt) => rt.selected.clone(),
                        None => active.clone(),
                    };
                    let n_sel: usize = selected.iter().map(Vec::len).sum();
                    for (row, sel) in selected.iter().enumerate() {
                        for &p in sel {
                            depths[row][p as usize] = step as u8;
                        }
                    }
                    if step == 1 && keeps_first && selected.iter().any(|s| s.len() != t) {
                        return Err(self.first_step_error());
                    }
                    if n_sel == 0 {
                        break;
                    }
                    let kmax = selected.iter().map(Vec::len).max().unwrap_or(0);
                    // Pad rows to kmax with distinct unselected positions (index) and PAD_POS
                    // (position), so padded tokens neither attend nor are attended to.
                    let mut idx = Vec::with_capacity(b * kmax);
                    let mut qpos = Vec::with_capacity(b * kmax);
                    let mut valid = Vec::with_capacity(b * kmax);
                    for sel in &selected {
                        idx.extend_from_slice(sel);
                        qpos.extend_from_slice(sel);
                        valid.extend(std::iter::repeat_n(true, sel.len()));
                        if sel.len() < kmax {
                            let mut taken = vec![false; t];
                            for &p in sel {
                                taken[p as usize] = true;
                            }
                            let pads = (0..t as u32)
                                .filter(|&p| !taken[p as usize])
                                .take(kmax - sel.len());
                            for p in pads {
                                idx.push(p);
                                qpos.push(PAD_POS);
                                valid.push(false);
                            }
                        }
                    }
                    let idx_t = Tensor::from_vec(idx, (b, kmax), &dev)?;
                    let pos_t = Tensor::from_vec(qpos, (b, kmax), &dev)?;
                    let full = kmax == t && valid.iter().all(|&v| v);
                    let pos_sel = if full { pos.clone() } else { pos_t };
                    (idx_t, pos_sel, full, valid, kmax, Some(selected))
                }
            };
            let x = if full {
                h.clone()
            } else {
                self.backend.gather_tokens(&h, &idx_t)?
            };
            // The recursion encoding of step r is added to the hidden state entering the
            // shared block at that step (spec §6); the update rules still read `x`.
            let mut y = match &self.relax {
                Some(r) => r.encode(&x, step)?,
                None => x.clone(),
            };
            for (j, (slot, block)) in self.step_slots(step).into_iter().enumerate() {
                let first = if step >= 2 && keeps_first {
                    first_kv.get(j)
                } else {
                    None
                };
                let (ny, fresh) = self.layer(&y, &pos_sel, slot, block, Some((step, first)))?;
                if step == 1 && keeps_first {
                    first_kv.push(fresh.ok_or_else(|| {
                        Error::msg("KV policy kept step 1 but did not project it")
                    })?);
                }
                y = ny;
            }
            // The device path's token-choice flags (`[b, k]` valid, finishing).
            let dev_flags = dev_routing
                .as_ref()
                .and_then(|d| d.finishing.as_ref().map(|f| (d.valid.as_ref(), f)));
            let merge = match (&dev_routing, &routing) {
                (Some(d), _) => Some((d.gate.as_ref(), &d.update)),
                (None, Some(rt)) => Some((rt.gate.as_ref(), &rt.update)),
                _ => None,
            };
            h = match merge {
                None => {
                    // Recursive baseline: plain h <- block(h) for every token.
                    if full {
                        y
                    } else {
                        let delta = (&y - &x)?;
                        self.backend.scatter_add_tokens(&h, &idx_t, &delta, None)?
                    }
                }
                Some((gate, update)) => {
                    let gate = match gate {
                        Some(g) => Some(pad_flat(g, &valid, b, kmax)?),
                        None => None,
                    };
                    match update {
                        Update::Residual => {
                            let dev_valid = dev_routing.as_ref().and_then(|d| d.valid.as_ref());
                            let w = match (gate, dev_valid) {
                                (Some(g), _) => g,
                                (None, Some(v)) => v.to_dtype(h.dtype())?,
                                (None, None) => Tensor::from_vec(
                                    valid
                                        .iter()
                                        .map(|&v| if v { 1f32 } else { 0f32 })
                                        .collect::<Vec<_>>(),
                                    (b, kmax),
                                    &dev,
                                )?
                                .to_dtype(h.dtype())?,
                            };
                            self.backend.scatter_add_tokens(&h, &idx_t, &y, Some(&w))?
                        }
                        Update::TokenChoice {
                            finishing,
                            gate_intermediate,
                        } => {
                            // delta = a·y + b·H1 − m·x (spec §3.2, code form):
                            // continuing: h ← y (·g if gate_intermediate); finishing: h ← H1 + g·y.
                            let (fin, cont, m) = match dev_flags {
                                // The device path's flags: valid (`m`) and finishing.
                                Some((v, f)) => {
                                    let m = match v {
                                        Some(v) => v.to_dtype(h.dtype())?,
                                        None => Tensor::ones((b, kmax), h.dtype(), &dev)?,
                                    };
                                    let fin = if cap_finish {
                                        m.clone()
                                    } else {
                                        f.to_dtype(h.dtype())?
                                    };
                                    let cont = (&m - &fin)?;
                                    (fin, cont, m)
                                }
                                None => {
                                    let mut fin_pad = Vec::with_capacity(b * kmax);
                                    let mut it = finishing.iter();
                                    for &v in &valid {
                                        fin_pad.push(if v {
                                            *it.next().unwrap_or(&false)
                                        } else {
                                            false
                                        });
                                    }
                                    let f32v = |f: &dyn Fn(usize) -> f32| -> Result<Tensor> {
                                        let v: Vec<f32> = (0..b * kmax).map(f).collect();
                                        Ok(Tensor::from_vec(v, (b, kmax), &dev)?
                                            .to_dtype(h.dtype())?)
                                    };
                                    let fin = f32v(&|i| if fin_pad[i] { 1.0 } else { 0.0 })?;
                                    let cont =
                                        f32v(&|i| if valid[i] && !fin_pad[i] { 1.0 } else { 0.0 })?;
                                    let m = f32v(&|i| if valid[i] { 1.0 } else { 0.0 })?;
                                    (fin, cont, m)
                                }
                            };
                            let g = match gate {
                                Some(g) => g,
                                None => m.clone(),
                            };
                            let a = if *gate_intermediate {
                                (&g * &m)?
                            } else {
                                ((&g * &fin)? + &cont)?
                            };
                            let h1_sel = self.backend.gather_tokens(&h1, &idx_t)?;
                            let delta = ((y.broadcast_mul(&a.unsqueeze(2)?)?
                                + h1_sel.broadcast_mul(&fin.unsqueeze(2)?)?)?
                                - x.broadcast_mul(&m.unsqueeze(2)?)?)?;
                            self.backend.scatter_add_tokens(&h, &idx_t, &delta, None)?
                        }
                    }
                }
            };
            match (dev_routing, selected) {
                (Some(d), _) => {
                    active_dev = Some(d.sel);
                    active_valid = d.valid;
                    routed_on_device = true;
                }
                (None, Some(selected)) => active = selected,
                (None, None) => {}
            }
        }
        let out = match (&self.router, state) {
            (Some(r), Some(st)) if resolve && routed_on_device => {
                // The router's logged values with the token depths of a forward routed on
                // the device: the one host read of the forward. `finish_with_depths`, which
                // a third-party router routing on the device may implement itself.
                let (out, d) = r.finish_with_depths(st)?;
                let d = d.filter(|d| d.len() == b * t).ok_or_else(|| {
                    Error::msg(format!(
                        "router `{}` routed on the device but returned no depth for each of \
                         the {b}x{t} tokens",
                        r.name()
                    ))
                })?;
                for (row, dr) in depths.iter_mut().zip(d.chunks(t)) {
                    for (x, &v) in row.iter_mut().zip(dr) {
                        *x = v as u8;
                    }
                }
                out
            }
            (Some(r), Some(st)) => {
                let mut out = r.finish_pending(st)?;
                if resolve {
                    // The router's logged values: the one host read of the forward.
                    out.resolve(false)?;
                }
                out
            }
            _ => RouterOutput::default(),
        };
        Ok((h, out))
    }

    /// The error of a KV policy that reuses the step-1 K/V when not every token runs step 1.
    fn first_step_error(&self) -> Error {
        Error::msg(format!(
            "KV policy `{}` reuses the step-1 keys/values, so every token must run step 1 \
             (set the router's first capacity to 1)",
            self.kv.name()
        ))
    }

    /// Mean next-token cross-entropy of `logits: [b, t, V]` against `targets: [b, t]`
    /// (u32), over every position (differentiable).
    pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        Ok(crate::loss::cross_entropy(
            &logits.reshape((b * t, v))?,
            &targets.reshape(b * t)?,
        )?)
    }

    /// Summed next-token NLL per row, as host values (no graph), for evaluation.
    pub fn nll_per_token(logits: &Tensor, targets: &Tensor) -> Result<Vec<f32>> {
        let (b, t, v) = logits.dims3()?;
        let logp = candle_nn::ops::log_softmax(
            &logits.detach().reshape((b * t, v))?.to_dtype(DType::F32)?,
            D::Minus1,
        )?;
        let picked = logp.gather(&targets.reshape((b * t, 1))?.contiguous()?, 1)?;
        Ok((picked * -1.0)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Merges router stats of a forward into `acc`.
    pub fn merge_stats(acc: &mut RouterStats, s: &RouterStats) {
        acc.merge(s);
    }

    /// Whether the router is expert- or token-choice (`None` without a router).
    pub fn routing_kind(&self) -> Option<RoutingKind> {
        self.router.as_ref().map(|r| r.kind())
    }

    /// The token embedding `[vocab, d]` (used by the inference engine).
    pub fn embedding(&self) -> &Var {
        &self.embed
    }

    /// The LM head weight `[vocab, d]`: the embedding when the head is tied (spec §1.1).
    pub fn lm_head_weight(&self) -> &Var {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final RMSNorm weight `[d]`.
    pub fn final_norm_weight(&self) -> &Var {
        &self.final_norm
    }

    /// The (pre-attention, pre-MLP) RMSNorm weights that layer slot `slot` uses: the slot's
    /// own norms when `ln_share = false`, its block's otherwise; `None` for a slot out of
    /// range.
    pub fn slot_norm_weights(&self, slot: usize) -> Option<(&Var, &Var)> {
        let block = self.cfg.plan.slots.get(slot)?.block;
        if block >= self.blocks.len() {
            return None;
        }
        if let Some(n) = &self.slot_norms {
            n.get(slot)?;
        }
        Some(self.norms_for_slot(slot, block))
    }

    /// The RoPE tables `(cos, sin)`, each `[max_pos, head_dim / 2]`.
    pub fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }
}

/// The attention weight `target` (`q_proj`, `k_proj`, `v_proj`, `o_proj`) of `blocks[block]`.
fn block_weight(blocks: &[LayerParams], block: usize, target: &str) -> Option<Tensor> {
    let p = blocks.get(block)?;
    let v = match target {
        "q_proj" => &p.q,
        "k_proj" => &p.k,
        "v_proj" => &p.v,
        "o_proj" => &p.o,
        _ => return None,
    };
    Some(v.as_tensor().clone())
}

/// `rows` as a `[b, c]` u32 tensor on `dev` when every row has the same length `c`.
fn uniform_rows(rows: &[Vec<u32>], dev: &Device) -> Result<Option<Tensor>> {
    let c = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != c) {
        return Ok(None);
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Some(Tensor::from_vec(flat, (rows.len(), c), dev)?))
}

/// Spreads a flat gate `[n_valid]` into `[b, kmax]` with zeros at padded slots.
fn pad_flat(g: &Tensor, valid: &[bool], b: usize, kmax: usize) -> Result<Tensor> {
    if valid.iter().all(|&v| v) {
        return Ok(g.reshape((b, kmax))?);
    }
    let n = g.dim(0)?;
    let ext = Tensor::cat(&[g, &Tensor::zeros(1, g.dtype(), g.device())?], 0)?;
    let mut map = Vec::with_capacity(valid.len());
    let mut k = 0u32;
    for &v in valid {
        if v {
            map.push(k);
            k += 1;
        } else {
            map.push(n as u32);
        }
    }
    let map = Tensor::from_vec(map, valid.len(), g.device())?;
    Ok(ext.index_select(&map, 0)?.reshape((b, kmax))?)
}
