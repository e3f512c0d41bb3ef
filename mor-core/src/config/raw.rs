//! Stage 1 of resolution: serde types that mirror the TOML file section by section.
//!
//! Every field is optional here (defaults and presets are applied in stage 3) and every
//! section denies unknown fields. [`parse_sections`] reads each section on its own and, when
//! serde refuses one, retries its keys one at a time, so every problem is reported with its
//! dotted path (`train.schedule`) and serde's own message (which lists the expected fields
//! or variants). Plugin slots stay raw TOML (`kind` plus parameters) until stage 2.

use crate::error::ConfigProblem;
use crate::plan::DepthFix;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Batching, InitMethod, RouterMetric, Schedule, SpikeAction};

/// The top-level sections a config may have.
pub const SECTIONS: [&str; 10] = [
    "model",
    "recursion",
    "router",
    "kv",
    "runtime",
    "train",
    "data",
    "infer",
    "eval",
    "init",
];

/// `[model]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Named preset (`micro`, `tiny`, `small`, `135m`, `360m`, `730m`, `1.7b`).
    pub preset: Option<String>,
    /// Vocabulary size.
    pub vocab_size: Option<usize>,
    /// Hidden size `d`.
    pub hidden_size: Option<usize>,
    /// Layer count before the depth fix.
    pub num_layers: Option<usize>,
    /// Query heads.
    pub num_heads: Option<usize>,
    /// Key/value heads.
    pub num_kv_heads: Option<usize>,
    /// Head dimension.
    pub head_dim: Option<usize>,
    /// SwiGLU inner size.
    pub intermediate_size: Option<usize>,
    /// Training context length.
    pub seq_len: Option<usize>,
    /// RoPE theta.
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon.
    pub rms_eps: Option<f64>,
    /// Initialisation std.
    pub init_std: Option<f64>,
    /// Tie the LM head to the embedding.
    pub tie_embeddings: Option<bool>,
}

/// `[init]` as written (uptraining, spec §2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInit {
    /// A Hugging Face Llama folder or a vanilla mor run folder.
    pub from: Option<String>,
    /// `stepwise`, `average`, `lower`, `upper` or `random`.
    pub method: Option<InitMethod>,
}

/// `[recursion]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecursion {
    /// `N_r`.
    pub num_recursions: Option<usize>,
    /// Sharing slot: `"name"` or `{ kind = "name", .. }`.
    pub sharing: Option<toml::Value>,
    /// Share the RMSNorm weights of shared blocks.
    pub ln_share: Option<bool>,
    /// Depth fix.
    pub depth_fix: Option<DepthFix>,
    /// Relaxation of the shared weights (spec §6): `{ kind = .., rank, alpha, targets,
    /// prompt_len }`.
    pub relaxation: Option<RawRelaxation>,
}

/// `[recursion] relaxation` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelaxation {
    /// `none`, `lora`, `dora`, `adaption_prompt` or `recursion_encoding`.
    pub kind: Option<String>,
    /// LoRA / DoRA rank.
    pub rank: Option<usize>,
    /// LoRA / DoRA alpha (the low-rank term is scaled by alpha / rank).
    pub alpha: Option<f64>,
    /// Projections that get a LoRA / DoRA: a subset of q_proj, k_proj, v_proj, o_proj.
    pub targets: Option<Vec<String>>,
    /// Adaption-prompt length `P` (required for `adaption_prompt`).
    pub prompt_len: Option<usize>,
}

/// `[runtime]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Backend slot: `"name"` or `{ kind = "name", .. }`.
    pub backend: Option<toml::Value>,
    /// Rayon threads (0 = rayon's choice; at most the available parallelism).
    pub threads: Option<usize>,
    /// Seed of all randomness.
    pub seed: Option<u64>,
}

