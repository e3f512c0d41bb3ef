//! Helpers shared by the `mor-models` integration tests: micro model configs, random
//! token ids, temporary folders and the Hugging Face fixture. Each test file uses some of
//! them.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use mor_core::config::{Config, ResolvedConfig};

/// The `[train]` keys of a config that is built rather than trained: one step of two
/// sequences.
pub const ONE_STEP: &str = "budget = { steps = 1 }\nbatch_seqs = 2\nmicro_batch_seqs = 2";

/// The `[recursion]` table of the MoR models: three recursions, Middle-Cycle sharing.
pub const MOR_RECURSION: &str =
    "[recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }";

/// The `[recursion]` keys of a vanilla model: one pass, no sharing.
pub const VANILLA: &str = "num_recursions = 1\nsharing = { kind = \"none\" }";

/// A micro model config: `hidden` wide with 4 heads (2 K/V heads) of `hidden / 4` and an
/// MLP of `3·hidden / 2`, `layers` layers, `vocab` ids, context `seq_len`; the other tables
/// as given.
#[derive(Clone, Copy, Debug)]
pub struct Micro<'a> {
    /// `model.vocab_size`.
    pub vocab: usize,
    /// `model.hidden_size`.
    pub hidden: usize,
    /// `model.num_layers`.
    pub layers: usize,
    /// `model.seq_len`.
    pub seq_len: usize,
    /// Further `[model]` keys.
    pub model: &'a str,
    /// The `[runtime]` keys (no table when empty).
    pub runtime: &'a str,
    /// The `[train]` keys.
    pub train: &'a str,
    /// Whole tables after `[train]` (`[recursion]`, `[router]`, `[kv]`, `[data]`, …).
    pub tables: &'a str,
}

/// A [`Micro`] config with no runtime keys, [`ONE_STEP`] training and no other tables.
pub const fn micro(vocab: usize, hidden: usize, layers: usize, seq_len: usize) -> Micro<'static> {
    Micro {
        vocab,
        hidden,
        layers,
        seq_len,
        model: "",
        runtime: "",
        train: ONE_STEP,
        tables: "",
    }
}

impl Micro<'_> {
    /// The config's TOML text.
    pub fn toml(&self) -> String {
        let Micro {
            vocab,
            hidden,
            layers,
            seq_len,
            model,
            runtime,
            train,
            tables,
        } = *self;
        let (head_dim, intermediate) = (hidden / 4, hidden * 3 / 2);
        let runtime = if runtime.is_empty() {
            String::new()
        } else {
            format!("[runtime]\n{runtime}\n")
        };
        format!(
            r#"
[model]
preset = "micro"
vocab_size = {vocab}
hidden_size = {hidden}
num_heads = 4
num_kv_heads = 2
head_dim = {head_dim}
intermediate_size = {intermediate}
num_layers = {layers}
seq_len = {seq_len}
{model}
{runtime}[train]
{train}
{tables}
"#
        )
    }

    /// The resolved config, or the resolution error as text.
    pub fn try_resolve(&self) -> Result<ResolvedConfig, String> {
        Config::from_toml_str(&self.toml()).map_err(|e| e.to_string())
    }

    /// The resolved config; panics with the error and the text.
    pub fn resolve(&self) -> ResolvedConfig {
        let text = self.toml();
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

/// `[runtime]` keys: the backend `backend` and the seed `seed`.
pub fn runtime(backend: &str, seed: u64) -> String {
    format!("backend = {{ kind = \"{backend}\" }}\nseed = {seed}")
}

/// `n` token ids below `vocab`, drawn from `Rng::new(seed)`.
pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = mor_core::rng::Rng::new(seed);
    (0..n).map(|_| r.below(vocab) as u32).collect()
}

/// A `[b, t]` CPU tensor of [`random_ids`]`(b·t, vocab, seed)`, row after row.
pub fn id_tensor(b: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    Tensor::from_vec(random_ids(b * t, vocab, seed), (b, t), &Device::Cpu).unwrap()
}

/// A fresh temporary folder `mor-test-{tag}-{pid}`, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates the folder (emptied if it exists).
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mor-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path for a run folder, `mor-run-{tag}-{pid}` under the temporary folder, that does
/// not exist yet (anything left there by an earlier run is removed); the test removes it.
pub fn run_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mor-run-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Run options for a test: `out`, no progress output, label `t`, no evaluation.
pub fn quiet_opts(out: &std::path::Path) -> mor_models::run::RunOptions {
    mor_models::run::RunOptions {
        out: out.to_path_buf(),
        quiet: true,
        label: "t".into(),
        skip_eval: true,
        ..Default::default()
    }
}

/// The tiny Hugging Face Llama fixture made by `python/make_hf_fixture.py`.
pub fn hf_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_tiny")
}

