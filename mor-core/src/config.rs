//! Run configuration: one TOML file describes a run.
//!
//! Resolution runs in three stages (STYLE.md §9, after ripgrep's `lowargs`/`hiargs`):
//! 1. parse: [`raw`] serde types mirror the file, each section with `deny_unknown_fields`;
//!    every problem names its dotted path;
//! 2. plugins: each slot's `kind` is looked up in the [registry](crate::registry) and its
//!    parameters are validated by the plugin's own typed `Params`;
//! 3. cross-field checks: the recursion plan is built through the sharing strategy, dims,
//!    batch sizes and the router's needs are checked, each plugin's own `check` runs, and
//!    the training budget is converted to steps (spec §1.3, §1.4).
//!
//! Every problem of a stage is collected into one [`Error::Config`](crate::Error::Config).
//!
//! ```toml
//! [model]
//! preset = "tiny"                 # micro | tiny | small | 135m | 360m | 730m | 1.7b; any field overrides it
//! [recursion]
//! num_recursions = 3
//! sharing = { kind = "middle_cycle" }
//! [router]
//! kind = "expert_choice"
//! [train]
//! budget = { steps = 20 }
//! ```
//!
//! Defaults: `num_recursions = 1`; `sharing` is `none` when `N_r = 1` and `middle_cycle`
//! otherwise (the paper uses Middle-Cycle for every MoR and Recursive model, spec §2); no
//! `[router]` (or `kind = "none"`) means no routing; `kv = recursion_wise`;
//! `kv.share_pattern`/`kv.share_loops` unset (no KV sharing pattern in a vanilla model);
//! `backend = cpu`; the `[train]` defaults are the paper's recipe (spec §1.3) with a
//! CPU-sized batch and a budget of 1000 steps.

use crate::plan::{DepthFix, RecursionPlan};
pub use crate::plan::{KvShare, KvSharePattern};
use crate::registry::CheckCtx;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod overrides;
mod presets;
pub mod raw;
mod resolve;

pub use overrides::{apply_override, parse_override};
pub use presets::PRESETS;
pub use resolve::{available_cores, check_threads};

/// A plugin slot after resolution: its kind and its parameters with defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginSpec {
    /// Registered name.
    pub kind: String,
    /// Validated parameters (without `kind`).
    pub params: toml::Table,
}

/// Model dimensions (spec §1.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDims {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// Layer count before the depth fix.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub intermediate_size: usize,
    /// Training context length `L`.
    pub seq_len: usize,
    /// RoPE theta.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Std of the N(0, std²) initialisation.
    pub init_std: f64,
    /// Tie the LM head to the embedding.
    pub tie_embeddings: bool,
}

/// Recursion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecursionConfig {
    /// `N_r`.
    pub num_recursions: usize,
    /// Sharing strategy slot.
    pub sharing: PluginSpec,
    /// Share the RMSNorm weights of shared blocks.
    pub ln_share: bool,
    /// Depth fix.
    pub depth_fix: DepthFix,
    /// KV sharing of a vanilla model (`kv.share_pattern`, `kv.share_loops`; spec §4, §9):
    /// the plan then carries the pattern's (step, layer) labels with `N_r = loops` while
    /// `num_recursions` stays 1 (every layer keeps its own parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_share: Option<KvShare>,
    /// Relaxation of the shared weights (spec §6, relaxation table); `None` = plain sharing
    /// (`relaxation.kind = "none"`, absent from the serialized config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relaxation: Option<Relaxation>,
}

