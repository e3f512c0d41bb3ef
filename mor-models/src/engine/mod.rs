//! MoR inference: incremental decoding with per-policy KV caches, causal routing, early exit
//! and continuous depth-wise batching (spec §4, §5).
//!
//! - [`Decoder`]: one request, token by token (the plain path; its logits equal a causal
//!   full forward).
//! - [`Engine`]: many requests. Requests wait in a FIFO queue; a scheduler fills
//!   `batch_size` block slots with (token, depth) items, so one call of the shared block
//!   serves tokens at different recursion depths (the block's weights are the same at
//!   every step). A slot is refilled as soon as its token exits; exited tokens are
//!   gathered for the coda layers, the LM head and sampling, and each request's next token
//!   re-enters the queue after its embedding and prelude layers.
//!
//! ```text
//! pending ─admit─▶ entry ─embed+prelude─▶ queue ─fill─▶ [ slot | slot | ... | slot ]  (shared block, step r per item)
//!                    ▲                                        │ exit (router says stop, or r = N_r)
//!                    └──── next token ◀── sample ◀── head ◀── coda ◀── exits
//! ```
//!
//! A model without a router (vanilla, recursive baseline) decodes through the same code:
//! every token runs every step. For a vanilla model (`N_r = 1`) one block call runs all
//! layers, which is continuous sequence-wise batching. [`Batching::SequenceWise`] gives the
//! same to MoR models (slots are refilled only when the whole batch has left), for
//! comparison.
//!
//! # Compute paths
//! A model on the CPU runs the host path (packed weights, host paged KV pool); a model on
//! another device (CUDA) runs the device path (`device.rs`: weights and the paged KV pool
//! as candle tensors on the device, decode attention through the paged kernel), which
//! [`Engine::new_device`] also selects for a CPU model. The scheduler below, the routing
//! decisions and sampling are the same host code for both.
//!
//! # KV memory and back-pressure
//! All requests share one paged cache of `kv_blocks` blocks. A request is admitted only when
//! the free blocks can hold its known tokens at every storing slot; before every phase each
//! item checks that the blocks its appends need are free, and waits otherwise (other
//! requests go on). If nothing can move, the most recently admitted request is preempted:
//! its blocks are freed and it is replayed later from its prompt and the tokens it already
//! generated (no token is lost or sampled twice). A request that cannot fit alone in the
//! whole pool finishes with [`FinishReason::Error`]; bad requests are refused at
//! [`Engine::submit`]. No path panics.

mod decode;
mod device;
mod runner;
mod sampling;

pub use decode::{DecodeOptions, Decoder, TokenStep};
pub use mor_core::config::Precision;
pub use mor_kvcache::decode::KvPrecision;
pub use runner::ExitRule;
pub use sampling::{argmax, Sampler, SamplingParams};

use crate::model::MorModel;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use mor_kvcache::DecodeCache;
use mor_router::RoutingKind;
use runner::{Merge, Runner, Tok, TokenChoice};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Largest KV pool [`Engine::new`] sizes on its own (`kv_blocks = 0`): 1 GiB.
pub const AUTO_POOL_BYTES: usize = 1 << 30;

/// Identifier of a submitted request (ascending in submission order).
pub type RequestId = u64;

/// How the block slots are refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// Continuous depth-wise batching (spec §5): a slot is refilled the moment its token
    /// exits, so one block call mixes tokens at different depths.
    #[default]
    DepthWise,
    /// Continuous sequence-wise batching: the slots are refilled only when every token of
    /// the batch has left the recursion (a vanilla model behaves the same either way).
    SequenceWise,
}

/// Settings of an [`Engine`].
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Items per shared-block call.
    pub batch_size: usize,
    /// Requests decoded concurrently (`0` = `batch_size`).
    pub max_active: usize,
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Blocks of the KV pool (`0` = enough for `max_active` requests of the full context,
    /// at most [`AUTO_POOL_BYTES`]).
    pub kv_blocks: usize,
    /// When expert-choice tokens exit.
    pub exit: ExitRule,
    /// Deepest recursion step (`None` = `N_r`).
    pub max_depth: Option<usize>,
    /// Slot refill rule.
    pub batching: Batching,
    /// Record the gate of every expert-choice routing decision ([`Engine::gate_trace`]).
    pub record_gates: bool,
    /// Depth-wise batching: exited tokens wait until this many have gathered (or a full
    /// batch, or until the block has nothing else to run) before the coda, LM head and
    /// sampling run on them together (spec §5, step 3). `1` refills block slots as soon as
    /// possible; larger values trade block occupancy for larger, cheaper exit batches.
    pub exit_batch: usize,
    /// Precision of the packed weights of the layers and the LM head: `F32`, or `Bf16`
    /// (the weights rounded to bf16 once, the products' inputs rounded to bf16, f32
    /// accumulation, half the bytes streamed per product). Embeddings, norms, attention
    /// and its KV cache, routers and the residual stream stay f32. Batched decoding equals
    /// sequential decoding, token for token, in either precision.
    pub precision: Precision,
    /// How the KV cache stores K and V: `F32`, or `Bf16` (rounded to bf16 on write, half
    /// the bytes attention streams; the arithmetic stays f32, and batched decoding still
    /// equals sequential decoding).
    pub kv_precision: KvPrecision,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_size: 32,
            max_active: 0,
            block_tokens: 16,
            kv_blocks: 0,
            exit: ExitRule::Router,
            max_depth: None,
            batching: Batching::DepthWise,
            record_gates: false,
            exit_batch: 1,
            precision: Precision::F32,
            kv_precision: KvPrecision::F32,
        }
    }
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to generate (at least one).
    pub max_new_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop after generating this token (it is included in the output).
    pub stop_token: Option<u32>,
}

