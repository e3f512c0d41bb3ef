//! Incremental decoding of one request, token by token (spec §4 "Decoding", §5).
//!
//! For every new token:
//!
//! ```text
//! embed -> prelude slots (append K/V, attend to this request's cache of the slot)
//!       -> H¹ (token-choice: the router fixes the depth now)
//!       -> for r in 1..=N_r:
//!            expert-choice: continue iff the causal rule says so and the token ran r-1
//!            token-choice:  continue iff r <= depth
//!            run the slots of step r (append K/V where `writes`, attend over `view`)
//!            merge: h + g·y (expert), H¹ + g·y / y (token), y (no router)
//!       -> (leaving the loop early is the early exit)
//!       -> coda slots -> final RMSNorm -> LM head -> logits
//! ```
//!
//! The merge rules are those of the training forward (`MorModel::forward`), so decoding a
//! sequence gives the logits of one causal forward ([`RouteMode::Causal`]) over the same ids;
//! the tests check it for every KV policy and router. The [`Engine`](super::Engine) batches
//! the same computation across requests.
//!
//! # Why decoding equals the causal forward under each KV policy (spec §4)
//! - Recursion-wise: the training forward runs step r on the selected tokens with causal
//!   attention among them; a decoded token at step r attends to the earlier tokens that
//!   reached step r, which is the same set because the causal rule decides each token from
//!   its own hidden state.
//! - Recursive sharing: steps r ≥ 2 attend to the step-1 K/V of the whole causal context in
//!   both (every token runs step 1).
//! - Hybrid: at step r the forward attends to the step-1 K/V with the positions selected at
//!   step r replaced by their step-r K/V; the decode view is the step-1 page overlaid by the
//!   step-r page, which holds exactly the positions that reached step r. A query at
//!   position t only sees keys at positions ≤ t, all decoded before it, so the overlay is
//!   complete. The two agree; no part of the training-time definition depends on tokens
//!   after t.
//! - A non-cyclic plan (sequence sharing, recursive baseline only) gives every slot its own
//!   K/V in the forward whatever the policy, so its decode cache is recursion-wise.
//!
//! One case cannot agree: a `rand_router` draws its scores from a counter keyed by the
//! forward's number, so a decode and a full forward draw different random scores.
//!
//! [`RouteMode::Causal`]: mor_router::RouteMode::Causal

use super::runner::{ExitRule, Merge, Runner, Tok};
use super::sampling::{Sampler, SamplingParams};
use crate::model::MorModel;
use crate::{Error, Result};
use mor_core::config::Precision;
use mor_kvcache::decode::KvPrecision;
use mor_kvcache::DecodeCache;
use mor_router::RoutingKind;

/// Options of a [`Decoder`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// When expert-choice tokens exit.
    pub exit: ExitRule,
    /// Deepest recursion step a token may take (`None` = `N_r`; test-time scaling).
    pub max_depth: Option<usize>,
    /// Tokens per cache block.
    pub block_tokens: usize,
    /// Precision of the packed weights (`Bf16`: products with bf16 inputs and f32
    /// accumulation; everything else stays f32).
    pub precision: Precision,
    /// How the KV cache stores K and V (`Bf16`: rounded to bf16 on write, half the bytes
    /// attention streams; the arithmetic stays f32).
    pub kv_precision: KvPrecision,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            exit: ExitRule::Router,
            max_depth: None,
            block_tokens: 16,
            precision: Precision::F32,
            kv_precision: KvPrecision::F32,
        }
    }
}

/// What decoding one token gives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStep {
    /// Logits of the next token `[vocab]`.
    pub logits: Vec<f32>,
    /// Recursion steps the token ran (`N_r` for a model without router; the compute spent
    /// to predict the next token, spec §7).
    pub depth: usize,
    /// Expert-choice: the gate `g_r` of every step `r` the router scored (including, under
    /// [`ExitRule::GateThresholds`], the step at which the token left); token-choice: the
    /// token's gate; empty without a router.
    pub gates: Vec<f32>,
}

/// Decodes one request token by token with a per-request KV cache.
///
/// # Examples
/// ```
/// use mor_core::config::Config;
/// use mor_models::engine::{DecodeOptions, Decoder};
/// use mor_models::MorModel;
///
/// let _ = mor_models::builtin::link();
/// let cfg = Config::from_toml_str("[model]\npreset = \"micro\"\n[train]\nbudget = { steps = 1 }").unwrap();
/// let model = MorModel::new(&cfg).unwrap();
/// let mut dec = Decoder::new(&model, DecodeOptions::default()).unwrap();
/// let step = dec.step(3).unwrap();
/// assert_eq!(step.logits.len(), cfg.model.vocab_size);
/// assert_eq!(dec.position(), 1);
/// ```
#[derive(Debug)]
pub struct Decoder<'m> {
    runner: Runner<'m>,
    cache: Box<dyn DecodeCache>,
    pos: u32,
}

const REQ: u64 = 0;

impl<'m> Decoder<'m> {
    /// A decoder whose cache holds the model's full context (`seq_len` tokens).
    ///
    /// # Errors
    /// Bad options, a cache the KV policy cannot build, or (a model not on the CPU, which
    /// decodes on the device path) a model or KV policy the device path does not cover.
    pub fn new(model: &'m MorModel, opts: DecodeOptions) -> Result<Self> {
        let on_device = !model.embedding().as_tensor().device().is_cpu();
        Self::build(model, opts, on_device)
    }