/// Relaxation of the shared weights per recursion depth (spec §6, relaxation table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Relaxation {
    /// A learned vector per recursion depth r, added to the hidden state entering step r
    /// (zero-initialised).
    RecursionEncoding,
    /// Per depth r, `W x + (alpha/rank) · B_r A_r x` on each target projection of each
    /// recursion layer (A_r ~ N(0, init_std), B_r = 0).
    Lora {
        /// Rank of `A_r: [rank, d_in]`, `B_r: [d_out, rank]`.
        rank: usize,
        /// Scale numerator: the low-rank term is multiplied by `alpha / rank`.
        alpha: f64,
        /// Target projections, a subset of `q_proj`, `k_proj`, `v_proj`, `o_proj`.
        targets: Vec<String>,
    },
    /// DoRA (Liu et al. 2024, arXiv 2402.09353) per depth r on the same targets as
    /// [`Relaxation::Lora`]: `W'_r = diag(m_r / ‖W + s·B_r A_r‖_row) (W + s·B_r A_r)` with
    /// `s = alpha / rank`, the norm taken per output row of `[d_out, d_in]`, and a learned
    /// magnitude `m_r: [d_out]` initialised to the row norms of `W` (B_r = 0, so an untrained
    /// model equals its base model).
    Dora {
        /// Rank of `A_r: [rank, d_in]`, `B_r: [d_out, rank]`.
        rank: usize,
        /// Scale numerator: the low-rank term is multiplied by `alpha / rank`.
        alpha: f64,
        /// Target projections, a subset of `q_proj`, `k_proj`, `v_proj`, `o_proj`.
        targets: Vec<String>,
    },
    /// Adaption prompt (LLaMA-Adapter, Zhang et al. 2023, arXiv 2303.16199) per depth r and
    /// layer of the shared block: a learned prefix `P_r: [prompt_len, d]` whose keys and
    /// values are the layer's own K/V projections (no RoPE), attended with a separate
    /// softmax and added to the attention output through a zero-initialised per-head gate
    /// `tanh(g_r)`.
    AdaptionPrompt {
        /// Prefix length `P`.
        prompt_len: usize,
    },
}

impl Relaxation {
    /// The config name of the kind: `lora`, `dora`, `adaption_prompt` or
    /// `recursion_encoding`.
    pub fn kind(&self) -> &'static str {
        match self {
            Relaxation::RecursionEncoding => "recursion_encoding",
            Relaxation::Lora { .. } => "lora",
            Relaxation::Dora { .. } => "dora",
            Relaxation::AdaptionPrompt { .. } => "adaption_prompt",
        }
    }

    /// `(rank, alpha, targets)` of a low-rank relaxation (LoRA or DoRA).
    pub fn low_rank(&self) -> Option<(usize, f64, &[String])> {
        match self {
            Relaxation::Lora {
                rank,
                alpha,
                targets,
            }
            | Relaxation::Dora {
                rank,
                alpha,
                targets,
            } => Some((*rank, *alpha, targets)),
            _ => None,
        }
    }
}

/// The projections a LoRA or DoRA relaxation may target.
pub const LORA_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// The training budget as written (spec §1.3): exactly one of steps, tokens or FLOPs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Optimiser steps.
    Steps(u64),
    /// Training tokens; steps = `floor(tokens / tokens_per_step)` (spec §1.3:
    /// `int(10e9/(1024·2048)) = 4768`), at least 1.
    Tokens(f64),
    /// Forward FLOPs of spec §1.4; tokens = `flops / flops_per_token`, steps rounded up.
    Flops(f64),
}

/// Learning-rate schedule (spec §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Warmup, stable, linear decay to 0 over the last `decay_frac` of the steps (the main runs).
    #[default]
    Trapezoid,
    /// Warmup, then cosine to `min_lr_ratio · lr` (the ablations).
    Cosine,
    /// Warmup, then constant.
    Constant,
}

/// Warmup length as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    /// 5% of the steps of this run, or of the `warmup_ref_flops` budget when set (spec
    /// §1.3: 5% of the smallest budget, 2e18).
    #[default]
    Auto,
    /// An explicit step count.
    Steps(u64),
}

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// Mixed precision: f32 master weights and optimiser state; the matrix products take
    /// bf16 inputs and accumulate in f32; norms, softmax, RoPE, residuals, router scores
    /// and the loss stay in f32. Needs a backend that implements it (`cpu`).
    Bf16,
}

impl Precision {
    /// The name used in configs (`"f32"`, `"bf16"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Where the trainer computes the AdamW update (`train.update_path`); an execution detail:
/// every path trains to the same weights up to f32 rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePath {
    /// The fused host update for f32 parameters on the CPU, tensor ops on the parameters'
    /// device otherwise.
    #[default]
    Auto,
    /// The fused host update (f32 parameters on the CPU only).
    Host,
    /// On the parameters' device (what a GPU run takes; any device): the fused kernel on
    /// CUDA for f32 parameters, tensor ops elsewhere.
    Device,
}

impl UpdatePath {
    /// The name used in configs (`"auto"`, `"host"`, `"device"`).
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePath::Auto => "auto",
            UpdatePath::Host => "host",
            UpdatePath::Device => "device",
        }
    }

    /// Whether this is [`UpdatePath::Auto`].
    pub fn is_auto(&self) -> bool {
        *self == UpdatePath::Auto
    }
}