impl Request {
    /// A greedy request without stop token.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Request {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop_token: None,
        }
    }
}

/// Why a request finished.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// The stop token was generated.
    Stop,
    /// The context is full.
    Context,
    /// The request could not be served (e.g. it does not fit the KV pool alone).
    Error(String),
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    /// The request.
    pub id: RequestId,
    /// Prompt length.
    pub prompt_len: usize,
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Per generated token, the recursion depth of the position that produced it (the
    /// compute spent to predict it, spec §7).
    pub depths: Vec<u8>,
    /// Why it finished.
    pub finish: FinishReason,
}

/// What one engine iteration produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A request generated a token.
    Token {
        /// The request.
        id: RequestId,
        /// The token.
        token: u32,
        /// Depth of the position that produced it.
        depth: u8,
    },
    /// A request finished.
    Finished(Completion),
}

/// One expert-choice routing decision, recorded when [`EngineConfig::record_gates`] is set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateRecord {
    /// The request.
    pub id: RequestId,
    /// The token's position.
    pub pos: u32,
    /// The recursion step decided (1-based).
    pub step: usize,
    /// The gate `g = α·G(z)` the router gave the token.
    pub gate: f32,
}

/// Counters of an engine's work.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Scheduler iterations.
    pub iterations: u64,
    /// Shared-block calls (one recursion step for a batch of items).
    pub block_calls: u64,
    /// Items summed over shared-block calls.
    pub block_items: u64,
    /// Shared-block calls whose items were at more than one recursion step.
    pub mixed_depth_calls: u64,
    /// Coda + LM-head calls.
    pub exit_calls: u64,
    /// Items summed over coda calls.
    pub exit_items: u64,
    /// Tokens generated.
    pub tokens_generated: u64,
    /// Items that waited for KV blocks, summed over phases.
    pub stalls: u64,
    /// Requests preempted to free KV blocks.
    pub preemptions: u64,
    /// Positions of finished requests by depth (`depth_histogram[d]`, `d = 0..=N_r`).
    pub depth_histogram: Vec<u64>,
    /// Exact K/V bytes the finished requests held when they ended.
    pub kv_bytes_finished: u64,
    /// Positions the finished requests held.
    pub kv_positions_finished: u64,
    /// Largest K/V bytes stored at once.
    pub peak_kv_bytes: u64,
    /// Wall-clock seconds per phase: shared-block calls (with their KV appends).
    pub block_seconds: f64,
    /// Coda layers, LM head and sampling of exited tokens.
    pub exit_seconds: f64,
    /// Embeddings and prelude layers of entering tokens.
    pub entry_seconds: f64,
    /// Expert-choice routing decisions.
    pub route_seconds: f64,
    /// Floating-point operations (2 per multiply-add) of the layers' projections.
    pub linear_flops: u64,
    /// Floating-point operations of attention over the caches (scores and weighted values).
    pub attention_flops: u64,
    /// Floating-point operations of the LM head.
    pub head_flops: u64,
}

impl EngineStats {
    /// The work done since `before` (an earlier copy of the same engine's counters);
    /// `peak_kv_bytes` keeps the later value.
    pub fn since(&self, before: &EngineStats) -> EngineStats {
        EngineStats {
            iterations: self.iterations.saturating_sub(before.iterations),
            block_calls: self.block_calls.saturating_sub(before.block_calls),
            block_items: self.block_items.saturating_sub(before.block_items),
            mixed_depth_calls: self
                .mixed_depth_calls
                .saturating_sub(before.mixed_depth_calls),
            exit_calls: self.exit_calls.saturating_sub(before.exit_calls),
            exit_items: self.exit_items.saturating_sub(before.exit_items),
            tokens_generated: self
                .tokens_generated
                .saturating_sub(before.tokens_generated),
            stalls: self.stalls.saturating_sub(before.stalls),
            preemptions: self.preemptions.saturating_sub(before.preemptions),
            depth_histogram: self
                .depth_histogram
                .iter()
                .enumerate()
                .map(|(d, a)| a.saturating_sub(before.depth_histogram.get(d).copied().unwrap_or(0)))
                .collect(),
            kv_bytes_finished: self
                .kv_bytes_finished
                .saturating_sub(before.kv_bytes_finished),
            kv_positions_finished: self
                .kv_positions_finished
                .saturating_sub(before.kv_positions_finished),
            peak_kv_bytes: self.peak_kv_bytes,
            block_seconds: self.block_seconds - before.block_seconds,
            exit_seconds: self.exit_seconds - before.exit_seconds,
            entry_seconds: self.entry_seconds - before.entry_seconds,
            route_seconds: self.route_seconds - before.route_seconds,
            linear_flops: self.linear_flops.saturating_sub(before.linear_flops),
            attention_flops: self.attention_flops.saturating_sub(before.attention_flops),
            head_flops: self.head_flops.saturating_sub(before.head_flops),
        }
    }