/// `[train]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    /// `{ steps = n }`, `{ tokens = x }` or `{ flops = x }`.
    pub budget: Option<toml::Value>,
    /// Global batch in sequences.
    pub batch_seqs: Option<usize>,
    /// Micro-batch in sequences.
    pub micro_batch_seqs: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// AdamW betas.
    pub betas: Option<[f64; 2]>,
    /// AdamW epsilon.
    pub eps: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Gradient clipping norm.
    pub grad_clip: Option<f64>,
    /// Learning-rate schedule.
    pub schedule: Option<Schedule>,
    /// `"auto"` or an integer.
    pub warmup_steps: Option<toml::Value>,
    /// FLOPs budget whose step count sets the automatic warmup.
    pub warmup_ref_flops: Option<f64>,
    /// Trapezoid cooldown fraction.
    pub decay_frac: Option<f64>,
    /// Cosine floor as a fraction of the peak.
    pub min_lr_ratio: Option<f64>,
    /// Numeric precision.
    pub precision: Option<String>,
    /// Log every n steps.
    pub log_every: Option<u64>,
    /// Evaluate every n steps (0 = never).
    pub eval_every: Option<u64>,
    /// Checkpoint every n steps (0 = never).
    pub checkpoint_every: Option<u64>,
    /// Loss-spike z-score threshold.
    pub spike_zscore: Option<f64>,
    /// Loss-spike rolling window.
    pub spike_window: Option<usize>,
    /// What a loss spike does.
    pub spike_action: Option<SpikeAction>,
    /// Where the AdamW update is computed: `auto`, `host` or `device`.
    pub update_path: Option<String>,
}

/// `[data]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    /// `"builtin"` or a path.
    pub source: Option<String>,
    /// `auto`, `byte`, `bpe` or a path to `tokenizer.json`.
    pub tokenizer: Option<String>,
    /// Text column of JSONL/Parquet files.
    pub text_column: Option<String>,
    /// Mask attention across document boundaries.
    pub doc_masking: Option<bool>,
    /// Shuffle training rows.
    pub shuffle: Option<bool>,
    /// Fraction held out for validation.
    pub val_fraction: Option<f64>,
    /// Documents in the generated corpus.
    pub builtin_docs: Option<usize>,
}

/// `[infer]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInfer {
    /// Batch size.
    pub batch_size: Option<usize>,
    /// Batch-size rule.
    pub batching: Option<Batching>,
    /// Requests to generate.
    pub num_requests: Option<usize>,
    /// Mean generation length.
    pub gen_len_mean: Option<usize>,
    /// Std of the generation length.
    pub gen_len_std: Option<f64>,
    /// Continuous depth-wise batching.
    pub continuous_depthwise: Option<bool>,
    /// `"n_r"` or an integer.
    pub max_depth: Option<toml::Value>,
    /// Router threshold of the causal rule.
    pub threshold: Option<f64>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Top-k sampling (0 = off).
    pub top_k: Option<usize>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
}

/// `[eval]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEval {
    /// lm-eval-style JSONL task files.
    pub tasks: Option<Vec<String>>,
    /// At most this many validation batches (default: no limit beyond `max_tokens`).
    pub max_batches: Option<usize>,
    /// At most this many predicted validation tokens per evaluation (default 1,048,576).
    pub max_tokens: Option<usize>,
    /// Evaluate with the causal routing rule.
    pub causal: Option<bool>,
    /// Evaluate with the full-sequence top-k.
    pub full_sequence: Option<bool>,
    /// Router metrics to report.
    pub router_metrics: Option<Vec<RouterMetric>>,
}

/// A plugin slot as written: its kind and the remaining keys as parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSlot {
    /// Dotted path of the slot (`router`, `recursion.sharing`).
    pub path: String,
    /// The `kind`.
    pub kind: String,
    /// Everything but `kind`.
    pub params: toml::Table,
}

/// The whole file after stage 1.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawConfig {
    /// `[model]`.
    pub model: RawModel,
    /// `[recursion]`.
    pub recursion: RawRecursion,
    /// `[router]`, if present.
    pub router: Option<RawSlot>,
    /// `[kv]`, if present.
    pub kv: Option<RawSlot>,
    /// `[runtime]`.
    pub runtime: RawRuntime,
    /// `[train]`.
    pub train: RawTrain,
    /// `[data]`.
    pub data: RawData,
    /// `[infer]`.
    pub infer: RawInfer,
    /// `[eval]`.
    pub eval: RawEval,
    /// `[init]`, if present.
    pub init: Option<RawInit>,
}