/// What the loss-spike detector does when a step's loss z-score exceeds the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SpikeAction {
    /// Skip the update of that step.
    #[default]
    Skip,
    /// Stop training, keeping the last good checkpoint.
    Stop,
    /// Detector off.
    Off,
}

/// Training settings (spec §1.3), with the budget resolved into steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The budget as written.
    pub budget: Budget,
    /// Optimiser steps the budget gives (resolved in stage 3).
    pub steps: u64,
    /// Global batch in sequences (paper: 1024).
    pub batch_seqs: usize,
    /// Micro-batch in sequences; `batch_seqs / micro_batch_seqs` is the accumulation.
    pub micro_batch_seqs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// AdamW weight decay (not applied to norms and biases).
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Schedule.
    pub schedule: Schedule,
    /// Warmup as written.
    pub warmup: Warmup,
    /// FLOPs budget whose step count sets the automatic warmup.
    pub warmup_ref_flops: Option<f64>,
    /// Warmup steps (resolved: `round(0.05 · steps_ref)` for `auto`).
    pub warmup_steps: u64,
    /// Trapezoid cooldown fraction of the steps.
    pub decay_frac: f64,
    /// Cosine floor as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Precision.
    pub precision: Precision,
    /// Log every n steps.
    pub log_every: u64,
    /// Evaluate every n steps (0 = never).
    pub eval_every: u64,
    /// Checkpoint every n steps (0 = never).
    pub checkpoint_every: u64,
    /// Loss-spike z-score threshold.
    pub spike_zscore: f64,
    /// Loss-spike rolling window in steps.
    pub spike_window: usize,
    /// What a spike does.
    pub spike_action: SpikeAction,
    /// Where the AdamW update is computed (an execution detail: the default `auto` is not
    /// written out, so resolved configs and what derives from them stay as they were).
    #[serde(default, skip_serializing_if = "UpdatePath::is_auto")]
    pub update_path: UpdatePath,
}

impl TrainConfig {
    /// Gradient accumulation: `batch_seqs / micro_batch_seqs`.
    pub fn grad_accum(&self) -> usize {
        self.batch_seqs / self.micro_batch_seqs.max(1)
    }

    /// Cooldown steps of the trapezoid: `round(decay_frac · steps)` (spec §1.3: 1888 of
    /// 9438).
    pub fn decay_steps(&self) -> u64 {
        ((self.decay_frac * self.steps as f64).round() as u64).min(self.steps)
    }

    /// Learning rate at 0-based optimiser step `t` (spec §1.3):
    /// - warmup: `t/w · lr` while `t < w`;
    /// - trapezoid: `lr` until `p = steps − d`, then `lr · (1 − (t−p)/d)`;
    /// - cosine: `lr · (m + (1−m) · ½(1 + cos(π·(t−w)/(steps−w))))` with `m = min_lr_ratio`;
    /// - constant: `lr`.
    pub fn lr_at(&self, t: u64) -> f64 {
        let w = self.warmup_steps;
        if t < w {
            return self.lr * t as f64 / w as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Trapezoid => {
                let d = self.decay_steps();
                let p = self.steps.saturating_sub(d);
                if t < p || d == 0 {
                    self.lr
                } else {
                    self.lr * (1.0 - (t - p) as f64 / d as f64).max(0.0)
                }
            }
            Schedule::Cosine => {
                let span = self.steps.saturating_sub(w).max(1) as f64;
                let progress = ((t - w) as f64 / span).min(1.0);
                let m = self.min_lr_ratio;
                self.lr * (m + (1.0 - m) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
            }
        }
    }
}

/// Where training text comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The generated corpus of `builtin_docs` documents.
    Builtin,
    /// A file or a folder of `.txt`, `.jsonl`, `.parquet`, or `.bin`/`.u16`/`.u32` token files.
    Path(PathBuf),
}

/// Which tokenizer to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// The builtin corpus's own vocabulary, or a BPE trained on the data.
    Auto,
    /// Bytes (vocab 256 plus specials).
    Byte,
    /// A BPE trained on the data to `vocab_size`.
    Bpe,
    /// A `tokenizer.json` file.
    Path(PathBuf),
}