    /// Floating-point operations of every kind.
    pub fn total_flops(&self) -> u64 {
        self.linear_flops + self.attention_flops + self.head_flops
    }

    /// Mean items per shared-block call.
    pub fn mean_block_occupancy(&self) -> f64 {
        self.block_items as f64 / self.block_calls.max(1) as f64
    }

    /// Exact K/V bytes per position of the finished requests.
    pub fn kv_bytes_per_token(&self) -> f64 {
        self.kv_bytes_finished as f64 / self.kv_positions_finished.max(1) as f64
    }

    /// Mean recursion depth of the finished positions.
    pub fn mean_depth(&self) -> f64 {
        let n: u64 = self.depth_histogram.iter().sum();
        let s: u64 = self
            .depth_histogram
            .iter()
            .enumerate()
            .map(|(d, c)| d as u64 * c)
            .sum();
        s as f64 / n.max(1) as f64
    }
}

/// Token ids of a UTF-8 prompt given as bytes (the text API).
///
/// # Errors
/// [`Error::Msg`] when the bytes are not valid UTF-8 (with the byte offset), when the
/// prompt is empty or encodes to no token.
pub fn encode_prompt(tokenizer: &Tokenizer, bytes: &[u8]) -> Result<Vec<u32>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::msg(format!(
            "the prompt is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.is_empty() {
        return Err(Error::msg(
            "empty prompt: a request needs at least one token",
        ));
    }
    let ids = tokenizer
        .encode(text)
        .map_err(|e| Error::msg(e.to_string()))?;
    if ids.is_empty() {
        return Err(Error::msg("the prompt encodes to no token"));
    }
    Ok(ids)
}

#[derive(Debug)]
struct ReqState {
    seq: Vec<u32>,
    prompt_len: usize,
    max_new: usize,
    stop: Option<u32>,
    sampler: Sampler,
    /// Depth of every processed position.
    depths: Vec<u8>,
    /// Admission order while active.
    admitted: Option<u64>,
}

impl ReqState {
    fn generated(&self) -> usize {
        self.seq.len() - self.prompt_len
    }
}

/// A token in flight.
#[derive(Debug)]
struct Item {
    id: RequestId,
    pos: u32,
    h: Vec<f32>,
    h1: Vec<f32>,
    tc: Option<TokenChoice>,
    /// Next stage to run (0-based).
    stage: usize,
    /// Depth reached so far.
    depth: usize,
    /// The decision for `stage` (`None` = not routed yet).
    merge: Option<Merge>,
}

/// The batched inference engine (see the module docs).
///
/// # Examples
/// ```
/// use mor_core::config::Config;
/// use mor_models::engine::{Engine, EngineConfig, Request};
/// use mor_models::MorModel;
///
/// let _ = mor_models::builtin::link();
/// let cfg = Config::from_toml_str("[model]\npreset = \"micro\"\n[train]\nbudget = { steps = 1 }").unwrap();
/// let model = MorModel::new(&cfg).unwrap();
/// let mut engine = Engine::new(&model, EngineConfig { batch_size: 4, ..Default::default() }).unwrap();
/// let a = engine.submit(Request::greedy(vec![1, 2, 3], 5)).unwrap();
/// assert!(engine.submit(Request::greedy(vec![], 5)).is_err()); // refused, others unaffected
/// let done = engine.run_to_completion().unwrap();
/// assert_eq!(done[0].id, a);
/// assert_eq!(done[0].tokens.len(), 5);
/// ```
#[derive(Debug)]
pub struct Engine<'m> {
    runner: Runner<'m>,
    cache: Box<dyn DecodeCache>,
    cfg: EngineConfig,
    next_id: RequestId,
    admissions: u64,
    reqs: HashMap<RequestId, ReqState>,
    pending: VecDeque<RequestId>,
    entry: VecDeque<(RequestId, u32)>,
    queue: VecDeque<Item>,
    slots: Vec<Item>,
    exits: VecDeque<Item>,
    /// Storing slots of the prelude, of each stage and of the coda.
    w_prelude: Vec<usize>,
    w_stages: Vec<Vec<usize>>,
    w_coda: Vec<usize>,
    stalled: bool,
    stats: EngineStats,
    gate_trace: Vec<GateRecord>,
    /// `(request, position, logits)` of every sampled token, when recording.
    logit_trace: Option<Vec<(RequestId, u32, Vec<f32>)>>,
}

