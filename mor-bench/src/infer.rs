//! The inference throughput benchmark of spec §5, scaled down (on the CPU, or on a GPU
//! through the engine's device path).
//!
//! Protocol (spec §5, "Protocol", scaled down):
//! - models: expert-choice MoR with `N_r = 2, 3, 4` (Middle-Cycle, recursion-wise caching)
//!   and, for each, a vanilla model of the same unrolled depth; by default the paper's
//!   depths (a 32-layer base: MoR-2 is 1 + 15×2 + 1 = 32 layers, MoR-3 1 + 10×3 + 1 = 32,
//!   MoR-4 1 + 8×4 + 1 = 34, each against a vanilla of as many layers) at the `small`
//!   preset's width; random initialisation;
//! - `requests` requests, no prompt prefix (a single start token, id 0), generation lengths
//!   drawn from `Normal(gen_len_mean, gen_len_std)` with a seeded RNG, rounded, clamped to
//!   `1..context`; tokens sampled at temperature 1 (seeded per request);
//! - batch settings: (1) a fixed batch `B` for every model; (2) "relative max":
//!   `B · maxB_model / maxB_vanilla`, where `maxB` is what a fixed KV memory budget holds
//!   given the model's measured K/V bytes per token (vanilla keeps `B`);
//! - MoR runs with continuous depth-wise batching, vanilla with continuous sequence-wise
//!   batching (the same engine: one block call runs all its layers). The batch size is both
//!   the block's item slots and the number of concurrent requests (what the KV memory
//!   bounds); exited MoR tokens gather until `exit_fraction` of the batch has left the
//!   recursion before the coda, LM head and sampling run on them together (spec §5 step 3).
//!   Tokens waiting there hold batch slots, so a small exit batch keeps the shared block
//!   fuller; with the packed decode products a coda/head call on a few tokens costs little
//!   more per token than on many (default 1/8 of the batch);
//! - the engine counts the floating-point operations it does (projections, attention over
//!   the caches, LM head), so each ratio is reported beside the ratio of arithmetic: on a
//!   CPU, decoding at these batch sizes is compute-bound and that ratio is the ceiling;
//! - a warm-up run is excluded; the timed run includes the KV cache updates (the paper
//!   excludes them; here they are part of every layer call);
//! - every model runs in each precision of `precisions` (the engine's packed weights in f32,
//!   or in bf16 with f32 accumulation) and at each fixed batch (`batch_size` and
//!   `extra_batches`), all interleaved in one phase; bf16 rows also report their ratio
//!   over the f32 row of the same model, setting and batch;
//! - the thread count is pinned (default 1: decoding is fastest single-threaded on these
//!   machines, TOOLCHAIN.md §2).
//!
//! # Early exit without training
//! A randomly initialised router scores every token near `σ(z) = 0.5`, so the causal rule
//! of a trained router (`σ(z_r) ≥ 0.5`) would send about half the tokens on at every step.
//! To obtain the paper's depth distribution at decode time, each router's per-step threshold
//! is calibrated on sampled sequences so that the share of tokens continuing from step r−1
//! to step r is `cap_r / cap_{r−1}` (the default capacities `cap_r = (N_r − r + 1)/N_r`,
//! spec §3.1): thresholds on the gate `g_r`, whose order is that of the logit
//! ([`ExitRule::GateThresholds`]). The realised depth distribution of the timed run is
//! reported next to the target (`1/N_r` per depth).

use mor_core::config::{Config, Precision, ResolvedConfig};
use mor_core::rng::Rng;
use mor_models::engine::{
    Batching, Engine, EngineConfig, EngineStats, Event, ExitRule, FinishReason, Request,
    SamplingParams,
};
use mor_models::{Error, MorModel, Result};
use std::rc::Rc;
use std::time::Instant;

/// Settings of the benchmark.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InferBenchConfig {
    /// Timed requests per run.
    pub requests: usize,
    /// Mean generation length.
    pub gen_len_mean: f64,
    /// Standard deviation of the generation length.
    pub gen_len_std: f64,
    /// The fixed batch size (setting 1) and the vanilla batch of setting 2.
    pub batch_size: usize,
    /// More fixed batch sizes, each timed as its own setting beside `batch_size` (empty:
    /// `batch_size` only). The relative-max setting scales `batch_size`.
    #[serde(default)]
    pub extra_batches: Vec<usize>,
    /// Precisions of the engine's packed weights, each model timed in every one (`bf16`:
    /// products with bf16 inputs and f32 accumulation).
    #[serde(default = "default_precisions")]
    pub precisions: Vec<Precision>,
    /// How every engine's KV cache stores K and V (`bf16`: rounded on write, half the bytes
    /// attention streams).
    #[serde(default)]
    pub kv_precision: mor_models::engine::KvPrecision,
    /// Rayon / matmul threads.
    pub threads: usize,
    /// Where the models live (`runtime.backend.kind`): `cpu` (the engine's host path) or
    /// `cuda` (CUDA device 0, the engine's device path; needs the `cuda` feature).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Requests of the untimed warm-up run.
    pub warmup_requests: usize,
    /// Seed of lengths, sampling and initialisation.
    pub seed: u64,
    /// Model preset (dimensions; `small` is d = 256, 4 heads (2 KV) of 64, vocab 4096).
    pub preset: String,
    /// Layers of the base model before the Middle-Cycle depth fix (32, the paper's 360M
    /// depth: MoR-2 and MoR-3 have 32 layers, MoR-4 34, spec §5).
    pub base_layers: usize,
    /// Context length of the models.
    pub context: usize,
    /// Recursion counts of the MoR models.
    pub recursions: Vec<usize>,
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Requests of the threshold calibration (lengths drawn like the timed ones; 64 by
    /// default: with fewer, the sampling error of the fitted quantiles shifts the realised
    /// depth distribution by a few points).
    pub calib_requests: usize,
    /// Calibration passes (the first fits on full-depth gates, later ones re-fit).
    pub calib_passes: usize,
    /// Also run the relative-max batch setting.
    pub relative_max: bool,
    /// Interleaved timed rounds per model (the best is kept).
    pub rounds: usize,
    /// MoR exit batch as a fraction of the batch size (`EngineConfig::exit_batch`): exited
    /// tokens gather until this share of the batch has left the recursion, then the coda,
    /// LM head and sampling run on them together (spec §5, step 3).
    pub exit_fraction: f64,
}

fn default_backend() -> String {
    "cpu".to_string()
}

fn default_precisions() -> Vec<Precision> {
    vec![Precision::F32]
}