/// Data settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// Source.
    pub source: DataSource,
    /// Tokenizer.
    pub tokenizer: TokenizerSpec,
    /// Text column of JSONL/Parquet files.
    pub text_column: String,
    /// Mask attention across document boundaries (the paper does not: spec §1.2).
    pub doc_masking: bool,
    /// Shuffle training rows (the released configs do not).
    pub shuffle: bool,
    /// Fraction of rows held out for validation.
    pub val_fraction: f64,
    /// Documents in the generated corpus.
    pub builtin_docs: usize,
}

/// Batch-size rule of the throughput benchmark (spec §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// A fixed batch size.
    #[default]
    Fixed,
    /// `batch_size · maxB_MoR / maxB_vanilla`, from the memory left after parameters and KV.
    RelativeMax,
}

/// Inference settings (spec §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferConfig {
    /// Batch size.
    pub batch_size: usize,
    /// Batch-size rule.
    pub batching: Batching,
    /// Requests to generate.
    pub num_requests: usize,
    /// Mean generation length.
    pub gen_len_mean: usize,
    /// Std of the generation length.
    pub gen_len_std: f64,
    /// Continuous depth-wise batching.
    pub continuous_depthwise: bool,
    /// Deepest recursion step a token may take (`1..=N_r`; test-time scaling).
    pub max_depth: usize,
    /// Threshold of the causal expert-choice rule (continue iff `σ(z) ≥ threshold`).
    pub threshold: f64,
    /// Sampling temperature (0 = greedy).
    pub temperature: f64,
    /// Top-k sampling (0 = off).
    pub top_k: usize,
    /// Nucleus sampling (1 = off).
    pub top_p: f64,
}

/// A router metric reported by evaluation (spec §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RouterMetric {
    /// Share of positions never selected at the last step.
    #[serde(rename = "dead_token_ratio")]
    DeadTokenRatio,
    /// Accuracy of `σ(z) ≥ 0.5` against the top-k target.
    #[serde(rename = "sampling_acc")]
    SamplingAcc,
    /// `(max_i Load_i − mean Load) / mean Load`.
    #[serde(rename = "maxvio")]
    MaxVio,
    /// Entropy of the mean routing distribution.
    #[serde(rename = "entropy")]
    Entropy,
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// lm-eval-style JSONL task files.
    pub tasks: Vec<PathBuf>,
    /// At most this many validation batches per evaluation (`None`: the whole split,
    /// bounded by `max_tokens`).
    pub max_batches: Option<usize>,
    /// At most this many predicted validation tokens per evaluation; the evaluation scores
    /// the whole validation split up to this cap (and says when the cap cut it).
    pub max_tokens: usize,
    /// Evaluate with the causal routing rule.
    pub causal: bool,
    /// Evaluate with the training-time full-sequence top-k (as the paper reports).
    pub full_sequence: bool,
    /// Router metrics to report.
    pub router_metrics: Vec<RouterMetric>,
}

/// Runtime settings, gathered from a [`ResolvedConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// Backend slot.
    pub backend: PluginSpec,
    /// Rayon threads (0 = rayon's choice; at most [`available_cores`]).
    pub threads: usize,
    /// Seed of all randomness.
    pub seed: u64,
}

/// How a recursive or MoR model's unique blocks are filled from a pretrained model
/// (uptraining, spec §2; the official code's `recursive.initialization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitMethod {
    /// Shared block `i` ← layer `round(linspace(first, last, B_d))[i]` of the shared range.
    Stepwise,
    /// Each shared block ← the mean of the layers its slots would have in the unrolled
    /// pretrained stack (needs as many pretrained layers in the shared range as slots).
    Average,
    /// Shared block `i` ← the `i`-th layer of the shared range.
    Lower,
    /// Shared block `i` ← the `i`-th of the last `B_d` layers of the shared range.
    Upper,
    /// Shared block `i` ← the `i`-th of a sorted random subset of the shared range (drawn
    /// from the config seed).
    Random,
}

impl InitMethod {
    /// Every method, in the order of spec §2.
    pub const ALL: [InitMethod; 5] = [
        InitMethod::Stepwise,
        InitMethod::Average,
        InitMethod::Lower,
        InitMethod::Upper,
        InitMethod::Random,
    ];

    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            InitMethod::Stepwise => "stepwise",
            InitMethod::Average => "average",
            InitMethod::Lower => "lower",
            InitMethod::Upper => "upper",
            InitMethod::Random => "random",
        }
    }
}