impl<'m> Engine<'m> {
    /// An engine for `model`: a model on the CPU decodes on the host path (packed weights,
    /// host KV pool), a model on another device (CUDA) on the device path
    /// ([`Engine::new_device`]).
    ///
    /// # Errors
    /// A zero batch size or block size, bad exit settings, a cache the KV policy cannot
    /// build, or (device path) a model or KV policy it does not cover.
    pub fn new(model: &'m MorModel, cfg: EngineConfig) -> Result<Self> {
        let on_device = !model.embedding().as_tensor().device().is_cpu();
        Self::build(model, cfg, on_device)
    }

    /// An engine on the device path whatever the model's device (the CPU included): the
    /// layer and LM-head weights as candle tensors in `cfg.precision` and the paged KV pool
    /// in `cfg.kv_precision` on the model's device, decode attention through the paged
    /// kernel (see `engine/device.rs`). The scheduler, routing and sampling stay on the
    /// host. Its [`Engine::cache`] keeps the same books as the host cache, but its
    /// `view` is an error (the K/V are not on the host).
    ///
    /// # Errors
    /// As [`Engine::new`]; a model with a relaxation (LoRA / DoRA, adaption prompt,
    /// recursion encoding) or a KV policy other than `recursion_wise` /
    /// `recursive_sharing` is refused with an error naming it.
    pub fn new_device(model: &'m MorModel, cfg: EngineConfig) -> Result<Self> {
        Self::build(model, cfg, true)
    }

    /// Whether this engine computes on the device path.
    pub fn on_device(&self) -> bool {
        self.runner.on_device()
    }