    /// A decoder on the device path whatever the model's device (see
    /// [`Engine::new_device`](super::Engine::new_device)).
    ///
    /// # Errors
    /// As [`Decoder::new`], and a model or KV policy the device path does not cover.
    pub fn new_device(model: &'m MorModel, opts: DecodeOptions) -> Result<Self> {
        Self::build(model, opts, true)
    }

    fn build(model: &'m MorModel, opts: DecodeOptions, device: bool) -> Result<Self> {
        if opts.block_tokens == 0 {
            return Err(Error::msg("block_tokens must be >= 1"));
        }
        let runner = Runner::new_on(
            model,
            opts.exit.clone(),
            opts.max_depth,
            opts.precision,
            device,
        )?;
        let blocks = runner.context.div_ceil(opts.block_tokens) * model.plan().num_slots();
        let mut cache = runner.new_cache(opts.block_tokens, blocks, opts.kv_precision)?;
        cache.start(REQ)?;
        Ok(Decoder {
            runner,
            cache,
            pos: 0,
        })
    }

    /// Tokens decoded so far (the position of the next token).
    pub fn position(&self) -> usize {
        self.pos as usize
    }

    /// The decode cache (byte accounting).
    pub fn cache(&self) -> &dyn DecodeCache {
        self.cache.as_ref()
    }

    /// Forgets every token (frees the cache).
    ///
    /// # Errors
    /// Only if the cache refuses to restart the request.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.release_all();
        self.cache.start(REQ)?;
        self.pos = 0;
        Ok(())
    }

    /// Decodes the next token of the sequence.
    ///
    /// # Errors
    /// A token outside the vocabulary, a full context, or a failing op.
    pub fn step(&mut self, token: u32) -> Result<TokenStep> {
        let r = &self.runner;
        if self.pos as usize >= r.context {
            return Err(Error::msg(format!(
                "the context of {} tokens is full",
                r.context
            )));
        }
        let tok = [Tok {
            req: REQ,
            pos: self.pos,
        }];
        let cache = self.cache.as_mut();
        let mut h = r.embed(&[token])?;
        h = r.run_layers(cache, h, &tok, &[&r.prelude])?;
        let h1 = h.clone();
        let mut hv = h1.clone();
        let mut gates = Vec::new();
        let mut depth = 0;
        let token_choice = match r.routing {
            Some(RoutingKind::TokenChoice) => {
                let tc = r.route_token(&h)?.remove(0);
                gates.push(tc.gate);
                Some(tc)
            }
            _ => None,
        };
        for stage in 0..r.max_stages {
            let merge = match (r.routing, token_choice) {
                (None, _) => Merge::Plain,
                (Some(RoutingKind::TokenChoice), Some(tc)) => {
                    let d = tc.depth.min(r.max_stages);
                    if stage + 1 > d {
                        break;
                    }
                    Merge::Token {
                        depth: d,
                        gate: tc.gate,
                        gate_intermediate: tc.gate_intermediate,
                    }
                }
                _ => {
                    let decision = r.route_expert(stage + 1, &hv)?.remove(0);
                    gates.extend(decision.gate);
                    match (decision.run, decision.gate) {
                        (true, g) => Merge::Gated(g.unwrap_or(1.0)),
                        (false, _) => break,
                    }
                }
            };
            let y = r.run_layers(cache, hv.clone(), &tok, &[&r.stages[stage]])?;
            r.merge(merge, stage, &mut hv, &y, Some(&h1))?;
            depth = r.stage_depth[stage];
        }
        if depth == 0 && r.needs_first_stage(cache) {
            return Err(r.first_stage_error());
        }
        let h = r.run_layers(cache, hv, &tok, &[&r.coda])?;
        let logits = r.head(&h)?.remove(0);
        self.pos += 1;
        Ok(TokenStep {
            logits,
            depth,
            gates,
        })
    }

    /// Decodes `prompt` (at least one token) and then generates up to `max_new_tokens`
    /// tokens with `sampling`, stopping early at `stop_token` or a full context. Returns the
    /// generated tokens and, per token, the depth of the position that produced it.
    ///
    /// This is the plain sequential path the batched [`Engine`](super::Engine) must match.
    ///
    /// # Errors
    /// An empty prompt, a prompt longer than the context, bad sampling parameters, or as
    /// [`Decoder::step`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: SamplingParams,
        stop_token: Option<u32>,
        stream: u64,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        if prompt.is_empty() {
            return Err(Error::msg(
                "empty prompt: a request needs at least one token",
            ));
        }
        if prompt.len() > self.runner.context - self.pos as usize {
            return Err(Error::msg(format!(
                "a prompt of {} tokens does not fit the context of {} tokens",
                prompt.len(),
                self.runner.context
            )));
        }
        let mut sampler = Sampler::new(sampling, stream)?;
        let mut last = None;
        for &t in prompt {
            last = Some(self.step(t)?);
        }
        let mut out = Vec::new();
        let mut depths = Vec::new();
        while let Some(step) = last.take() {
            if out.len() >= max_new_tokens {
                break;
            }
            let t = sampler.sample(&step.logits)?;
            out.push(t);
            depths.push(step.depth as u8);
            if Some(t) == stop_token
                || out.len() >= max_new_tokens
                || self.position() >= self.runner.context
            {
                break;
            }
            last = Some(self.step(t)?);
        }
        Ok((out, depths))
    }
}