/// `[init]`: start from a pretrained model instead of random weights (spec §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitConfig {
    /// A Hugging Face Llama folder or a vanilla mor run folder.
    pub from: PathBuf,
    /// How the unique blocks are filled.
    pub method: InitMethod,
}

/// `round` of numpy (half to even), as the official code's `round(np.linspace(..))`.
fn round_half_even(x: f64) -> usize {
    let f = x.floor();
    let d = x - f;
    let r = if d > 0.5 || (d == 0.5 && f % 2.0 != 0.0) {
        f + 1.0
    } else {
        f
    };
    r.max(0.0) as usize
}

/// The pretrained layers each unique block of `plan` is filled from, for a pretrained
/// model of `pretrained_layers` layers (spec §2, uptraining initialisation). Entry `b`
/// lists the layers whose mean fills block `b` (one layer for every method but
/// `average`).
///
/// Prelude blocks take the first pretrained layers and coda blocks the last ones (the
/// Middle-* strategies keep the first and last layer unique); the shared blocks (the
/// recursion slots, numbered by first use) take their layers from the range between:
/// - `stepwise`: `round(linspace(0, R−1, B))` (half to even, as numpy);
/// - `lower` / `upper`: the first / last `B` layers of the range;
/// - `random`: a sorted random `B`-subset of the range (`seed`);
/// - `average`: the range unrolled over the recursion slots in plan order (Cycle with
///   `B = 2`, `N_r = 3` averages layers {0, 2, 4} and {1, 3, 5}; Sequence {0, 1, 2} and
///   {3, 4, 5}), so the range must hold exactly one layer per recursion slot and each
///   block must have at least two slots.
///
/// # Errors
/// A message for `init.method` or `init.from` when the pretrained depth cannot be mapped
/// onto the plan this way.
pub fn init_sources(
    plan: &RecursionPlan,
    pretrained_layers: usize,
    method: InitMethod,
    seed: u64,
) -> Result<Vec<Vec<usize>>, String> {
    use crate::plan::Segment;
    let p = pretrained_layers;
    let prelude: Vec<usize> = plan.prelude();
    let coda: Vec<usize> = plan.coda();
    let mut shared: Vec<usize> = Vec::new();
    let mut positions: Vec<Vec<usize>> = vec![Vec::new(); plan.num_blocks];
    let mut q = 0;
    for s in &plan.slots {
        if let Segment::Recursion { .. } = s.segment {
            if !shared.contains(&s.block) {
                shared.push(s.block);
            }
            positions[s.block].push(q);
            q += 1;
        }
    }
    let (a, c, b) = (prelude.len(), coda.len(), shared.len());
    if p < a + c + b.max(1) {
        return Err(format!(
            "the pretrained model has {p} layers; this plan needs at least {} ({a} before the recursion, {b} shared, {c} after)",
            a + c + b.max(1)
        ));
    }
    let r = p - a - c;
    let mut src = vec![Vec::new(); plan.num_blocks];
    for (k, &blk) in prelude.iter().enumerate() {
        src[blk] = vec![k];
    }
    for (k, &blk) in coda.iter().enumerate() {
        src[blk] = vec![p - c + k];
    }
    let picks: Vec<Vec<usize>> = match method {
        InitMethod::Average => {
            if r != q {
                return Err(format!(
                    "`average` needs one pretrained layer per recursion slot: the plan has {q} recursion slots, the pretrained model has {r} layers for them ({p} in all, {a} before and {c} after the recursion)"
                ));
            }
            if let Some(&blk) = shared.iter().find(|&&blk| positions[blk].len() < 2) {
                return Err(format!(
                    "`average` needs at least two tied layers per block; block {blk} has one (N_r = {}); use stepwise, lower, upper or random",
                    plan.num_recursions
                ));
            }
            shared.iter().map(|&blk| positions[blk].clone()).collect()
        }
        InitMethod::Stepwise => (0..b)
            .map(|i| {
                let x = if b == 1 {
                    0.0
                } else {
                    i as f64 * (r - 1) as f64 / (b - 1) as f64
                };
                vec![round_half_even(x)]
            })
            .collect(),
        InitMethod::Lower => (0..b).map(|i| vec![i]).collect(),
        InitMethod::Upper => (0..b).map(|i| vec![r - b + i]).collect(),
        InitMethod::Random => {
            let mut rng = crate::rng::Rng::derive(seed, "init.random");
            let mut all: Vec<usize> = (0..r).collect();
            rng.shuffle(&mut all);
            let mut pick = all[..b].to_vec();
            pick.sort_unstable();
            pick.into_iter().map(|i| vec![i]).collect()
        }
    };
    for (&blk, layers) in shared.iter().zip(picks) {
        src[blk] = layers.into_iter().map(|l| a + l).collect();
    }
    if let Some(blk) = src.iter().position(Vec::is_empty) {
        return Err(format!("block {blk} is used by no slot of the plan"));
    }
    Ok(src)
}