impl Default for InferBenchConfig {
    fn default() -> Self {
        InferBenchConfig {
            requests: 96,
            gen_len_mean: 96.0,
            gen_len_std: 24.0,
            batch_size: 32,
            extra_batches: Vec::new(),
            precisions: default_precisions(),
            kv_precision: mor_models::engine::KvPrecision::F32,
            threads: 1,
            backend: default_backend(),
            warmup_requests: 8,
            seed: 0,
            preset: "small".to_string(),
            base_layers: 32,
            context: 256,
            recursions: vec![2, 3, 4],
            block_tokens: 16,
            calib_requests: 64,
            calib_passes: 3,
            relative_max: true,
            exit_fraction: 0.125,
            rounds: 2,
        }
    }
}

impl InferBenchConfig {
    /// A run of a few seconds (smoke test): fewer and shorter requests, an 8-layer base
    /// (10 layers for MoR-4).
    pub fn quick() -> Self {
        InferBenchConfig {
            requests: 16,
            gen_len_mean: 32.0,
            gen_len_std: 8.0,
            batch_size: 8,
            warmup_requests: 2,
            calib_requests: 16,
            calib_passes: 3,
            rounds: 1,
            base_layers: 8,
            ..Self::default()
        }
    }

    /// The fixed batch sizes timed: `batch_size`, then the `extra_batches` not yet listed.
    pub fn fixed_batches(&self) -> Vec<usize> {
        let mut batches = vec![self.batch_size];
        for &b in &self.extra_batches {
            if !batches.contains(&b) {
                batches.push(b);
            }
        }
        batches
    }

    /// Checks every field before anything is built or timed.
    ///
    /// # Errors
    /// A message naming the field, its value and what is allowed.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(m));
        if self.requests == 0 || self.batch_size == 0 || self.block_tokens == 0 {
            return bad("requests, batch_size and block_tokens must be >= 1".into());
        }
        if self.extra_batches.contains(&0) {
            return bad(format!(
                "extra_batches {:?}: every batch size must be >= 1",
                self.extra_batches
            ));
        }
        if self.precisions.is_empty() {
            return bad("precisions is empty: give at least one of f32, bf16".into());
        }
        if self.rounds == 0 {
            return bad(
                "rounds 0: at least 1 timed round is needed (the numbers are the best round's)"
                    .into(),
            );
        }
        if !(self.gen_len_mean.is_finite() && self.gen_len_mean >= 1.0) {
            return bad(format!(
                "gen_len_mean {} must be a number >= 1",
                self.gen_len_mean
            ));
        }
        if !(self.gen_len_std.is_finite() && self.gen_len_std >= 0.0) {
            return bad(format!(
                "gen_len_std {} must be a number >= 0",
                self.gen_len_std
            ));
        }
        if self.context < 2 {
            return bad("context must be >= 2".into());
        }
        if self.recursions.iter().any(|&n| n < 2) {
            return bad(format!(
                "recursion counts must be >= 2, got {:?}",
                self.recursions
            ));
        }
        if !(self.exit_fraction > 0.0 && self.exit_fraction <= 1.0) {
            return bad(format!(
                "exit_fraction {} must be in (0, 1]",
                self.exit_fraction
            ));
        }
        if self.calib_requests == 0 || self.calib_passes == 0 {
            return bad("calib_requests and calib_passes must be >= 1".into());
        }
        if !matches!(self.backend.as_str(), "cpu" | "cuda") {
            return bad(format!(
                "backend {:?} is not a backend: use cpu or cuda",
                self.backend
            ));
        }
        Ok(())
    }
}

/// One model in one batch setting.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelReport {
    /// `vanilla-L` or `mor-N`.
    pub name: String,
    /// Precision of the packed weights.
    #[serde(default)]
    pub precision: Precision,
    /// Batch setting: `fixed` or `relative_max`.
    pub setting: String,
    /// `N_r` (1 for vanilla).
    pub num_recursions: usize,
    /// Unrolled layers.
    pub layers: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Block slots (and concurrent requests).
    pub batch_size: usize,
    /// Interleaved timed rounds; the numbers are the best round's.
    pub rounds: usize,
    /// Tokens generated in the timed run.
    pub tokens: u64,
    /// Seconds of the timed run.
    pub seconds: f64,
    /// Generated tokens per second over the whole run.
    pub tokens_per_s: f64,
    /// Generated tokens per second while every batch slot had a request (before the tail
    /// of the last requests; the regime of the paper's 1K-request runs).
    pub steady_tokens_per_s: f64,
    /// The vanilla model this one is compared with.
    pub vanilla: String,
    /// `tokens_per_s / tokens_per_s(vanilla)` in the same setting.
    pub throughput_ratio_vs_vanilla: f64,
    /// Throughput over the f32 run of the same model, setting and batch (bf16 rows, when
    /// f32 was timed too).
    #[serde(default)]
    pub throughput_ratio_vs_f32: Option<f64>,
    /// `steady_tokens_per_s / steady_tokens_per_s(vanilla)`.
    pub steady_throughput_ratio_vs_vanilla: f64,
    /// Exact K/V bytes per generated position (measured in the cache).
    pub kv_bytes_per_token: f64,
    /// `kv_bytes_per_token / kv_bytes_per_token(vanilla)`, whole model.
    pub kv_bytes_ratio_vs_vanilla: f64,
    /// The same ratio over the recursion blocks only (prelude and coda removed from both).
    pub kv_recursion_ratio_vs_vanilla: f64,
    /// Spec §4's `(N_r + 1) / (2 N_r)` (recursion blocks only; 1 for vanilla).
    pub kv_ratio_formula: f64,
    /// `kv_recursion_ratio_vs_vanilla / kv_ratio_formula`: 1 when the realised depths
    /// follow the capacity schedule exactly.
    pub kv_ratio_over_formula: f64,
    /// Share of positions by depth `1..=N_r` in the timed run.
    pub depth_distribution: Vec<f64>,
    /// The capacity schedule's depth distribution (`1/N_r` each).
    pub target_depth_distribution: Vec<f64>,
    /// Calibrated gate thresholds per step (`-inf` = always continue).
    pub thresholds: Vec<f64>,
    /// Mean items per shared-block call.
    pub mean_block_occupancy: f64,
    /// Block calls that mixed tokens at different depths.
    pub mixed_depth_calls: u64,
    /// Requests preempted for KV memory.
    pub preemptions: u64,
    /// Floating-point operations per generated token (projections, attention over the
    /// caches, LM head; 2 per multiply-add), counted by the engine.
    pub flops_per_token: f64,
    /// Share of those in attention.
    pub attention_flop_share: f64,
    /// `flops_per_token(vanilla) / flops_per_token`: the throughput ratio a machine whose
    /// time follows the arithmetic would show (the compute-bound ceiling).
    pub flop_ratio_vs_vanilla: f64,
    /// `throughput_ratio_vs_vanilla / flop_ratio_vs_vanilla`: above 1 when the model runs
    /// its arithmetic faster than vanilla does (e.g. fuller or cheaper calls), below 1 when
    /// its scheduling costs more than it saves.
    pub throughput_over_flop_ratio: f64,
    /// Seconds of the timed run by engine phase.
    pub phase_seconds: PhaseSeconds,
}