/// `n` greedy requests with prompts of 1-6 random ids below `vocab` and 1-10 new tokens,
/// drawn from `seed`.
pub fn requests(n: usize, vocab: usize, seed: u64) -> Vec<mor_models::engine::Request> {
    let mut r = mor_core::rng::Rng::new(seed);
    (0..n)
        .map(|i| {
            let plen = 1 + r.below(6);
            let gen = 1 + r.below(10);
            mor_models::engine::Request::greedy(random_ids(plen, vocab, seed * 100 + i as u64), gen)
        })
        .collect()
}

/// Vocabulary of [`engine_micro`].
pub const ENGINE_VOCAB: usize = 64;
/// Context of [`engine_micro`].
pub const ENGINE_CONTEXT: usize = 24;

/// The engine tests' micro model: d = 32, 4 heads (2 KV) of 8, 8 layers, context 24,
/// vocabulary 64, `init_std = 0.2` (logits O(1)); `recursion` and `extra` are TOML lines
/// of its `[recursion]` table and after it.
pub fn engine_micro(recursion: &str, extra: &str) -> mor_core::config::ResolvedConfig {
    Micro {
        model: "init_std = 0.2",
        runtime: &runtime("cpu", 5),
        tables: &format!("[recursion]\n{recursion}\n{extra}"),
        ..micro(ENGINE_VOCAB, 32, 8, ENGINE_CONTEXT)
    }
    .resolve()
}

/// [`engine_micro`] as a Middle-Cycle MoR with N_r = 3 and the given `[router]` lines and
/// KV policy.
pub fn engine_mor(router: &str, kv: &str) -> mor_core::config::ResolvedConfig {
    engine_micro(
        "num_recursions = 3\nsharing = { kind = \"middle_cycle\" }",
        &format!("[router]\n{router}\n[kv]\nkind = \"{kv}\""),
    )
}

/// Each request decoded alone with the plain decoder under `opts` (request `i` seeded
/// with `i`): the reference the batched engine must reproduce.
pub fn decode_each(
    model: &mor_models::MorModel,
    reqs: &[mor_models::engine::Request],
    opts: &mor_models::engine::DecodeOptions,
) -> Vec<(Vec<u32>, Vec<u8>)> {
    decode_each_on(model, reqs, opts, false)
}

/// As [`decode_each`], on the decoder's device path (`Decoder::new_device`) when
/// `device`.
pub fn decode_each_on(
    model: &mor_models::MorModel,
    reqs: &[mor_models::engine::Request],
    opts: &mor_models::engine::DecodeOptions,
    device: bool,
) -> Vec<(Vec<u32>, Vec<u8>)> {
    reqs.iter()
        .enumerate()
        .map(|(i, rq)| {
            let mut dec = if device {
                mor_models::engine::Decoder::new_device(model, opts.clone())
            } else {
                mor_models::engine::Decoder::new(model, opts.clone())
            }
            .unwrap();
            dec.generate(
                &rq.prompt,
                rq.max_new_tokens,
                rq.sampling,
                rq.stop_token,
                i as u64,
            )
            .unwrap()
        })
        .collect()
}

/// Runs every request through one engine; asserts that each completes without error and
/// with its prompt, and returns the tokens and depths in submission order with the
/// engine's counters.
pub fn run_engine(
    model: &mor_models::MorModel,
    reqs: &[mor_models::engine::Request],
    ecfg: mor_models::engine::EngineConfig,
) -> (Vec<(Vec<u32>, Vec<u8>)>, mor_models::engine::EngineStats) {
    let mut engine = mor_models::engine::Engine::new(model, ecfg).unwrap();
    for rq in reqs {
        engine.submit(rq.clone()).unwrap();
    }
    let done = engine.run_to_completion().unwrap();
    assert_eq!(done.len(), reqs.len());
    for (c, rq) in done.iter().zip(reqs) {
        assert!(
            !matches!(c.finish, mor_models::engine::FinishReason::Error(_)),
            "request {} failed: {:?}",
            c.id,
            c.finish
        );
        assert_eq!(c.prompt_len, rq.prompt.len());
    }
    (
        done.into_iter().map(|c| (c.tokens, c.depths)).collect(),
        engine.stats().clone(),
    )
}

/// The f64 RMSNorm of one vector, `x / sqrt(mean(x²) + eps) ⊙ w`, for naive references.
pub fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * r * b).collect()
}

/// The f64 RoPE (Hugging Face's rotate-half layout) of one head vector at position `p`,
/// for naive references.
pub fn rope(x: &[f64], p: usize, theta: f64) -> Vec<f64> {
    let dh = x.len();
    let half = dh / 2;
    let mut out = vec![0.0; dh];
    for i in 0..half {
        let inv = 1.0 / theta.powf((2 * i) as f64 / dh as f64);
        let (s, c) = ((p as f64) * inv).sin_cos();
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
    }
    out
}

/// The values of `key` in a run folder's `metrics.jsonl`, one per logged step.
pub fn metric(out: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Every tensor of a run folder's `model.safetensors`, flattened, sorted by name.
pub fn weights(out: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<_> = t
        .into_iter()
        .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Every file under `dir` (recursively, path relative to `dir`) with its bytes: a folder
/// compared before and after a command that must change nothing.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        d: &std::path::Path,
        out: &mut std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
    ) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}