/// A fully resolved run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedConfig {
    /// Model dimensions.
    pub model: ModelDims,
    /// Recursion settings.
    pub recursion: RecursionConfig,
    /// Router slot; `None` for vanilla and the recursive baseline.
    pub router: Option<PluginSpec>,
    /// KV policy slot.
    pub kv: PluginSpec,
    /// Backend slot.
    pub backend: PluginSpec,
    /// The recursion plan.
    pub plan: RecursionPlan,
    /// Seed of all randomness.
    pub seed: u64,
    /// Rayon threads (0 = rayon's choice; at most [`available_cores`]).
    pub threads: usize,
    /// Training settings.
    pub train: TrainConfig,
    /// Data settings.
    pub data: DataConfig,
    /// Inference settings.
    pub infer: InferConfig,
    /// Evaluation settings.
    pub eval: EvalConfig,
    /// Uptraining initialisation (`[init]`); `None` starts from random weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    /// The TOML the config was resolved from (after overrides), to save with a run.
    pub source: toml::Table,
}

impl ResolvedConfig {
    /// Optimiser steps of the training budget.
    pub fn budget_steps(&self) -> u64 {
        self.train.steps
    }

    /// Tokens per optimiser step: `batch_seqs · seq_len`.
    pub fn tokens_per_step(&self) -> u64 {
        self.train.batch_seqs as u64 * self.model.seq_len as u64
    }

    /// Tokens the budget trains on: `steps · tokens_per_step`.
    pub fn budget_tokens(&self) -> u64 {
        self.train.steps.saturating_mul(self.tokens_per_step())
    }

    /// The runtime settings.
    pub fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            backend: self.backend.clone(),
            threads: self.threads,
            seed: self.seed,
        }
    }

    /// What plugin checks and accounting see of this run.
    pub fn check_ctx(&self) -> CheckCtx {
        CheckCtx {
            num_recursions: self.recursion.num_recursions,
            seq_len: self.model.seq_len,
            hidden_size: self.model.hidden_size,
            router: self.router.as_ref().map(|r| r.kind.clone()),
            sharing: self.recursion.sharing.kind.clone(),
        }
    }

    /// The source TOML, to save next to a run (`config.toml`); it resolves to this config.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(&self.source).unwrap_or_else(|_| self.source.to_string())
    }

    /// The resolved config as pretty JSON (`config.json`).
    ///
    /// # Errors
    /// Only if a plugin parameter cannot be represented in JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

/// Entry points of config resolution.
#[derive(Debug, Clone, Copy)]
pub struct Config;

impl Config {
    /// Parses TOML text into a table.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) with the syntax error and its line.
    pub fn parse_table(text: &str) -> crate::Result<toml::Table> {
        text.parse::<toml::Table>().map_err(|e| {
            crate::Error::Config(vec![crate::error::ConfigProblem {
                field: "(toml syntax)".to_string(),
                value: e
                    .span()
                    .map(|s| format!("at byte {}", s.start))
                    .unwrap_or_default(),
                allowed: e.message().trim().to_string(),
            }])
        })
    }

    /// Resolves TOML text.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) listing every problem found.
    ///
    /// # Examples
    /// ```
    /// let err = mor_core::config::Config::from_toml_str("[model]\npreset = \"tiny\"\nhiden_size = 4").unwrap_err();
    /// assert!(err.to_string().contains("model.hiden_size"));
    /// ```
    pub fn from_toml_str(text: &str) -> crate::Result<ResolvedConfig> {
        Self::from_table(Self::parse_table(text)?)
    }

    /// Reads and resolves a TOML file.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the file cannot be read; otherwise as
    /// [`Config::from_toml_str`].
    pub fn from_path(path: &Path) -> crate::Result<ResolvedConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Resolves a parsed table (after [`apply_override`]s).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) listing every problem found.
    pub fn from_table(table: toml::Table) -> crate::Result<ResolvedConfig> {
        resolve::resolve(table)
    }
}