/// Where a timed run spent its time (engine phases, spec §5's pipeline).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseSeconds {
    /// Shared-block calls (all layers for vanilla), KV appends included.
    pub block: f64,
    /// Coda layers, LM head and sampling of exited tokens.
    pub exit: f64,
    /// Embeddings and prelude layers of next tokens.
    pub entry: f64,
    /// Expert-choice routing decisions.
    pub route: f64,
}

/// The whole benchmark.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InferBenchReport {
    /// The settings.
    pub config: InferBenchConfig,
    /// Generation lengths of the timed requests (mean, min, max).
    pub gen_len_stats: (f64, usize, usize),
    /// The KV budget of the relative-max setting: what the vanilla model needs for
    /// `batch_size` sequences of mean length.
    pub kv_budget_bytes: f64,
    /// Every model in every setting.
    pub models: Vec<ModelReport>,
}

fn model_toml(cfg: &InferBenchConfig, layers: usize, recursion: &str, extra: &str) -> String {
    format!(
        "[model]\npreset = \"{}\"\nnum_layers = {layers}\nseq_len = {}\n\
         [recursion]\n{recursion}\n{extra}\n\
         [runtime]\nbackend = {{ kind = \"{}\" }}\nseed = {}\n\
         [train]\nbudget = {{ steps = 1 }}\n",
        cfg.preset, cfg.context, cfg.backend, cfg.seed
    )
}

/// The MoR config with `n` recursions and its vanilla of equal unrolled depth.
fn configs(cfg: &InferBenchConfig, n: usize) -> Result<(ResolvedConfig, ResolvedConfig)> {
    let mor = Config::from_toml_str(&model_toml(
        cfg,
        cfg.base_layers,
        &format!("num_recursions = {n}\nsharing = {{ kind = \"middle_cycle\" }}"),
        "[router]\nkind = \"expert_choice\"\n[kv]\nkind = \"recursion_wise\"",
    ))?;
    let layers = mor.plan.num_slots();
    let van = Config::from_toml_str(&model_toml(
        cfg,
        layers,
        "num_recursions = 1\nsharing = { kind = \"none\" }",
        "",
    ))?;
    Ok((mor, van))
}

fn capacities(n: usize) -> Vec<f64> {
    (1..=n).map(|r| (n - r + 1) as f64 / n as f64).collect()
}

/// Generation lengths ~ Normal(mean, std), rounded, clamped to `1..=context-1`.
fn gen_lengths(cfg: &InferBenchConfig, n: usize, label: &str) -> Vec<usize> {
    let mut rng = Rng::derive(cfg.seed, label);
    (0..n)
        .map(|_| {
            let x = (cfg.gen_len_mean + cfg.gen_len_std * rng.normal()).round();
            (x.max(1.0) as usize).min(cfg.context - 1)
        })
        .collect()
}

fn sampling(cfg: &InferBenchConfig, i: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: cfg.seed.wrapping_add(i as u64),
    }
}

/// The untimed calibration requests: run-like lengths, other seeds.
fn calibration_requests(cfg: &InferBenchConfig) -> Vec<Request> {
    gen_lengths(cfg, cfg.calib_requests, "calibration")
        .into_iter()
        .enumerate()
        .map(|(i, len)| Request {
            prompt: vec![0],
            max_new_tokens: len,
            sampling: sampling(cfg, 10_000 + i),
            stop_token: None,
        })
        .collect()
}

/// Per-step gate thresholds so that the share of tokens continuing from step r−1 to r is
/// `cap_r / cap_{r−1}` on requests like the timed ones (see the module docs). Returns the
/// thresholds (`-inf` for step 1, whose capacity is 1).
///
/// Pass 0 lets every token run every step and fits the thresholds one step after the other
/// on the tokens that pass the earlier ones; each later pass decodes with the current
/// thresholds and re-fits every step on the tokens that actually reached it (hidden states
/// change once other tokens exit, since attention at step r sees only step-r tokens).
pub fn calibrate_thresholds(model: &MorModel, cfg: &InferBenchConfig) -> Result<Vec<f64>> {
    let n = model.plan().num_recursions;
    let caps = capacities(n);
    let mut thresholds = vec![f64::NEG_INFINITY; n];
    for pass in 0..cfg.calib_passes.max(1) {
        // On the host path (a CPU model) the decode layers compute each row the same
        // whatever its batch (packed products); on the device path (and in the routers,
        // which run on candle) a product may round differently at another batch. Either
        // way the differences are far below the sampling error of the fitted quantiles, so
        // the calibration runs at a batch of its own choosing.
        let ecfg = EngineConfig {
            batch_size: cfg.batch_size.max(CALIB_BATCH),
            block_tokens: cfg.block_tokens,
            exit: ExitRule::GateThresholds(thresholds.clone()),
            record_gates: true,
            ..Default::default()
        };
        let mut engine = Engine::new(model, ecfg)?;
        for rq in calibration_requests(cfg) {
            engine.submit(rq)?;
        }
        engine.run_to_completion()?;
        if pass == 0 {
            // Every token was scored at every step: gates per token, then nested survivors.
            let mut per_token: std::collections::BTreeMap<(u64, u32), Vec<f32>> =
                Default::default();
            for g in engine.gate_trace() {
                let v = per_token
                    .entry((g.id, g.pos))
                    .or_insert_with(|| vec![f32::NAN; n]);
                v[g.step - 1] = g.gate;
            }
            let mut alive: Vec<&Vec<f32>> = per_token.values().collect();
            for r in 1..n {
                let g: Vec<f32> = alive.iter().map(|v| v[r]).collect();
                thresholds[r] = quantile_threshold(&g, caps[r] / caps[r - 1]);
                alive.retain(|v| v[r] as f64 >= thresholds[r]);
            }
        } else {
            let mut cand: Vec<Vec<f32>> = vec![Vec::new(); n];
            for g in engine.gate_trace() {
                cand[g.step - 1].push(g.gate);
            }
            for r in 1..n {
                if !cand[r].is_empty() {
                    thresholds[r] = quantile_threshold(&cand[r], caps[r] / caps[r - 1]);
                }
            }
        }
    }
    Ok(thresholds)
}