    fn build(model: &'m MorModel, cfg: EngineConfig, device: bool) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.block_tokens == 0 {
            return Err(Error::msg(format!(
                "batch_size ({}) and block_tokens ({}) must be >= 1",
                cfg.batch_size, cfg.block_tokens
            )));
        }
        let mut cfg = cfg;
        if cfg.max_active == 0 {
            cfg.max_active = cfg.batch_size;
        }
        let runner = Runner::new_on(
            model,
            cfg.exit.clone(),
            cfg.max_depth,
            cfg.precision,
            device,
        )?;
        let blocks = if cfg.kv_blocks == 0 {
            // Every active request at full context in every slot, capped at AUTO_POOL_BYTES
            // (beyond it, back-pressure takes over).
            let m = &model.config().model;
            let block_bytes = cfg.block_tokens * 2 * m.num_kv_heads * m.head_dim * 4;
            let worst = cfg.max_active
                * model.plan().num_slots()
                * runner.context.div_ceil(cfg.block_tokens);
            worst.min((AUTO_POOL_BYTES / block_bytes.max(1)).max(1))
        } else {
            cfg.kv_blocks
        };
        let cache = runner.new_cache(cfg.block_tokens, blocks, cfg.kv_precision)?;
        let w_prelude = runner.writing(cache.as_ref(), &runner.prelude);
        let w_stages = runner
            .stages
            .iter()
            .map(|s| runner.writing(cache.as_ref(), s))
            .collect();
        let w_coda = runner.writing(cache.as_ref(), &runner.coda);
        let stats = EngineStats {
            depth_histogram: vec![0; model.plan().num_recursions + 1],
            ..Default::default()
        };
        Ok(Engine {
            runner,
            cache,
            cfg,
            next_id: 0,
            admissions: 0,
            reqs: HashMap::new(),
            pending: VecDeque::new(),
            entry: VecDeque::new(),
            queue: VecDeque::new(),
            slots: Vec::new(),
            exits: VecDeque::new(),
            w_prelude,
            w_stages,
            w_coda,
            stalled: false,
            stats,
            gate_trace: Vec::new(),
            logit_trace: None,
        })
    }

    /// The settings (with `max_active` resolved).
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The work counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The recorded routing decisions (empty unless [`EngineConfig::record_gates`]). A
    /// preempted request is replayed, so its decisions may appear twice.
    pub fn gate_trace(&self) -> &[GateRecord] {
        &self.gate_trace
    }

    /// Starts (or stops, forgetting them) recording the logits of every sampled token
    /// ([`Engine::logit_trace`]); for checks that compare batched and sequential logits.
    pub fn record_logits(&mut self, on: bool) {
        self.logit_trace = on.then(Vec::new);
    }

    /// The recorded `(request, position, logits)` of the sampled tokens, in sampling order
    /// (empty unless [`Engine::record_logits`]; a preempted request's may appear twice).
    pub fn logit_trace(&self) -> &[(RequestId, u32, Vec<f32>)] {
        self.logit_trace.as_deref().unwrap_or(&[])
    }

    /// Forgets the recorded routing decisions.
    pub fn clear_gate_trace(&mut self) {
        self.gate_trace.clear();
    }

    /// The shared KV cache.
    pub fn cache(&self) -> &dyn DecodeCache {
        self.cache.as_ref()
    }

    /// The context length (tokens a request may hold).
    pub fn context(&self) -> usize {
        self.runner.context
    }

    /// Requests submitted and not yet admitted (waiting for room or KV blocks).
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Requests being decoded.
    pub fn active_requests(&self) -> usize {
        self.active()
    }

    /// Whether every submitted request has finished.
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Storing slots a request's token reaches at most.
    fn writing_slots(&self) -> usize {
        self.w_prelude.len() + self.w_coda.len() + self.w_stages.iter().map(Vec::len).sum::<usize>()
    }

    /// Blocks `len` tokens take at every storing slot (the worst case of any depth mix).
    fn blocks_for(&self, len: usize) -> usize {
        self.writing_slots() * len.div_ceil(self.cfg.block_tokens)
    }

    /// Queues a request.
    ///
    /// # Errors
    /// An empty prompt, a prompt longer than the context, a token outside the vocabulary,
    /// `max_new_tokens = 0`, bad sampling parameters, or a prompt whose K/V cannot fit the
    /// whole pool. Other requests are unaffected.
    pub fn submit(&mut self, req: Request) -> Result<RequestId> {
        let ctx = self.runner.context;
        if req.prompt.is_empty() {
            return Err(Error::msg(
                "empty prompt: a request needs at least one token",
            ));
        }
        if req.prompt.len() > ctx {
            return Err(Error::msg(format!(
                "a prompt of {} tokens is longer than the context of {ctx} tokens",
                req.prompt.len()
            )));
        }
        if let Some(&bad) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.runner.vocab)
        {
            return Err(Error::msg(format!(
                "prompt token {bad} is outside the vocabulary of {} ids",
                self.runner.vocab
            )));
        }
        if req.max_new_tokens == 0 {
            return Err(Error::msg("max_new_tokens must be >= 1"));
        }
        let need = self.blocks_for(req.prompt.len());
        if need > self.cache.total_blocks() {
            return Err(Error::msg(format!(
                "the prompt's keys/values need {need} blocks but the KV pool has only {} (raise kv_blocks)",
                self.cache.total_blocks()
            )));
        }
        let id = self.next_id;
        let sampler = Sampler::new(req.sampling, id)?;
        self.next_id += 1;
        self.reqs.insert(
            id,
            ReqState {
                seq: req.prompt.clone(),
                prompt_len: req.prompt.len(),
                max_new: req.max_new_tokens,
                stop: req.stop_token,
                sampler,
                depths: Vec::new(),
                admitted: None,
            },
        );
        self.pending.push_back(id);
        Ok(id)
    }

    /// Runs until every request has finished and returns the completions in request order.
    ///
    /// # Errors
    /// A failing op (a bug or a broken model), never a bad request.
    pub fn run_to_completion(&mut self) -> Result<Vec<Completion>> {
        let mut done = Vec::new();
        while !self.is_idle() {
            for e in self.step()? {
                if let Event::Finished(c) = e {
                    done.push(c);
                }
            }
        }
        done.sort_by_key(|c| c.id);
        Ok(done)
    }

    /// One scheduler iteration: admit requests, route the block slots (early exits), fill
    /// free slots from the queue, run the coda/head/sampling of exited tokens when the slots
    /// cannot be filled otherwise (or a full batch has exited), embed and run the prelude of
    /// next tokens, and run one shared-block call.
    ///
    /// # Errors
    /// A failing op. Requests that cannot be served finish with [`FinishReason::Error`].
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        if self.is_idle() {
            return Ok(events);
        }
        self.stats.iterations += 1;
        let was_stalled = std::mem::replace(&mut self.stalled, false);
        let mut progress = self.admit(was_stalled);
        self.fill_and_route()?;
        let depthwise = self.cfg.batching == Batching::DepthWise;
        let flush = !self.exits.is_empty()
            && if depthwise {
                self.exits.len() >= self.cfg.batch_size
                    || self.slots.is_empty()
                    || (self.slots.len() < self.cfg.batch_size
                        && self.exits.len() >= self.cfg.exit_batch.max(1))
            } else {
                self.slots.is_empty()
            };
        if flush {
            let t = Instant::now();
            progress |= self.flush(&mut events)?;
            self.stats.exit_seconds += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        progress |= self.process_entries()?;
        self.stats.entry_seconds += t.elapsed().as_secs_f64();
        self.fill_and_route()?;
        let t = Instant::now();
        progress |= self.run_block()?;
        self.stats.block_seconds += t.elapsed().as_secs_f64();
        self.stats.peak_kv_bytes = self
            .stats
            .peak_kv_bytes
            .max(self.cache.bytes_stored() as u64);
        let f = self.runner.flops.get();
        self.stats.linear_flops = f.linear;
        self.stats.attention_flops = f.attention;
        self.stats.head_flops = f.head;
        if !progress {
            self.relieve(&mut events)?;
        }
        Ok(events)
    }

    /// Admits pending requests while there is room; none while items waited for blocks in
    /// the last iteration.
    fn admit(&mut self, was_stalled: bool) -> bool {
        let mut any = false;
        while !was_stalled && self.active() < self.cfg.max_active {
            let Some(&id) = self.pending.front() else {
                break;
            };
            let len = self.reqs.get(&id).map(|r| r.seq.len()).unwrap_or(0);
            // Room for the known tokens and the next one at every storing slot (capped at
            // the pool: a lone request may still fit thanks to early exits).
            if self.blocks_for(len + 1).min(self.cache.total_blocks()) > self.cache.free_blocks() {
                break;
            }
            self.pending.pop_front();
            if self.cache.start(id).is_err() {
                continue;
            }
            if let Some(r) = self.reqs.get_mut(&id) {
                r.admitted = Some(self.admissions);
                self.admissions += 1;
                r.depths.clear();
            }
            self.entry.push_back((id, 0));
            any = true;
        }
        any
    }

    fn active(&self) -> usize {
        self.reqs.values().filter(|r| r.admitted.is_some()).count()
    }

    /// Routes the unrouted items of the slots; in depth-wise mode refills freed slots from
    /// the queue until the batch is full or the queue is empty.
    fn fill_and_route(&mut self) -> Result<()> {
        let depthwise = self.cfg.batching == Batching::DepthWise;
        loop {
            if depthwise || self.slots.is_empty() {
                while self.slots.len() < self.cfg.batch_size {
                    match self.queue.pop_front() {
                        Some(it) => self.slots.push(it),
                        None => break,
                    }
                }
            }
            let exited = self.route_slots()?;
            if exited == 0 || self.queue.is_empty() || !depthwise {
                return Ok(());
            }
        }
    }

    /// Decides the next step of every unrouted slot item; items that leave the recursion
    /// move to the exit buffer. Returns how many left.
    fn route_slots(&mut self) -> Result<usize> {
        let t0 = Instant::now();
        let r = &self.runner;
        let mut leave = vec![false; self.slots.len()];
        // Expert-choice items grouped by step: one router call per group.
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, it) in self.slots.iter_mut().enumerate() {
            if it.merge.is_some() {
                continue;
            }
            if it.stage >= r.max_stages {
                leave[i] = true;
                continue;
            }
            match (r.routing, it.tc) {
                (None, _) => it.merge = Some(Merge::Plain),
                (Some(RoutingKind::TokenChoice), Some(tc)) => {
                    let d = tc.depth.min(r.max_stages);
                    if it.stage < d {
                        it.merge = Some(Merge::Token {
                            depth: d,
                            gate: tc.gate,
                            gate_intermediate: tc.gate_intermediate,
                        });
                    } else {
                        leave[i] = true;
                    }
                }
                _ => groups.entry(it.stage).or_default().push(i),
            }
        }
        let mut keys: Vec<usize> = groups.keys().copied().collect();
        keys.sort_unstable();
        for stage in keys {
            let members = &groups[&stage];
            let rows: Vec<&[f32]> = members
                .iter()
                .map(|&i| self.slots[i].h.as_slice())
                .collect();
            let h = r.stack(&rows);
            let dec = r.route_expert(stage + 1, &h)?;
            for (&i, d) in members.iter().zip(dec) {
                if self.cfg.record_gates {
                    if let Some(gate) = d.gate {
                        let it = &self.slots[i];
                        self.gate_trace.push(GateRecord {
                            id: it.id,
                            pos: it.pos,
                            step: stage + 1,
                            gate,
                        });
                    }
                }
                if d.run {
                    self.slots[i].merge = Some(Merge::Gated(d.gate.unwrap_or(1.0)));
                } else {
                    leave[i] = true;
                }
            }
        }
        let n_leave = leave.iter().filter(|&&x| x).count();
        if n_leave > 0 {
            let needs_first = r.needs_first_stage(self.cache.as_ref());
            let mut keep = Vec::with_capacity(self.slots.len());
            for (it, l) in std::mem::take(&mut self.slots).into_iter().zip(leave) {
                if l {
                    if it.depth == 0 && needs_first {
                        return Err(r.first_stage_error());
                    }
                    self.exits.push_back(it);
                } else {
                    keep.push(it);
                }
            }
            self.slots = keep;
        }
        self.stats.route_seconds += t0.elapsed().as_secs_f64();
        Ok(n_leave)
    }

    /// Takes from the front of `items` the ones whose appends to `slots` fit the free
    /// blocks (in order; the first that does not fit stops the scan).
    fn reserve(&self, ids: impl Iterator<Item = RequestId>, slots: &[usize]) -> Result<usize> {
        let mut free = self.cache.free_blocks();
        let mut n = 0;
        for id in ids {
            let need = self.cache.blocks_needed(id, slots)?;
            if need > free {
                break;
            }
            free -= need;
            n += 1;
        }
        Ok(n)
    }

    /// Coda, LM head and sampling of the exited tokens that fit; next tokens go to the
    /// entry buffer. Returns whether any token was processed.
    fn flush(&mut self, events: &mut Vec<Event>) -> Result<bool> {
        let n = self.reserve(self.exits.iter().map(|it| it.id), &self.w_coda)?;
        if n < self.exits.len() {
            self.stalled = true;
            self.stats.stalls += (self.exits.len() - n) as u64;
        }
        if n == 0 {
            return Ok(false);
        }
        let items: Vec<Item> = self.exits.drain(..n).collect();
        let r = &self.runner;
        let toks: Vec<Tok> = items
            .iter()
            .map(|it| Tok {
                req: it.id,
                pos: it.pos,
            })
            .collect();
        let rows: Vec<&[f32]> = items.iter().map(|it| it.h.as_slice()).collect();
        let coda: Vec<&[usize]> = vec![&r.coda; n];
        let h = r.run_layers(self.cache.as_mut(), r.stack(&rows), &toks, &coda)?;
        self.stats.exit_calls += 1;
        self.stats.exit_items += n as u64;
        // Only the tokens whose next token is unknown need the LM head.
        let sample: Vec<usize> = (0..n)
            .filter(|&i| {
                self.reqs
                    .get(&items[i].id)
                    .is_some_and(|s| items[i].pos as usize + 1 == s.seq.len())
            })
            .collect();
        let mut logits: HashMap<usize, Vec<f32>> = HashMap::new();
        if !sample.is_empty() {
            let d = self.runner.d;
            let hs: Vec<&[f32]> = sample.iter().map(|&i| &h[i * d..(i + 1) * d]).collect();
            let l = self.runner.head(&self.runner.stack(&hs))?;
            logits = sample.iter().copied().zip(l).collect();
        }
        let context = self.runner.context;
        for (i, it) in items.into_iter().enumerate() {
            let Some(st) = self.reqs.get_mut(&it.id) else {
                continue;
            };
            let pos = it.pos as usize;
            if st.depths.len() <= pos {
                st.depths.resize(pos + 1, 0);
            }
            st.depths[pos] = it.depth as u8;
            let finish = match logits.remove(&i) {
                None => None,
                Some(l) => {
                    let t = st.sampler.sample(&l)?;
                    if let Some(trace) = &mut self.logit_trace {
                        trace.push((it.id, it.pos, l));
                    }
                    st.seq.push(t);
                    self.stats.tokens_generated += 1;
                    events.push(Event::Token {
                        id: it.id,
                        token: t,
                        depth: it.depth as u8,
                    });
                    if Some(t) == st.stop {
                        Some(FinishReason::Stop)
                    } else if st.generated() >= st.max_new {
                        Some(FinishReason::Length)
                    } else if pos + 1 >= context {
                        Some(FinishReason::Context)
                    } else {
                        None
                    }
                }
            };
            match finish {
                Some(f) => self.finish(it.id, f, events)?,
                None => self.entry.push_back((it.id, it.pos + 1)),
            }
        }
        Ok(true)
    }

    /// Ends request `id` and reports it.
    fn finish(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let Some(st) = self.reqs.remove(&id) else {
            return Ok(());
        };
        if self.cache.is_active(id) {
            let before = self.cache.bytes_stored();
            self.cache.end(id)?;
            let freed = before.saturating_sub(self.cache.bytes_stored());
            if !matches!(reason, FinishReason::Error(_)) {
                self.stats.kv_bytes_finished += freed as u64;
                self.stats.kv_positions_finished += st.depths.len() as u64;
                for &d in &st.depths {
                    if let Some(c) = self.stats.depth_histogram.get_mut(d as usize) {
                        *c += 1;
                    }
                }
            }
        }
        self.remove_items(id);
        self.pending.retain(|&p| p != id);
        let start = st.prompt_len.saturating_sub(1);
        let gen = st.generated();
        let depths = (start..start + gen)
            .map(|p| st.depths.get(p).copied().unwrap_or(0))
            .collect();
        events.push(Event::Finished(Completion {
            id,
            prompt_len: st.prompt_len,
            tokens: st.seq[st.prompt_len..].to_vec(),
            depths,
            finish: reason,
        }));
        Ok(())
    }

    fn remove_items(&mut self, id: RequestId) {
        self.entry.retain(|e| e.0 != id);
        self.queue.retain(|it| it.id != id);
        self.slots.retain(|it| it.id != id);
        self.exits.retain(|it| it.id != id);
    }

    /// Embedding and prelude of the entry tokens that fit; they join the queue.
    fn process_entries(&mut self) -> Result<bool> {
        let n = self.reserve(self.entry.iter().map(|e| e.0), &self.w_prelude)?;
        if n < self.entry.len() {
            self.stalled = true;
            self.stats.stalls += (self.entry.len() - n) as u64;
        }
        if n == 0 {
            return Ok(false);
        }
        let batch: Vec<(RequestId, u32)> = self.entry.drain(..n).collect();
        let mut ids = Vec::with_capacity(n);
        for &(id, pos) in &batch {
            let st = self
                .reqs
                .get(&id)
                .ok_or_else(|| Error::msg(format!("request {id} vanished")))?;
            ids.push(st.seq[pos as usize]);
        }
        let r = &self.runner;
        let toks: Vec<Tok> = batch
            .iter()
            .map(|&(id, pos)| Tok { req: id, pos })
            .collect();
        let prelude: Vec<&[usize]> = vec![&r.prelude; n];
        let h = r.run_layers(self.cache.as_mut(), r.embed(&ids)?, &toks, &prelude)?;
        let tcs = match r.routing {
            Some(RoutingKind::TokenChoice) => r.route_token(&h)?.into_iter().map(Some).collect(),
            _ => vec![None; n],
        };
        for ((row, (id, pos)), tc) in r.unstack(&h).into_iter().zip(batch).zip(tcs) {
            self.queue.push_back(Item {
                id,
                pos,
                h1: row.clone(),
                h: row,
                tc,
                stage: 0,
                depth: 0,
                merge: None,
            });
        }
        Ok(true)
    }

    /// One shared-block call over the routed slot items whose appends fit.
    fn run_block(&mut self) -> Result<bool> {
        let ready: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].merge.is_some())
            .collect();
        let mut free = self.cache.free_blocks();
        let mut run = Vec::with_capacity(ready.len());
        for &i in &ready {
            let it = &self.slots[i];
            let need = self.cache.blocks_needed(it.id, &self.w_stages[it.stage])?;
            if need <= free {
                free -= need;
                run.push(i);
            }
        }
        if run.len() < ready.len() {
            self.stalled = true;
            self.stats.stalls += (ready.len() - run.len()) as u64;
        }
        if run.is_empty() {
            return Ok(false);
        }
        let r = &self.runner;
        let toks: Vec<Tok> = run
            .iter()
            .map(|&i| Tok {
                req: self.slots[i].id,
                pos: self.slots[i].pos,
            })
            .collect();
        let rows: Vec<&[f32]> = run.iter().map(|&i| self.slots[i].h.as_slice()).collect();
        let slots: Vec<&[usize]> = run
            .iter()
            .map(|&i| r.stages[self.slots[i].stage].as_slice())
            .collect();
        let y = r.run_layers(self.cache.as_mut(), r.stack(&rows), &toks, &slots)?;
        self.stats.block_calls += 1;
        self.stats.block_items += run.len() as u64;
        let first_stage = self.slots[run[0]].stage;
        if run.iter().any(|&i| self.slots[i].stage != first_stage) {
            self.stats.mixed_depth_calls += 1;
        }
        let mut done = vec![false; self.slots.len()];
        for (&i, y) in run.iter().zip(y.chunks_exact(r.d)) {
            let it = &mut self.slots[i];
            let merge = it
                .merge
                .take()
                .ok_or_else(|| Error::msg("unrouted item ran"))?;
            let stage = it.stage;
            r.merge(merge, stage, &mut it.h, y, Some(&it.h1))?;
            it.depth = r.stage_depth[it.stage];
            it.stage += 1;
            if it.stage >= r.max_stages {
                done[i] = true;
            }
        }
        if done.iter().any(|&d| d) {
            let mut keep = Vec::with_capacity(self.slots.len());
            for (it, d) in std::mem::take(&mut self.slots).into_iter().zip(done) {
                if d {
                    self.exits.push_back(it);
                } else {
                    keep.push(it);
                }
            }
            self.slots = keep;
        }
        Ok(true)
    }

    /// Nothing could move: frees KV blocks by preempting the most recently admitted request
    /// (replayed later), or fails a request that cannot fit the pool alone.
    fn relieve(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let active: Vec<(u64, RequestId)> = self
            .reqs
            .iter()
            .filter_map(|(&id, r)| r.admitted.map(|a| (a, id)))
            .collect();
        let total = self.cache.total_blocks();
        match active.iter().max() {
            None => {
                // Nothing admitted: fail the next pending request if it cannot fit the empty
                // pool (otherwise the next iteration admits it).
                if let Some(&id) = self.pending.front() {
                    let len = self.reqs.get(&id).map(|r| r.seq.len()).unwrap_or(0);
                    if self.blocks_for(len) <= self.cache.free_blocks() {
                        return Ok(());
                    }
                    let msg = format!(
                        "the request's {len} tokens need up to {} KV blocks, more than the pool's {total}",
                        self.blocks_for(len + 1)
                    );
                    self.finish(id, FinishReason::Error(msg), events)?;
                }
            }
            Some(&(_, id)) if active.len() == 1 => {
                let len = self.reqs.get(&id).map(|r| r.seq.len()).unwrap_or(0);
                let msg = format!(
                    "the KV pool of {total} blocks cannot hold this request's {len} tokens"
                );
                self.finish(id, FinishReason::Error(msg), events)?;
            }
            Some(&(_, id)) => {
                self.remove_items(id);
                self.cache.end(id)?;
                if let Some(r) = self.reqs.get_mut(&id) {
                    r.admitted = None;
                    r.depths.clear();
                }
                self.pending.push_front(id);
                self.stats.preemptions += 1;
                self.stalled = true;
            }
        }
        Ok(())
    }
}