/// Renders a TOML value for a message, shortened to about 80 characters.
pub(crate) fn render(v: &toml::Value) -> String {
    let s = match v {
        toml::Value::Table(t) => format!(
            "{{ {} }}",
            t.iter()
                .map(|(k, v)| format!("{k} = {}", render(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    };
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn de<T: DeserializeOwned>(v: toml::Value) -> Result<T, String> {
    T::deserialize(v).map_err(|e| e.message().trim().to_string())
}

/// Deserializes `table` into `T`; on failure, finds the offending keys by retrying them one
/// at a time, reports each as `<path>.<key>`, and returns `T` read from the other keys (so
/// one bad key does not hide the rest of the section from later checks).
pub(crate) fn typed_table<T: DeserializeOwned>(
    path: &str,
    table: &toml::Table,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    let full = match de::<T>(toml::Value::Table(table.clone())) {
        Ok(t) => return Some(t),
        Err(msg) => msg,
    };
    let mut good = toml::Table::new();
    let mut found = false;
    for (k, v) in table {
        let mut one = toml::Table::new();
        one.insert(k.clone(), v.clone());
        match de::<T>(toml::Value::Table(one)) {
            Err(msg) if !msg.starts_with("missing field") => {
                found = true;
                problems.push(ConfigProblem {
                    field: join(path, k),
                    value: render(v),
                    allowed: msg,
                });
            }
            _ => {
                good.insert(k.clone(), v.clone());
            }
        }
    }
    if !found {
        problems.push(ConfigProblem {
            field: path.to_string(),
            value: render(&toml::Value::Table(table.clone())),
            allowed: full,
        });
        return None;
    }
    de::<T>(toml::Value::Table(good)).ok()
}

/// `a` + `.` + `b`, or `b` alone at the root.
pub(crate) fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}.{b}")
    }
}

fn section<T: DeserializeOwned + Default>(
    root: &toml::Table,
    name: &str,
    problems: &mut Vec<ConfigProblem>,
) -> T {
    match root.get(name) {
        None => T::default(),
        Some(toml::Value::Table(t)) => typed_table(name, t, problems).unwrap_or_default(),
        Some(other) => {
            problems.push(ConfigProblem {
                field: name.to_string(),
                value: render(other),
                allowed: format!("a table: write `[{name}]` followed by its keys"),
            });
            T::default()
        }
    }
}

/// Reads a plugin slot: a string is shorthand for `{ kind = "<string>" }`; a table needs a
/// string `kind`, and its other keys are the plugin's parameters.
pub(crate) fn slot(
    path: &str,
    value: &toml::Value,
    problems: &mut Vec<ConfigProblem>,
) -> Option<RawSlot> {
    match value {
        toml::Value::String(kind) => Some(RawSlot {
            path: path.to_string(),
            kind: kind.clone(),
            params: toml::Table::new(),
        }),
        toml::Value::Table(t) => {
            let mut params = t.clone();
            match params.remove("kind") {
                Some(toml::Value::String(kind)) => Some(RawSlot {
                    path: path.to_string(),
                    kind,
                    params,
                }),
                Some(other) => {
                    problems.push(ConfigProblem {
                        field: join(path, "kind"),
                        value: render(&other),
                        allowed: "a string naming a registered plugin (see `cargo xtask list`)"
                            .to_string(),
                    });
                    None
                }
                None => {
                    problems.push(ConfigProblem {
                        field: join(path, "kind"),
                        value: "(missing)".to_string(),
                        allowed:
                            "every plugin slot needs `kind = \"<name>\"` (see `cargo xtask list`)"
                                .to_string(),
                    });
                    None
                }
            }
        }
        other => {
            problems.push(ConfigProblem {
                field: path.to_string(),
                value: render(other),
                allowed: "a plugin name or a table `{ kind = \"<name>\", <params> }`".to_string(),
            });
            None
        }
    }
}

/// Stage 1: reads every section of `root`, collecting problems instead of stopping at the
/// first.
pub fn parse_sections(root: &toml::Table) -> (RawConfig, Vec<ConfigProblem>) {
    let mut problems = Vec::new();
    for (k, v) in root {
        if !SECTIONS.contains(&k.as_str()) {
            problems.push(ConfigProblem {
                field: k.clone(),
                value: render(v),
                allowed: format!(
                    "unknown section; expected one of {}",
                    SECTIONS.map(|s| format!("`{s}`")).join(", ")
                ),
            });
        }
    }
    let raw = RawConfig {
        model: section(root, "model", &mut problems),
        recursion: section(root, "recursion", &mut problems),
        router: root
            .get("router")
            .and_then(|v| slot("router", v, &mut problems)),
        kv: root.get("kv").and_then(|v| slot("kv", v, &mut problems)),
        runtime: section(root, "runtime", &mut problems),
        train: section(root, "train", &mut problems),
        data: section(root, "data", &mut problems),
        infer: section(root, "infer", &mut problems),
        eval: section(root, "eval", &mut problems),
        init: root
            .contains_key("init")
            .then(|| section(root, "init", &mut problems)),
    };
    (raw, problems)
}