/// Batch of the calibration runs (at least).
const CALIB_BATCH: usize = 64;

/// The threshold that keeps the share `keep` of `g` (values `>=` it).
fn quantile_threshold(g: &[f32], keep: f64) -> f64 {
    if g.is_empty() {
        return f64::NEG_INFINITY;
    }
    let mut v: Vec<f32> = g.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let k = ((keep * v.len() as f64).round() as usize).clamp(1, v.len());
    v[k - 1] as f64
}

/// One timed run.
#[derive(Debug, Clone)]
struct Timed {
    tokens: u64,
    seconds: f64,
    /// Tokens and seconds while every batch slot had a request (until the first request
    /// finished with no request left to take its place).
    steady_tokens: u64,
    steady_seconds: f64,
    stats: EngineStats,
}

impl Timed {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    fn steady_tokens_per_s(&self) -> f64 {
        self.steady_tokens as f64 / self.steady_seconds.max(1e-9)
    }
}

/// The engine of a timed run. Its KV pool holds `batch` requests of the longest timed
/// length at every slot (no back-pressure, and no more memory than that: the engines of a
/// round are alive together).
fn engine_config(
    cfg: &InferBenchConfig,
    model: &MorModel,
    batch: usize,
    precision: Precision,
    exit: ExitRule,
    longest: usize,
) -> EngineConfig {
    let batching = if model.plan().num_recursions == 1 {
        Batching::SequenceWise
    } else {
        Batching::DepthWise
    };
    EngineConfig {
        batch_size: batch,
        max_active: batch,
        block_tokens: cfg.block_tokens,
        kv_blocks: batch * model.plan().num_slots() * (longest + 2).div_ceil(cfg.block_tokens),
        exit,
        max_depth: None,
        batching,
        record_gates: false,
        exit_batch: ((cfg.exit_fraction * batch as f64).round() as usize).clamp(1, batch),
        precision,
        kv_precision: cfg.kv_precision,
    }
}

/// Wall-clock time a model decodes before the next model of an interleaved run takes over.
const SLICE_SECONDS: f64 = 0.2;

/// One model's engine in an interleaved timed run: warmed up, the timed requests queued,
/// the time of its own slices summed.
struct Live<'m> {
    engine: Engine<'m>,
    batch: usize,
    before: EngineStats,
    seconds: f64,
    tokens: u64,
    steady: Option<(u64, f64)>,
    /// Whether every batch slot has held a request at some point.
    was_full: bool,
    failed: Option<String>,
}

impl<'m> Live<'m> {
    /// Builds the engine, runs the (untimed) warm-up requests and queues the timed ones.
    fn start(
        model: &'m MorModel,
        cfg: &InferBenchConfig,
        batch: usize,
        precision: Precision,
        exit: ExitRule,
        lens: &[usize],
    ) -> Result<Self> {
        let warm = gen_lengths(cfg, cfg.warmup_requests, "warmup");
        let longest = lens.iter().chain(&warm).copied().max().unwrap_or(1);
        let mut engine = Engine::new(
            model,
            engine_config(cfg, model, batch, precision, exit, longest),
        )?;
        for (i, &len) in warm.iter().enumerate() {
            engine.submit(Request {
                prompt: vec![0],
                max_new_tokens: len,
                sampling: sampling(cfg, 1_000_000 + i),
                stop_token: None,
            })?;
        }
        engine.run_to_completion()?;
        let before = engine.stats().clone();
        for (i, &len) in lens.iter().enumerate() {
            engine.submit(Request {
                prompt: vec![0],
                max_new_tokens: len,
                sampling: sampling(cfg, i),
                stop_token: None,
            })?;
        }
        Ok(Live {
            engine,
            batch,
            before,
            seconds: 0.0,
            tokens: 0,
            steady: None,
            was_full: false,
            failed: None,
        })
    }

    /// Decodes for about `budget` seconds (or until every request has finished).
    fn slice(&mut self, budget: f64) -> Result<()> {
        let t0 = Instant::now();
        while !self.engine.is_idle() && t0.elapsed().as_secs_f64() < budget {
            for ev in self.engine.step()? {
                match ev {
                    Event::Token { .. } => self.tokens += 1,
                    Event::Finished(c) => {
                        if let FinishReason::Error(e) = &c.finish {
                            self.failed
                                .get_or_insert(format!("request {} failed: {e}", c.id));
                        }
                    }
                }
            }
            self.was_full |= self.engine.active_requests() >= self.batch;
            if self.steady.is_none()
                && self.was_full
                && self.engine.pending_requests() == 0
                && self.engine.active_requests() < self.batch
            {
                self.steady = Some((self.tokens, self.seconds + t0.elapsed().as_secs_f64()));
            }
        }
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn finish(self) -> Result<Timed> {
        if let Some(e) = self.failed {
            return Err(Error::msg(e));
        }
        let (steady_tokens, steady_seconds) = self.steady.unwrap_or((self.tokens, self.seconds));
        Ok(Timed {
            tokens: self.tokens,
            seconds: self.seconds,
            steady_tokens,
            steady_seconds,
            stats: self.engine.stats().since(&self.before),
        })
    }
}

fn param_count(model: &MorModel) -> usize {
    model
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum()
}

/// Bytes of one K/V entry (one token at one slot): `2 · hkv · dh · 4`.
fn entry_bytes(c: &ResolvedConfig) -> f64 {
    (2 * c.model.num_kv_heads * c.model.head_dim * 4) as f64
}

/// A model under test and its best timed run so far.
struct Subject {
    name: String,
    setting: &'static str,
    model: Rc<MorModel>,
    cfg: ResolvedConfig,
    /// Index of the vanilla subject it is compared with (itself for vanilla).
    vanilla: usize,
    thresholds: Vec<f64>,
    batch: usize,
    precision: Precision,
    best: Option<Timed>,
    best_steady: f64,
}

impl Subject {
    fn exit(&self) -> ExitRule {
        if self.model.plan().num_recursions > 1 {
            ExitRule::GateThresholds(self.thresholds.clone())
        } else {
            ExitRule::Router
        }
    }

    /// Keeps `t` when it is the fastest run so far.
    fn record(&mut self, t: &Timed) {
        self.best_steady = self.best_steady.max(t.steady_tokens_per_s());
        if self.best.as_ref().is_none_or(|b| t.seconds < b.seconds) {
            self.best = Some(t.clone());
        }
    }

    fn report(&self, cfg: &InferBenchConfig, vanilla: Option<&ModelReport>) -> Result<ModelReport> {
        let t = self
            .best
            .as_ref()
            .ok_or_else(|| Error::msg(format!("{} was never timed", self.name)))?;
        let n = self.model.plan().num_recursions;
        let hist = &t.stats.depth_histogram;
        let total: u64 = hist.iter().sum();
        let depth_distribution: Vec<f64> = (1..=n)
            .map(|d| hist.get(d).copied().unwrap_or(0) as f64 / total.max(1) as f64)
            .collect();
        let mut r = ModelReport {
            name: self.name.clone(),
            precision: self.precision,
            setting: self.setting.to_string(),
            num_recursions: n,
            layers: self.model.plan().num_slots(),
            params: param_count(&self.model),
            batch_size: self.batch,
            rounds: cfg.rounds,
            tokens: t.tokens,
            seconds: t.seconds,
            tokens_per_s: t.tokens_per_s(),
            steady_tokens_per_s: self.best_steady,
            vanilla: self.name.clone(),
            throughput_ratio_vs_vanilla: 1.0,
            throughput_ratio_vs_f32: None,
            steady_throughput_ratio_vs_vanilla: 1.0,
            kv_bytes_per_token: t.stats.kv_bytes_per_token(),
            kv_bytes_ratio_vs_vanilla: 1.0,
            kv_recursion_ratio_vs_vanilla: 1.0,
            kv_ratio_formula: if n > 1 {
                (n as f64 + 1.0) / (2.0 * n as f64)
            } else {
                1.0
            },
            kv_ratio_over_formula: 1.0,
            depth_distribution,
            target_depth_distribution: vec![1.0 / n as f64; n],
            thresholds: self.thresholds.clone(),
            mean_block_occupancy: t.stats.mean_block_occupancy(),
            mixed_depth_calls: t.stats.mixed_depth_calls,
            preemptions: t.stats.preemptions,
            flops_per_token: t.stats.total_flops() as f64 / t.tokens.max(1) as f64,
            attention_flop_share: t.stats.attention_flops as f64
                / t.stats.total_flops().max(1) as f64,
            flop_ratio_vs_vanilla: 1.0,
            throughput_over_flop_ratio: 1.0,
            phase_seconds: PhaseSeconds {
                block: t.stats.block_seconds,
                exit: t.stats.exit_seconds,
                entry: t.stats.entry_seconds,
                route: t.stats.route_seconds,
            },
        };
        if let Some(v) = vanilla {
            r.vanilla = v.name.clone();
            r.throughput_ratio_vs_vanilla = r.tokens_per_s / v.tokens_per_s.max(1e-9);
            r.steady_throughput_ratio_vs_vanilla =
                r.steady_tokens_per_s / v.steady_tokens_per_s.max(1e-9);
            r.kv_bytes_ratio_vs_vanilla = r.kv_bytes_per_token / v.kv_bytes_per_token.max(1e-9);
            let e = entry_bytes(&self.cfg);
            let plan = &self.cfg.plan;
            let unique = (plan.num_slots() - plan.base_depth * plan.num_recursions) as f64 * e;
            r.kv_recursion_ratio_vs_vanilla =
                (r.kv_bytes_per_token - unique) / (v.kv_bytes_per_token - unique).max(1e-9);
            r.kv_ratio_over_formula = r.kv_recursion_ratio_vs_vanilla / r.kv_ratio_formula;
            r.flop_ratio_vs_vanilla = v.flops_per_token / r.flops_per_token.max(1e-9);
            r.throughput_over_flop_ratio =
                r.throughput_ratio_vs_vanilla / r.flop_ratio_vs_vanilla.max(1e-9);
        }
        Ok(r)
    }
}

/// Times the subjects `which` together, `rounds` times: in each round every model decodes
/// the same requests, the models taking turns of [`SLICE_SECONDS`] until all are done, so
/// that the machine's drift over a round reaches every model alike; each model keeps its
/// fastest round.
fn time_all(
    subjects: &mut [Subject],
    which: &[usize],
    cfg: &InferBenchConfig,
    lens: &[usize],
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let models: Vec<Rc<MorModel>> = which
        .iter()
        .map(|&i| Rc::clone(&subjects[i].model))
        .collect();
    for round in 1..=cfg.rounds.max(1) {
        let names: Vec<String> = which
            .iter()
            .map(|&i| {
                format!(
                    "{} ({}, {}, batch {})",
                    subjects[i].name,
                    precision_name(subjects[i].precision),
                    subjects[i].setting,
                    subjects[i].batch
                )
            })
            .collect();
        log(&format!(
            "round {round}/{}: timing {} in turns",
            cfg.rounds,
            names.join(", ")
        ));
        let mut lives = Vec::with_capacity(which.len());
        for (&i, m) in which.iter().zip(&models) {
            let s = &subjects[i];
            lives.push(Live::start(m, cfg, s.batch, s.precision, s.exit(), lens)?);
        }
        while lives.iter().any(|l| !l.engine.is_idle()) {
            for l in lives.iter_mut() {
                l.slice(SLICE_SECONDS)?;
            }
        }
        for ((&i, l), name) in which.iter().zip(lives).zip(&names) {
            let t = l.finish()?;
            let st = &t.stats;
            log(&format!(
                "  {name}: {:.2} s ({:.0} tokens/s): block {:.2} s, exit {:.2} s, entry {:.2} s, \
                 route {:.2} s; {:.1} items per block call, {:.1} per exit call",
                t.seconds,
                t.tokens_per_s(),
                st.block_seconds,
                st.exit_seconds,
                st.entry_seconds,
                st.route_seconds,
                st.mean_block_occupancy(),
                st.exit_items as f64 / st.exit_calls.max(1) as f64
            ));
            subjects[i].record(&t);
        }
    }
    Ok(())
}

/// The report of every subject, in order: vanilla models against themselves, the others
/// against their vanilla's fastest round.
fn reports(subjects: &[Subject], cfg: &InferBenchConfig) -> Result<Vec<ModelReport>> {
    let mut out: Vec<Option<ModelReport>> = vec![None; subjects.len()];
    for (i, s) in subjects.iter().enumerate() {
        if s.vanilla == i {
            out[i] = Some(s.report(cfg, None)?);
        }
    }
    for (i, s) in subjects.iter().enumerate() {
        if s.vanilla != i {
            let v = out[s.vanilla].clone();
            out[i] = Some(s.report(cfg, v.as_ref())?);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// `f32` or `bf16`, as the command line spells it.
pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    }
}

/// A model of the benchmark, built once and timed in every setting.
struct Base {
    name: String,
    model: Rc<MorModel>,
    cfg: ResolvedConfig,
    /// Index (in the bases) of the vanilla model it is compared with (itself for vanilla).
    vanilla: usize,
    thresholds: Vec<f64>,
}

impl Base {
    fn subject(
        &self,
        setting: &'static str,
        vanilla: usize,
        batch: usize,
        p: Precision,
    ) -> Subject {
        Subject {
            name: self.name.clone(),
            setting,
            model: Rc::clone(&self.model),
            cfg: self.cfg.clone(),
            vanilla,
            thresholds: self.thresholds.clone(),
            batch,
            precision: p,
            best: None,
            best_steady: 0.0,
        }
    }
}

/// Runs the benchmark; `log` receives one line per step.
///
/// Every model is timed at every fixed batch (`batch_size`, then `extra_batches`) in every
/// precision, all interleaved in one phase; the relative-max setting (scaled from
/// `batch_size`) forms a second phase, per precision, with the vanilla models again.
///
/// # Errors
/// Bad settings or a failing model.
pub fn run(cfg: &InferBenchConfig, log: &mut dyn FnMut(&str)) -> Result<InferBenchReport> {
    cfg.check()?;
    let _ = mor_models::builtin::link();
    let lens = gen_lengths(cfg, cfg.requests, "requests");
    let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    let gen_len_stats = (
        mean,
        *lens.iter().min().unwrap_or(&0),
        *lens.iter().max().unwrap_or(&0),
    );
    // Build every model: each MoR and the vanilla of its unrolled depth (shared when equal).
    let mut bases: Vec<Base> = Vec::new();
    for &n in &cfg.recursions {
        let (mc, vc) = configs(cfg, n)?;
        let vname = format!("vanilla-{}", vc.model.num_layers);
        let v = match bases.iter().position(|s| s.name == vname) {
            Some(v) => v,
            None => {
                bases.push(Base {
                    name: vname,
                    model: Rc::new(MorModel::new(&vc)?),
                    cfg: vc,
                    vanilla: bases.len(),
                    thresholds: Vec::new(),
                });
                bases.len() - 1
            }
        };
        let model = MorModel::new(&mc)?;
        log(&format!("mor-{n}: calibrating exit thresholds"));
        let thresholds = calibrate_thresholds(&model, cfg)?;
        bases.push(Base {
            name: format!("mor-{n}"),
            model: Rc::new(model),
            cfg: mc,
            vanilla: v,
            thresholds,
        });
    }
    let batches = cfg.fixed_batches();
    // One group of subjects (every base) per precision and fixed batch; the group of
    // precision i at `batch_size` starts at i · batches.len() · bases.len().
    let mut subjects: Vec<Subject> = Vec::new();
    for &p in &cfg.precisions {
        for &b in &batches {
            let first = subjects.len();
            for base in &bases {
                subjects.push(base.subject("fixed", first + base.vanilla, b, p));
            }
        }
    }
    let all: Vec<usize> = (0..subjects.len()).collect();
    time_all(&mut subjects, &all, cfg, &lens, log)?;
    let fixed = reports(&subjects, cfg)?;
    let kv_budget = subjects
        .iter()
        .zip(&fixed)
        .filter(|(s, _)| s.model.plan().num_recursions == 1 && s.batch == cfg.batch_size)
        .map(|(_, r)| r.kv_bytes_per_token * cfg.batch_size as f64 * mean)
        .fold(0.0, f64::max);
    if cfg.relative_max {
        // maxB from a fixed KV budget: B · (vanilla bytes per token / MoR bytes per token);
        // vanilla keeps B. Vanilla takes turns with these models too, as its own
        // relative-max subject, so that each ratio compares runs of one phase.
        let mut which = Vec::new();
        for pi in 0..cfg.precisions.len() {
            let p = cfg.precisions[pi];
            let g0 = pi * batches.len() * bases.len();
            let mut again = std::collections::HashMap::new();
            for (j, base) in bases.iter().enumerate().filter(|(j, b)| b.vanilla == *j) {
                again.insert(j, subjects.len());
                which.push(subjects.len());
                subjects.push(base.subject("relative_max", subjects.len(), cfg.batch_size, p));
            }
            for (j, base) in bases.iter().enumerate().filter(|(j, b)| b.vanilla != *j) {
                let (mr, vr) = (&fixed[g0 + j], &fixed[g0 + base.vanilla]);
                let b = ((cfg.batch_size as f64 * vr.kv_bytes_per_token
                    / mr.kv_bytes_per_token.max(1e-9))
                .round() as usize)
                    .max(1);
                which.push(subjects.len());
                subjects.push(base.subject("relative_max", again[&base.vanilla], b, p));
            }
        }
        time_all(&mut subjects, &which, cfg, &lens, log)?;
    }
    let mut models = reports(&subjects, cfg)?;
    // bf16 (or any other precision) against f32: the same model, setting and batch.
    let f32_rates: Vec<(String, String, usize, f64)> = models
        .iter()
        .filter(|m| m.precision == Precision::F32)
        .map(|m| {
            (
                m.name.clone(),
                m.setting.clone(),
                m.batch_size,
                m.tokens_per_s,
            )
        })
        .collect();
    for m in models.iter_mut().filter(|m| m.precision != Precision::F32) {
        m.throughput_ratio_vs_f32 = f32_rates
            .iter()
            .find(|(n, s, b, _)| *n == m.name && *s == m.setting && *b == m.batch_size)
            .map(|(.., t)| m.tokens_per_s / t.max(1e-9));
    }
    Ok(InferBenchReport {
        config: cfg.clone(),
        gen_len_stats,
        kv_budget_bytes: kv_budget,
        models,
    })
}

/// A plain-text table of the report.
pub fn render_text(r: &InferBenchReport) -> String {
    let c = &r.config;
    let mut s = String::new();
    s.push_str(&format!(
        "inference throughput (spec §5, scaled down; backend {}): preset {}, context {}, threads {}, {} requests, \
         generation length ~ N({}, {}) -> mean {:.1}, min {}, max {}; fixed batch {}; precision {}; best \
         of {} interleaved round(s)\n",
        c.backend,
        c.preset,
        c.context,
        c.threads,
        c.requests,
        c.gen_len_mean,
        c.gen_len_std,
        r.gen_len_stats.0,
        r.gen_len_stats.1,
        r.gen_len_stats.2,
        c.fixed_batches()
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        c.precisions
            .iter()
            .map(|&p| precision_name(p))
            .collect::<Vec<_>>()
            .join(", "),
        c.rounds
    ));
    s.push_str(&format!(
        "relative-max KV budget: {:.1} MiB (vanilla at batch {} and mean length)\n\n",
        r.kv_budget_bytes / (1 << 20) as f64,
        c.batch_size
    ));
    s.push_str(&format!(
        "{:<11} {:<5} {:<12} {:>6} {:>5} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {:>7} {:>6}  {}\n",
        "model",
        "prec",
        "setting",
        "layers",
        "batch",
        "tokens/s",
        "x van",
        "steady",
        "FLOP x",
        "x/FLOP",
        "KV B/tok",
        "KV xvan",
        "KV rec x",
        "formula",
        "occup",
        "depth distribution"
    ));
    for m in &r.models {
        let dist: Vec<String> = m
            .depth_distribution
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect();
        s.push_str(&format!(
            "{:<11} {:<5} {:<12} {:>6} {:>5} {:>9.1} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.0} {:>7.3} {:>8.3} {:>7.3} {:>6.1}  [{}]\n",
            m.name,
            precision_name(m.precision),
            m.setting,
            m.layers,
            m.batch_size,
            m.tokens_per_s,
            m.throughput_ratio_vs_vanilla,
            m.steady_throughput_ratio_vs_vanilla,
            m.flop_ratio_vs_vanilla,
            m.throughput_over_flop_ratio,
            m.kv_bytes_per_token,
            m.kv_bytes_ratio_vs_vanilla,
            m.kv_recursion_ratio_vs_vanilla,
            m.kv_ratio_formula,
            m.mean_block_occupancy,
            dist.join(", ")
        ));
    }
    s.push_str(&format!(
        "\n{:<11} {:<5} {:<12} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10}\n",
        "model",
        "prec",
        "setting",
        "batch",
        "seconds",
        "block",
        "exit",
        "entry",
        "route",
        "attn FLOP"
    ));
    for m in &r.models {
        let p = &m.phase_seconds;
        s.push_str(&format!(
            "{:<11} {:<5} {:<12} {:>5} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1}%\n",
            m.name,
            precision_name(m.precision),
            m.setting,
            m.batch_size,
            m.seconds,
            p.block,
            p.exit,
            p.entry,
            p.route,
            100.0 * m.attention_flop_share
        ));
    }
    let vs_f32: Vec<String> = r
        .models
        .iter()
        .filter_map(|m| {
            m.throughput_ratio_vs_f32.map(|x| {
                format!(
                    "{:<11} {:<5} {:<12} {:>5} {:>8.3}\n",
                    m.name,
                    precision_name(m.precision),
                    m.setting,
                    m.batch_size,
                    x
                )
            })
        })
        .collect();
    if !vs_f32.is_empty() {
        s.push_str(&format!(
            "\n{:<11} {:<5} {:<12} {:>5} {:>8}\n",
            "model", "prec", "setting", "batch", "x f32"
        ));
        s.push_str(&vs_f32.concat());
    }
    s.push_str(
        "\nx van: throughput over the vanilla model of equal unrolled depth, same precision and batch (whole run; `steady`: \
         while every batch slot had a request). FLOP x: vanilla's floating-point operations per \
         generated token over this model's (projections, attention over the caches, LM head; \
         counted by the engine), the ratio a purely compute-bound machine would show; x/FLOP: \
         the measured ratio over it. KV B/tok: exact K/V bytes per token measured in the \
         cache; KV xvan: over vanilla's, whole model; KV rec x: the same over the recursion \
         blocks only, to compare with spec §4's (N_r+1)/(2N_r). Exit thresholds are calibrated \
         per step on the untrained routers to the capacity schedule (target depth distribution \
         1/N_r each). Seconds by phase: shared-block calls (all layers for vanilla), exit \
         (coda, LM head, sampling), entry (embedding, prelude), routing. x f32: throughput \
         over the f32 run of the same model, setting and batch (prec: precision of the packed \
         weights; bf16 products round their inputs to bf16 and accumulate in f32).\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> InferBenchConfig {
        InferBenchConfig {
            requests: 6,
            gen_len_mean: 8.0,
            gen_len_std: 3.0,
            batch_size: 3,
            warmup_requests: 1,
            preset: "micro".into(),
            base_layers: 5,
            context: 32,
            recursions: vec![3],
            block_tokens: 4,
            calib_requests: 16,
            calib_passes: 3,
            ..InferBenchConfig::default()
        }
    }

    #[test]
    fn zero_rounds_are_refused() {
        let e = run(
            &InferBenchConfig {
                rounds: 0,
                ..tiny()
            },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rounds 0") && e.contains("at least 1"), "{e}");
        assert!(InferBenchConfig {
            rounds: 1,
            ..tiny()
        }
        .check()
        .is_ok());
    }

    #[test]
    fn quantile_threshold_keeps_the_requested_share() {
        let g: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
        let t = quantile_threshold(&g, 0.25);
        assert_eq!(g.iter().filter(|&&x| x as f64 >= t).count(), 25);
        assert_eq!(quantile_threshold(&g, 1.0), 0.0);
        assert_eq!(quantile_threshold(&[], 0.5), f64::NEG_INFINITY);
    }

    #[test]
    fn calibrated_thresholds_realise_the_capacity_schedule() {
        let cfg = tiny();
        let (mc, _) = configs(&cfg, 3).unwrap();
        let model = MorModel::new(&mc).unwrap();
        let th = calibrate_thresholds(&model, &cfg).unwrap();
        assert_eq!(th[0], f64::NEG_INFINITY);
        assert!(th[1..].iter().all(|t| t.is_finite()), "{th:?}");
        // Decode the calibration requests with the thresholds: depth d has share ~1/3.
        let ecfg = EngineConfig {
            batch_size: cfg.batch_size,
            exit: ExitRule::GateThresholds(th.clone()),
            ..Default::default()
        };
        let mut engine = Engine::new(&model, ecfg).unwrap();
        for rq in calibration_requests(&cfg) {
            engine.submit(rq).unwrap();
        }
        engine.run_to_completion().unwrap();
        let hist = &engine.stats().depth_histogram;
        let n: u64 = hist.iter().sum();
        assert_eq!(hist[0], 0);
        for d in 1..=3 {
            let share = hist[d] as f64 / n as f64;
            assert!(
                (share - 1.0 / 3.0).abs() < 0.08,
                "depth {d}: share {share} ({hist:?})"
            );
        }
    }

    /// Several fixed batches and both precisions: one row per model, precision and batch,
    /// each MoR row against the vanilla of its own precision and batch, each bf16 row
    /// against the f32 row of its model and batch.
    #[test]
    fn batches_and_precisions_each_get_their_rows() {
        let cfg = InferBenchConfig {
            requests: 4,
            extra_batches: vec![1, 3],
            precisions: vec![Precision::F32, Precision::Bf16],
            relative_max: false,
            ..tiny()
        };
        let r = run(&cfg, &mut |_| {}).unwrap();
        let rows: Vec<(&str, Precision, usize)> = r
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.precision, m.batch_size))
            .collect();
        let mut want = Vec::new();
        for p in [Precision::F32, Precision::Bf16] {
            for b in [3, 1] {
                want.push(("vanilla-5", p, b));
                want.push(("mor-3", p, b));
            }
        }
        assert_eq!(rows, want);
        for m in &r.models {
            let v = r
                .models
                .iter()
                .find(|v| {
                    v.name == "vanilla-5"
                        && v.precision == m.precision
                        && v.batch_size == m.batch_size
                })
                .unwrap();
            assert_eq!(
                m.throughput_ratio_vs_vanilla,
                m.tokens_per_s / v.tokens_per_s
            );
            let f = r
                .models
                .iter()
                .find(|f| {
                    f.name == m.name
                        && f.precision == Precision::F32
                        && f.batch_size == m.batch_size
                })
                .unwrap();
            match m.precision {
                Precision::F32 => assert_eq!(m.throughput_ratio_vs_f32, None),
                Precision::Bf16 => assert_eq!(
                    m.throughput_ratio_vs_f32,
                    Some(m.tokens_per_s / f.tokens_per_s)
                ),
            }
        }
        let text = render_text(&r);
        assert!(
            text.contains("fixed batch 3, 1; precision f32, bf16"),
            "{text}"
        );
        assert!(text.contains("x f32"), "{text}");
        let bad = InferBenchConfig {
            extra_batches: vec![4, 0],
            ..tiny()
        };
        let e = bad.check().unwrap_err().to_string();
        assert!(e.contains("extra_batches [4, 0]"), "{e}");
        let none = InferBenchConfig {
            precisions: vec![],
            ..tiny()
        };
        assert!(none.check().unwrap_err().to_string().contains("f32, bf16"));
    }

    #[test]
    fn report_numbers_are_consistent() {
        let cfg = tiny();
        let r = run(&cfg, &mut |_| {}).unwrap();
        let names: Vec<(&str, &str)> = r
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.setting.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("vanilla-5", "fixed"),
                ("mor-3", "fixed"),
                ("vanilla-5", "relative_max"),
                ("mor-3", "relative_max")
            ]
        );
        let lens = gen_lengths(&cfg, cfg.requests, "requests");
        let total: usize = lens.iter().sum();
        let (mc, vc) = configs(&cfg, 3).unwrap();
        let e = entry_bytes(&mc);
        let van = &r.models[0];
        assert_eq!(van.tokens as usize, total);
        assert_eq!(van.throughput_ratio_vs_vanilla, 1.0);
        // Vanilla stores one entry per layer and position.
        assert_eq!(van.kv_bytes_per_token, vc.model.num_layers as f64 * e);
        assert_eq!(van.depth_distribution, vec![1.0]);
        // Each MoR setting against the vanilla run of its own phase.
        for (m, van) in [(&r.models[1], &r.models[0]), (&r.models[3], &r.models[2])] {
            assert_eq!(van.num_recursions, 1);
            assert_eq!(van.rounds, cfg.rounds);
            assert_eq!(m.tokens as usize, total);
            assert!(
                (m.throughput_ratio_vs_vanilla - m.tokens_per_s / van.tokens_per_s).abs() < 1e-12
            );
            // Bytes per token = (prelude + coda + B_d·depth) entries: the recursion ratio is
            // the mean depth over N_r.
            let mean_depth: f64 = m
                .depth_distribution
                .iter()
                .enumerate()
                .map(|(i, p)| (i + 1) as f64 * p)
                .sum();
            assert!((m.kv_recursion_ratio_vs_vanilla - mean_depth / 3.0).abs() < 1e-9);
            assert!(
                (m.kv_bytes_ratio_vs_vanilla - m.kv_bytes_per_token / van.kv_bytes_per_token).abs()
                    < 1e-12
            );
            assert!((m.kv_ratio_formula - 4.0 / 6.0).abs() < 1e-12);
            assert!(
                (m.kv_ratio_over_formula * m.kv_ratio_formula - m.kv_recursion_ratio_vs_vanilla)
                    .abs()
                    < 1e-12
            );
            assert!((m.depth_distribution.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert_eq!(m.thresholds.len(), 3);
            // Early exits do less arithmetic per token than vanilla's full depth.
            assert!(
                (m.flop_ratio_vs_vanilla - van.flops_per_token / m.flops_per_token).abs() < 1e-12
            );
            assert!(m.flop_ratio_vs_vanilla > 1.0, "{}", m.flop_ratio_vs_vanilla);
            assert!(
                (m.throughput_over_flop_ratio * m.flop_ratio_vs_vanilla
                    - m.throughput_ratio_vs_vanilla)
                    .abs()
                    < 1e-12
            );
            let p = &m.phase_seconds;
            assert!(p.block > 0.0 && p.exit > 0.0 && p.entry > 0.0);
            assert!(p.block + p.exit + p.entry + p.route <= m.seconds * 1.001 + 1e-3);
        }
        assert_eq!(van.flop_ratio_vs_vanilla, 1.0);
        assert!(van.flops_per_token > 0.0 && van.attention_flop_share > 0.0);
        let max = &r.models[3];
        let want = (cfg.batch_size as f64 * van.kv_bytes_per_token / r.models[1].kv_bytes_per_token)
            .round() as usize;
        assert_eq!(max.batch_size, want);
        assert!(
            max.batch_size > cfg.batch_size,
            "early exits must free KV memory for a larger batch"
        );
        let text = render_text(&r);
        assert!(text.contains("mor-3") && text.contains("relative_max"));
        assert!(text.contains("backend cpu"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["models"][1]["throughput_ratio_vs_vanilla"].is_number());
        assert!(json["models"][1]["kv_bytes_ratio_vs_vanilla"].is_number());
    }
}
