//! `cargo xtask gpu-check [--full] [--out FILE]`: on a machine with an NVIDIA GPU, checks
//! every CUDA kernel against its CPU body (f32 and bf16 tolerances; flash attention and the
//! chunked LM-head cross-entropy forward and backward, AdamW bit for bit), times each fused
//! kernel against the same computation in plain candle CUDA ops (flash attention at
//! L = 2048), and checks that attention's peak memory grows linearly in L; writes the
//! results as JSON. `--full` adds, within an 8-minute budget, a 30-step training run of the `small`
//! preset MoR-E (N_r = 3) on `cuda` against the same run on `cpu`, its training tokens/s
//! and model FLOP utilisation, host syncs per step, peak device memory, `bench infer` on
//! the GPU, and the same training comparison in bf16 mixed precision (`train.precision =
//! "bf16"` on both backends); a part that cannot run yet is recorded as `unsupported`
//! with the reason.
//! Needs a build with `--features cuda` (`cargo run --release -p xtask --features cuda --
//! gpu-check --full`); see `docs/cuda.md`.

use anyhow::Context;
use mor_core::config::Config;
use mor_kernels::cuda::PeakMemory;
use mor_kernels::host_sync::Scope;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Flags of `gpu-check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the JSON report.
    #[arg(long, default_value = "runs/gpu-check.json")]
    out: PathBuf,
    /// Also train on the GPU against the CPU, measure throughput, MFU, host syncs and peak
    /// memory, and run `bench infer` on the GPU (at most 8 minutes in all).
    #[arg(long)]
    full: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    ordinal: usize,
}

/// The version of the `--full` report layout.
pub const SCHEMA: &str = "mor-gpu-check/1";
/// The overall time budget of `--full`.
pub const FULL_BUDGET: Duration = Duration::from_secs(8 * 60);
/// Time `--full` keeps for the kernel section (it is skipped with less left).
pub const KERNELS_RESERVE: Duration = Duration::from_secs(20);
/// Time `--full` keeps for each training section (f32, then bf16).
pub const TRAINING_RESERVE: Duration = Duration::from_secs(150);
/// Time `--full` keeps for `bench_infer` (exactness, calibration and the timed runs of
/// four models at two batch settings). The reserves sum to at most [`FULL_BUDGET`].
pub const BENCH_INFER_RESERVE: Duration = Duration::from_secs(150);
/// Optimiser steps of each training run of `--full`.
pub const TRAIN_STEPS: usize = 30;
/// Largest `|loss_cuda − loss_cpu|` per step, relative to the CPU loss, of the f32 runs
/// (reduction order and atomics differ, so the curves agree to rounding, not bits).
pub const LOSS_RTOL_F32: f64 = 1e-3;
/// Largest per-step relative difference of the bf16 runs (`cuda` against `cpu`, both
/// `train.precision = "bf16"`). The backends round differently (cuBLAS rounds each
/// product's result to bf16, the `cpu` backend keeps it in f32), so the curves agree to
/// the normwise bf16 tolerance of the kernels' tests, not to f32 rounding.
pub const LOSS_RTOL_BF16: f64 = 2e-2;

/// Runs `gpu-check`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    if !mor_kernels::cuda::COMPILED {
        // The same message as `backend.kind = "cuda"` in such a build; nothing is written.
        anyhow::bail!("gpu-check: {}", mor_kernels::NOT_COMPILED_MESSAGE);
    }
    if args.full {
        return run_full(args);
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let report = mor_kernels::cuda::gpu_check(&args.out)?;
    println!("{}", report.to_json());
    if !report.passed() {
        anyhow::bail!(
            "some kernels disagree with the CPU reference; see {}",
            args.out.display()
        );
    }
    println!(
        "all kernels match the CPU reference; report: {}",
        args.out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The report: sections with a status each, written atomically.

/// The time left of an overall budget.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    start: Instant,
    total: Duration,
}

impl Budget {
    /// A budget of `total` from now.
    pub fn new(total: Duration) -> Self {
        Budget {
            start: Instant::now(),
            total,
        }
    }

    /// Time left.
    pub fn remaining(&self) -> Duration {
        self.total.saturating_sub(self.start.elapsed())
    }

    /// Seconds since the start.
    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// What a section of the report says when it did not run to completion.
#[derive(Debug)]
pub enum NotRun {
    /// Not implemented on CUDA yet: the reason, and what the section would measure.
    Unsupported(String),
    /// It ran and failed.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for NotRun {
    fn from(e: anyhow::Error) -> Self {
        NotRun::Failed(e)
    }
}

/// Runs one section within the budget: `{"status": "ok", ..fields}` when `f` succeeds,
/// `{"status": "unsupported", "reason"}`, `{"status": "failed", "error"}` (also for a
/// panic), or `{"status": "skipped", "reason"}` when less than `needs` of the budget is
/// left. Never panics.
pub fn section(
    budget: &Budget,
    needs: Duration,
    f: impl FnOnce(&Budget) -> Result<Map<String, Value>, NotRun>,
) -> Value {
    let left = budget.remaining();
    if left < needs {
        return json!({
            "status": "skipped",
            "reason": format!(
                "the {:.0}-second budget had {:.0} s left, this part needs about {:.0} s",
                budget.total.as_secs_f64(),
                left.as_secs_f64(),
                needs.as_secs_f64()
            ),
        });
    }
    let t0 = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(budget)));
    let elapsed = t0.elapsed().as_secs_f64();
    let mut v = match outcome {
        Ok(Ok(mut fields)) => {
            fields.insert("status".into(), json!("ok"));
            fields
        }
        Ok(Err(NotRun::Unsupported(reason))) => {
            let mut m = Map::new();
            m.insert("status".into(), json!("unsupported"));
            m.insert("reason".into(), json!(reason));
            m
        }
        Ok(Err(NotRun::Failed(e))) => {
            let mut m = Map::new();
            m.insert("status".into(), json!("failed"));
            m.insert("error".into(), json!(format!("{e:#}")));
            m
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let mut m = Map::new();
            m.insert("status".into(), json!("failed"));
            m.insert("error".into(), json!(format!("panic: {msg}")));
            m
        }
    };
    v.insert("elapsed_s".into(), json!(elapsed));
    Value::Object(v)
}

/// The whole `--full` report.
#[derive(Debug, Clone, Default)]
pub struct FullReport {
    /// Device name (or the error that kept it from opening).
    pub device: String,
    /// Compute capability, e.g. `"9.0"`.
    pub compute_capability: Option<String>,
    /// The sections in order: `kernels`, `training`, `host_syncs`, `memory`,
    /// `bench_infer`, `training_bf16`.
    pub sections: Vec<(String, Value)>,
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// The budget in seconds.
    pub budget_s: f64,
}

/// The section names of `--full`, in order.
pub const SECTIONS: [&str; 6] = [
    "kernels",
    "training",
    "host_syncs",
    "memory",
    "bench_infer",
    "training_bf16",
];

impl FullReport {
    /// Whether every section that ran is `ok` and passed its own check (`passed` where a
    /// section has one); `unsupported` and `skipped` sections do not fail the report, a
    /// `failed` one does.
    pub fn passed(&self) -> bool {
        !self.sections.is_empty()
            && self.sections.iter().all(|(_, v)| {
                let status = v.get("status").and_then(Value::as_str).unwrap_or("failed");
                status != "failed" && v.get("passed").and_then(Value::as_bool) != Some(false)
            })
    }

    /// The report as JSON: `schema`, `device`, `compute_capability`, `passed`,
    /// `elapsed_s`, `budget_s`, `sections` (an object, in order) and a `summary` of each
    /// section's status.
    pub fn to_json(&self) -> Value {
        let mut sections = Map::new();
        let mut summary = Map::new();
        for (name, v) in &self.sections {
            sections.insert(name.clone(), v.clone());
            summary.insert(
                name.clone(),
                v.get("status").cloned().unwrap_or(json!("failed")),
            );
        }
        json!({
            "schema": SCHEMA,
            "device": self.device,
            "compute_capability": self.compute_capability,
            "passed": self.passed(),
            "elapsed_s": self.elapsed_s,
            "budget_s": self.budget_s,
            "summary": summary,
            "sections": sections,
        })
    }
}

/// Writes `text` to `path` atomically: into a temporary file beside it, then renamed over
/// it, so a reader never sees half a report and an old report is replaced whole or kept.
///
/// # Errors
/// The folder cannot be created or written; the message names the file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

// ---------------------------------------------------------------------------------------
// The parts of `--full`.

/// The run of `--full`: the `small` preset as an expert-choice MoR with N_r = 3
/// (Middle-Cycle sharing, recursion-wise KV), 30 steps on the builtin corpus, no eval,
/// with `train.precision = precision` (`"f32"` or `"bf16"`).
pub fn train_config_toml(backend: &str, ordinal: usize, precision: &str) -> String {
    let backend = if backend == "cuda" {
        format!("{{ kind = \"cuda\", ordinal = {ordinal} }}")
    } else {
        "{ kind = \"cpu\" }".to_string()
    };
    format!(
        r#"[model]
preset = "small"

[recursion]
num_recursions = 3
sharing = {{ kind = "middle_cycle" }}
ln_share = true
depth_fix = "add_layers"

[router]
kind = "expert_choice"

[kv]
kind = "recursion_wise"

[runtime]
backend = {backend}
seed = 0

[train]
precision = "{precision}"
budget = {{ steps = {TRAIN_STEPS} }}
batch_seqs = 8
micro_batch_seqs = 8
lr = 3e-3
schedule = "trapezoid"
warmup_steps = "auto"
log_every = 1
checkpoint_every = {TRAIN_STEPS}

[data]
source = "builtin"
tokenizer = "auto"
builtin_docs = 2000
"#
    )
}

/// Peak dense throughput of known GPUs in FLOP/s, `(f32 without tensor cores, bf16 tensor
/// cores)`, from the vendors' data sheets (SXM parts, dense).
pub fn peak_flops(device_name: &str) -> Option<(f64, f64)> {
    let n = device_name.to_ascii_uppercase();
    [
        ("H200", (67e12, 989e12)),
        ("H100", (67e12, 989e12)),
        ("A100", (19.5e12, 312e12)),
        ("L40S", (91.6e12, 362e12)),
    ]
    .into_iter()
    .find(|(k, _)| n.contains(k))
    .map(|(_, v)| v)
}

/// One training run's measurements.
struct TrainRun {
    losses: Vec<f64>,
    tokens_per_sec: f64,
    flops_per_token: f64,
    host_reads: u64,
    device_to_host: u64,
    peak_used_bytes: Option<u64>,
}

fn train_once(
    backend: &str,
    precision: &str,
    ordinal: usize,
    dir: &Path,
    sampler: Option<PeakMemory>,
) -> anyhow::Result<TrainRun> {
    let text = train_config_toml(backend, ordinal, precision);
    let cfg = Config::from_table(Config::parse_table(&text)?)?;
    let opts = mor_models::run::RunOptions {
        out: dir.join(format!("{backend}-{precision}")),
        data: None,
        resume: false,
        quiet: true,
        label: format!("gpu-check-{backend}-{precision}"),
        stop_after: None,
        skip_eval: true,
    };
    let scope = Scope::start();
    let outcome = mor_models::run::run(&cfg, &opts.label, &opts);
    let syncs = scope.counts();
    let peak = sampler.and_then(PeakMemory::finish);
    let outcome = outcome.with_context(|| format!("training on {backend} in {precision}"))?;
    Ok(TrainRun {
        losses: outcome.curve.points.iter().map(|p| p.loss).collect(),
        tokens_per_sec: outcome.summary.train_tokens_per_sec,
        flops_per_token: outcome.summary.flops_per_token,
        host_reads: syncs.reads,
        device_to_host: syncs.device_to_host,
        peak_used_bytes: peak,
    })
}

/// Compares two loss curves step by step: `(max relative difference, passed)`.
pub fn compare_losses(cpu: &[f64], gpu: &[f64], rtol: f64) -> (f64, bool) {
    let mut worst = 0f64;
    for (a, b) in cpu.iter().zip(gpu) {
        let rel = (a - b).abs() / a.abs().max(1e-12);
        worst = worst.max(if rel.is_nan() { f64::INFINITY } else { rel });
    }
    (
        worst,
        cpu.len() == gpu.len() && !cpu.is_empty() && worst <= rtol,
    )
}

fn run_full(args: &Args) -> anyhow::Result<()> {
    let budget = Budget::new(FULL_BUDGET);
    let mut report = FullReport {
        budget_s: FULL_BUDGET.as_secs_f64(),
        ..Default::default()
    };
    let device = mor_kernels::cuda::open_device(args.ordinal);
    match &device {
        Ok(d) => {
            if let Some((name, (a, b))) = mor_kernels::cuda::device_info(d) {
                report.device = name;
                report.compute_capability = Some(format!("{a}.{b}"));
            }
        }
        Err(e) => report.device = format!("none: {e}"),
    }
    let device = device.ok();
    let need_device = || {
        device.clone().ok_or_else(|| {
            NotRun::Failed(anyhow::anyhow!(
                "CUDA device {} could not be opened (see `device`)",
                args.ordinal
            ))
        })
    };

    // 1. Every kernel against its CPU body, and the kernel benchmarks (seconds).
    let kernels_path = sibling(&args.out, "kernels.json");
    let kernels = section(&budget, KERNELS_RESERVE, |_| {
        need_device()?;
        let r = mor_kernels::cuda::gpu_check(&kernels_path).map_err(anyhow::Error::from)?;
        let _ = std::fs::remove_file(&kernels_path);
        let mut v: Map<String, Value> =
            serde_json::from_str(&r.to_json()).context("the kernel report is not JSON")?;
        v.insert("passed".into(), json!(r.passed()));
        Ok(v)
    });
    report.sections.push((SECTIONS[0].into(), kernels));

    // 2. The same 30-step run on cuda and on cpu.
    let runs_dir = sibling(&args.out, "runs");
    let mut gpu_run: Option<TrainRun> = None;
    let training = section(&budget, TRAINING_RESERVE, |_| {
        let dev = need_device()?;
        let _ = std::fs::remove_dir_all(&runs_dir);
        // The cuda run first: when it cannot run, the cpu run is not spent.
        let sampler = PeakMemory::start(&dev, Duration::from_millis(50));
        let gpu = train_once("cuda", "f32", args.ordinal, &runs_dir, Some(sampler))?;
        let cpu = train_once("cpu", "f32", args.ordinal, &runs_dir, None)?;
        let (worst, passed) = compare_losses(&cpu.losses, &gpu.losses, LOSS_RTOL_F32);
        let mut m = Map::new();
        m.insert(
            "model".into(),
            json!("small preset, MoR-E N_r = 3, Middle-Cycle, f32"),
        );
        m.insert("steps".into(), json!(TRAIN_STEPS));
        m.insert("loss_cpu".into(), json!(cpu.losses));
        m.insert("loss_cuda".into(), json!(gpu.losses));
        m.insert("max_rel_loss_diff".into(), json!(worst));
        m.insert("loss_rtol".into(), json!(LOSS_RTOL_F32));
        m.insert("passed".into(), json!(passed));
        m.insert("tokens_per_sec_cpu".into(), json!(cpu.tokens_per_sec));
        m.insert("tokens_per_sec_cuda".into(), json!(gpu.tokens_per_sec));
        m.insert("flops_per_token".into(), json!(gpu.flops_per_token));
        let achieved = gpu.flops_per_token * gpu.tokens_per_sec;
        m.insert("model_flops_per_sec".into(), json!(achieved));
        match peak_flops(&report.device) {
            Some((f32_peak, _)) => {
                m.insert("peak_flops_f32".into(), json!(f32_peak));
                m.insert("mfu".into(), json!(achieved / f32_peak));
            }
            None => {
                m.insert("mfu".into(), Value::Null);
                m.insert(
                    "mfu_reason".into(),
                    json!(format!("no peak FLOP/s known for `{}`", report.device)),
                );
            }
        }
        gpu_run = Some(gpu);
        Ok(m)
    });
    report.sections.push((SECTIONS[1].into(), training));
    let _ = std::fs::remove_dir_all(&runs_dir);

    // 3. Host syncs per optimiser step of the cuda run.
    let host_syncs = section(&budget, Duration::ZERO, |_| {
        let Some(g) = &gpu_run else {
            return Err(NotRun::Unsupported(
                "no cuda training run completed (see `training`)".into(),
            ));
        };
        let mut m = Map::new();
        m.insert("steps".into(), json!(TRAIN_STEPS));
        m.insert("host_reads".into(), json!(g.host_reads));
        m.insert("device_to_host".into(), json!(g.device_to_host));
        m.insert(
            "device_to_host_per_step".into(),
            json!(g.device_to_host as f64 / TRAIN_STEPS as f64),
        );
        m.insert(
            "counts".into(),
            json!("reads made through mor_kernels::host_sync on the training thread"),
        );
        Ok(m)
    });
    report.sections.push((SECTIONS[2].into(), host_syncs));

    // 4. Peak device memory of the model's run.
    let memory = section(&budget, Duration::ZERO, |_| {
        let Some(peak) = gpu_run.as_ref().and_then(|g| g.peak_used_bytes) else {
            return Err(NotRun::Unsupported(
                "no cuda training run completed, or the driver did not report memory".into(),
            ));
        };
        let mut m = Map::new();
        m.insert(
            "model".into(),
            json!("small preset, MoR-E N_r = 3 (training, f32)"),
        );
        m.insert("peak_used_bytes".into(), json!(peak));
        m.insert(
            "method".into(),
            json!("whole-device used memory (total − free), sampled every 50 ms"),
        );
        Ok(m)
    });
    report.sections.push((SECTIONS[3].into(), memory));

    // 5. `bench infer` on the GPU (the engine's device path). Two parts, each caught on
    // its own (an error or panic in one leaves the other's numbers in the report).
    let bench = section(&budget, BENCH_INFER_RESERVE, |_| {
        let _ = need_device()?;
        Ok(bench_infer_section(
            || decode_exactness("cuda"),
            || {
                mor_bench::infer::run(&bench_infer_config(), &mut |line| {
                    eprintln!("bench infer: {line}")
                })
                .map_err(anyhow::Error::from)
            },
        ))
    });
    report.sections.push((SECTIONS[4].into(), bench));

    // 6. The training comparison in bf16 mixed precision.
    let f32_curve = gpu_run.as_ref().map(|g| g.losses.clone());
    let training_bf16 = section(&budget, TRAINING_RESERVE, |_| {
        let _ = need_device()?;
        let _ = std::fs::remove_dir_all(&runs_dir);
        let gpu = train_once("cuda", "bf16", args.ordinal, &runs_dir, None)?;
        let cpu = train_once("cpu", "bf16", args.ordinal, &runs_dir, None)?;
        Ok(bf16_training_section(
            &cpu,
            &gpu,
            f32_curve.as_deref(),
            &report.device,
        ))
    });
    report.sections.push((SECTIONS[5].into(), training_bf16));
    let _ = std::fs::remove_dir_all(&runs_dir);

    report.elapsed_s = budget.elapsed_s();
    let text = serde_json::to_string_pretty(&report.to_json())?;
    write_atomic(&args.out, &text)?;
    println!("{text}");
    if !report.passed() {
        anyhow::bail!(
            "gpu-check --full: a part failed; see {}",
            args.out.display()
        );
    }
    println!("gpu-check --full: report {}", args.out.display());
    Ok(())
}

/// Largest difference of the device path's f32 logits (on `backend`) from the host path's
/// (on the CPU, the same weights), relative to the logits' scale.
pub const DECODE_LOGIT_RTOL: f64 = 1e-3;
/// The same with bf16 weights and bf16 K/V on both paths (the device path also rounds each
/// layer product's output, the queries and the attention output to bf16): a few percent of
/// the logits' scale, not O(1) as a wrong product or KV row would give.
pub const DECODE_LOGIT_RTOL_BF16: f64 = 5e-2;
/// Largest gate difference of the device engine's routing decisions from the host
/// engine's (f32).
pub const DECODE_GATE_TOL: f64 = 1e-5;

/// Runs `f`, catching an error or a panic: its fields plus `elapsed_s`, or
/// `{"passed": false, "error": ...}`.
fn part(f: impl FnOnce() -> anyhow::Result<Map<String, Value>>) -> Map<String, Value> {
    let t0 = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let mut m = match outcome {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let mut m = Map::new();
            m.insert("passed".into(), json!(false));
            m.insert("error".into(), json!(format!("{e:#}")));
            m
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let mut m = Map::new();
            m.insert("passed".into(), json!(false));
            m.insert("error".into(), json!(format!("panic: {msg}")));
            m
        }
    };
    m.insert("elapsed_s".into(), json!(t0.elapsed().as_secs_f64()));
    m
}

/// The `bench_infer` section from its two parts, each run and caught on its own: the
/// exactness check (under `exactness`) and the bench (its [`bench_infer_fields`] at the top
/// level, or `passed: false` and `error`). `passed` when both passed; `reserved_s` is the
/// time the section keeps inside the budget, `elapsed_s` (of the section, added by
/// [`section`]) what it took.
pub fn bench_infer_section(
    exactness: impl FnOnce() -> anyhow::Result<Map<String, Value>>,
    bench: impl FnOnce() -> anyhow::Result<mor_bench::infer::InferBenchReport>,
) -> Map<String, Value> {
    let exact = part(exactness);
    let mut m = part(|| bench().map(|r| bench_infer_fields(&r)));
    let passed = exact.get("passed") == Some(&json!(true)) && m.get("passed") == Some(&json!(true));
    if let Some(t) = m.remove("elapsed_s") {
        m.insert("bench_elapsed_s".into(), t);
    }
    m.insert("exactness".into(), Value::Object(exact));
    m.insert(
        "reserved_s".into(),
        json!(BENCH_INFER_RESERVE.as_secs_f64()),
    );
    m.insert("passed".into(), json!(passed));
    m
}

/// Largest `|a − b|` and largest `|b|` over two logit rows.
fn gap_and_scale(a: &[f32], b: &[f32], (gap, scale): (f64, f64)) -> (f64, f64) {
    a.iter().zip(b).fold((gap, scale), |(g, s), (x, y)| {
        (g.max((x - y).abs() as f64), s.max(y.abs() as f64))
    })
}

/// The engine's device path on `backend` (`cuda`, or `cpu` in the tests) for a micro
/// expert-choice MoR (N_r = 3, recursion-wise KV), against the host path on the CPU with the
/// same weights, every check caught on its own:
/// - `logit_max_abs_diff`: f32 logits of a teacher-forced sequence (against
///   [`DECODE_LOGIT_RTOL`] of the logits' scale);
/// - `bf16`: the same with bf16 weights and bf16 K/V on both paths
///   ([`DECODE_LOGIT_RTOL_BF16`]);
/// - `gate_thresholds`: the engine with `ExitRule::GateThresholds(-inf)` and the gate trace
///   (the exit rule and router mode `bench infer` runs): gates within [`DECODE_GATE_TOL`]
///   of the host engine's, and the same tokens;
/// - `batched_equals_sequential`: the batched device engine (B = 4 and 8, blocks of 4
///   tokens) generates the greedy tokens of decoding each request alone on the device
///   path; `batched_logit_max_abs_diff` is the largest difference of its logits from a
///   one-request engine's at the same positions (0 expected: the device path's products
///   have one fixed height; a gap at rounding level would mean the BLAS rounded a row
///   differently, a token mismatch with a larger gap a misplaced row).
///
/// `passed` when all hold.
///
/// # Errors
/// The models cannot be built (each check's own error is recorded in its row).
pub fn decode_exactness(backend: &str) -> anyhow::Result<Map<String, Value>> {
    use mor_models::engine::{
        DecodeOptions, Decoder, Engine, EngineConfig, ExitRule, KvPrecision, Precision, Request,
    };
    use mor_models::MorModel;
    use std::collections::HashMap;
    let _ = mor_models::builtin::link();
    let toml = |kind: &str| {
        format!(
            "[model]\npreset = \"micro\"\nnum_layers = 8\nseq_len = 32\ninit_std = 0.2\n\
             [recursion]\nnum_recursions = 3\nsharing = {{ kind = \"middle_cycle\" }}\n\
             [router]\nkind = \"expert_choice\"\n[kv]\nkind = \"recursion_wise\"\n\
             [runtime]\nbackend = {{ kind = \"{kind}\" }}\nseed = 3\n\
             [train]\nbudget = {{ steps = 1 }}\n"
        )
    };
    let model = MorModel::new(&Config::from_toml_str(&toml(backend))?)?;
    let reference = MorModel::new(&Config::from_toml_str(&toml("cpu"))?)?;
    let vocab = model.config().model.vocab_size as u32;
    let base = DecodeOptions {
        block_tokens: 4,
        ..Default::default()
    };
    let mut all_passed = true;
    let mut m = Map::new();
    m.insert(
        "model".into(),
        json!(format!(
            "micro expert-choice MoR, N_r = 3, recursion-wise KV; device path on {backend} \
             against the host path on cpu"
        )),
    );
    // Teacher-forced logits, f32 and bf16.
    let logits = |opts: &DecodeOptions, rtol: f64| -> anyhow::Result<Map<String, Value>> {
        let mut dev = Decoder::new_device(&model, opts.clone())?;
        let mut host = Decoder::new(&reference, opts.clone())?;
        let mut acc = (0f64, 0f64);
        for i in 0..24u32 {
            let t = (i * 7 + 3) % vocab;
            acc = gap_and_scale(&dev.step(t)?.logits, &host.step(t)?.logits, acc);
        }
        let mut r = Map::new();
        r.insert("logit_max_abs_diff".into(), json!(acc.0));
        r.insert("logit_scale".into(), json!(acc.1));
        r.insert("logit_rtol".into(), json!(rtol));
        r.insert("passed".into(), json!(acc.0 <= rtol * acc.1.max(1.0)));
        Ok(r)
    };
    let f32_row = part(|| logits(&base, DECODE_LOGIT_RTOL));
    all_passed &= f32_row.get("passed") == Some(&json!(true));
    for k in ["logit_max_abs_diff", "logit_scale", "logit_rtol", "error"] {
        if let Some(v) = f32_row.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    let bf16_opts = DecodeOptions {
        precision: Precision::Bf16,
        kv_precision: KvPrecision::Bf16,
        ..base.clone()
    };
    let bf16_row = part(|| logits(&bf16_opts, DECODE_LOGIT_RTOL_BF16));
    all_passed &= bf16_row.get("passed") == Some(&json!(true));
    m.insert("bf16".into(), Value::Object(bf16_row));
    // Greedy requests of 1-6 prompt tokens and 4-11 new tokens.
    let reqs: Vec<Request> = (0..8u32)
        .map(|i| {
            let prompt = (0..1 + i % 6)
                .map(|j| (i * 13 + j * 5 + 1) % vocab)
                .collect();
            Request::greedy(prompt, 4 + (i as usize * 3) % 8)
        })
        .collect();
    // Gate thresholds with the gate trace: device engine against the host engine.
    let gates_row = part(|| {
        let ecfg = EngineConfig {
            batch_size: 8,
            block_tokens: 4,
            exit: ExitRule::GateThresholds(vec![f64::NEG_INFINITY; 3]),
            record_gates: true,
            ..Default::default()
        };
        let mut dev = Engine::new_device(&model, ecfg.clone())?;
        let mut host = Engine::new(&reference, ecfg)?;
        let mut outs = Vec::new();
        for e in [&mut dev, &mut host] {
            for rq in &reqs {
                e.submit(rq.clone())?;
            }
            outs.push(
                e.run_to_completion()?
                    .into_iter()
                    .map(|c| (c.id, c.tokens))
                    .collect::<Vec<_>>(),
            );
        }
        let (a, b) = (dev.gate_trace(), host.gate_trace());
        let same_decisions = a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x.id, x.pos, x.step) == (y.id, y.pos, y.step));
        let gap = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x.gate - y.gate).abs() as f64)
            .fold(0f64, f64::max);
        let tokens_equal = outs[0] == outs[1];
        let mut r = Map::new();
        r.insert("decisions".into(), json!(a.len()));
        r.insert("same_decisions".into(), json!(same_decisions));
        r.insert("gate_max_abs_diff".into(), json!(gap));
        r.insert("gate_tol".into(), json!(DECODE_GATE_TOL));
        r.insert("tokens_equal".into(), json!(tokens_equal));
        r.insert(
            "passed".into(),
            json!(same_decisions && !a.is_empty() && gap <= DECODE_GATE_TOL && tokens_equal),
        );
        Ok(r)
    });
    all_passed &= gates_row.get("passed") == Some(&json!(true));
    m.insert("gate_thresholds".into(), Value::Object(gates_row));
    // Batched device engine against each request alone on the device path.
    let batched = part(|| {
        let ecfg = |batch: usize| EngineConfig {
            batch_size: batch,
            block_tokens: 4,
            ..Default::default()
        };
        let mut want = Vec::new();
        let mut alone: HashMap<(u64, u32), Vec<f32>> = HashMap::new();
        for (i, rq) in reqs.iter().enumerate() {
            let mut d = Decoder::new_device(&model, base.clone())?;
            let (tokens, _) = d.generate(
                &rq.prompt,
                rq.max_new_tokens,
                rq.sampling,
                rq.stop_token,
                i as u64,
            )?;
            want.push(tokens);
            // The same request alone in an engine, for its logits.
            let mut e = Engine::new_device(&model, ecfg(1))?;
            e.record_logits(true);
            e.submit(rq.clone())?;
            e.run_to_completion()?;
            for (_, pos, l) in e.logit_trace() {
                alone.insert((i as u64, *pos), l.clone());
            }
        }
        let mut mismatched = Vec::new();
        let mut gap = 0f64;
        for batch in [4usize, 8] {
            let mut e = Engine::new_device(&model, ecfg(batch))?;
            e.record_logits(true);
            for rq in &reqs {
                e.submit(rq.clone())?;
            }
            for c in e.run_to_completion()? {
                if want.get(c.id as usize) != Some(&c.tokens) {
                    mismatched.push(json!({"batch": batch, "request": c.id}));
                }
            }
            for (id, pos, l) in e.logit_trace() {
                if let Some(r) = alone.get(&(*id, *pos)) {
                    gap = gap_and_scale(l, r, (gap, 0.0)).0;
                }
            }
        }
        let mut r = Map::new();
        r.insert(
            "batched_equals_sequential".into(),
            json!(mismatched.is_empty()),
        );
        r.insert("mismatched".into(), Value::Array(mismatched.clone()));
        r.insert("batched_logit_max_abs_diff".into(), json!(gap));
        r.insert("passed".into(), json!(mismatched.is_empty()));
        Ok(r)
    });
    all_passed &= batched.get("passed") == Some(&json!(true));
    for k in [
        "batched_equals_sequential",
        "mismatched",
        "batched_logit_max_abs_diff",
    ] {
        if let Some(v) = batched.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    if let Some(e) = batched.get("error") {
        m.insert("batched_error".into(), e.clone());
        m.insert("batched_equals_sequential".into(), json!(false));
    }
    m.insert("passed".into(), json!(all_passed));
    Ok(m)
}

/// The `bench infer` settings of `--full`: the quick preset's models (vanilla and
/// expert-choice MoR-2/3/4, 8-layer base) on CUDA device 0 through the engine's device path,
/// bf16 weights, B = 32 and the relative-max batch, short runs that fit the budget.
pub fn bench_infer_config() -> mor_bench::infer::InferBenchConfig {
    mor_bench::infer::InferBenchConfig {
        backend: "cuda".into(),
        batch_size: 32,
        relative_max: true,
        // At least twice the largest relative-max batch (about 46 for MoR-4), so every
        // setting fills its batch; short generations keep the section within its reserve.
        requests: 128,
        gen_len_mean: 16.0,
        gen_len_std: 4.0,
        calib_requests: 16,
        calib_passes: 1,
        precisions: vec![mor_core::config::Precision::Bf16],
        recursions: vec![2, 3, 4],
        ..mor_bench::infer::InferBenchConfig::quick()
    }
}

/// The `bench_infer` section of a report: the settings and, per model and batch setting,
/// tokens/s, the ratio over vanilla, K/V bytes per token and its ratio; `passed` when every
/// model generated tokens at a finite, positive rate.
pub fn bench_infer_fields(r: &mor_bench::infer::InferBenchReport) -> Map<String, Value> {
    let c = &r.config;
    let rows: Vec<Value> = r
        .models
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "precision": mor_bench::infer::precision_name(m.precision),
                "setting": m.setting,
                "batch_size": m.batch_size,
                "tokens_per_s": m.tokens_per_s,
                "throughput_ratio_vs_vanilla": m.throughput_ratio_vs_vanilla,
                "steady_tokens_per_s": m.steady_tokens_per_s,
                "steady_throughput_ratio_vs_vanilla": m.steady_throughput_ratio_vs_vanilla,
                "mean_block_occupancy": m.mean_block_occupancy,
                "kv_bytes_per_token": m.kv_bytes_per_token,
                "kv_bytes_ratio_vs_vanilla": m.kv_bytes_ratio_vs_vanilla,
                "depth_distribution": m.depth_distribution,
            })
        })
        .collect();
    let passed = !r.models.is_empty()
        && r.models
            .iter()
            .all(|m| m.tokens > 0 && m.tokens_per_s.is_finite() && m.tokens_per_s > 0.0);
    let mut m = Map::new();
    m.insert(
        "model".into(),
        json!(format!(
            "preset {}, base {} layers, context {}; vanilla and expert-choice MoR-{:?}; \
             backend {} ({})",
            c.preset,
            c.base_layers,
            c.context,
            c.recursions,
            c.backend,
            if c.backend == "cpu" {
                "engine host path"
            } else {
                "engine device path"
            }
        )),
    );
    m.insert("requests".into(), json!(c.requests));
    m.insert("gen_len_mean".into(), json!(c.gen_len_mean));
    m.insert("models".into(), Value::Array(rows));
    m.insert("passed".into(), json!(passed));
    m
}

/// The `training_bf16` section of two bf16 runs: both loss curves and their largest
/// per-step relative difference against [`LOSS_RTOL_BF16`], the cuda run's distance from
/// its f32 curve (when that run completed; for information), tokens/s, and MFU against
/// the device's bf16 tensor-core peak.
fn bf16_training_section(
    cpu: &TrainRun,
    gpu: &TrainRun,
    f32_curve: Option<&[f64]>,
    device: &str,
) -> Map<String, Value> {
    let (worst, passed) = compare_losses(&cpu.losses, &gpu.losses, LOSS_RTOL_BF16);
    let mut m = Map::new();
    m.insert(
        "model".into(),
        json!("small preset, MoR-E N_r = 3, Middle-Cycle, train.precision = bf16"),
    );
    m.insert("steps".into(), json!(TRAIN_STEPS));
    m.insert("loss_cpu".into(), json!(cpu.losses));
    m.insert("loss_cuda".into(), json!(gpu.losses));
    m.insert("max_rel_loss_diff".into(), json!(worst));
    m.insert("loss_rtol".into(), json!(LOSS_RTOL_BF16));
    m.insert("passed".into(), json!(passed));
    if let Some(f) = f32_curve {
        let (d, _) = compare_losses(f, &gpu.losses, f64::INFINITY);
        m.insert("max_rel_diff_to_cuda_f32".into(), json!(d));
    }
    m.insert("tokens_per_sec_cpu".into(), json!(cpu.tokens_per_sec));
    m.insert("tokens_per_sec_cuda".into(), json!(gpu.tokens_per_sec));
    let achieved = gpu.flops_per_token * gpu.tokens_per_sec;
    m.insert("model_flops_per_sec".into(), json!(achieved));
    match peak_flops(device) {
        Some((_, bf16_peak)) => {
            m.insert("peak_flops_bf16".into(), json!(bf16_peak));
            m.insert("mfu".into(), json!(achieved / bf16_peak));
        }
        None => {
            m.insert("mfu".into(), Value::Null);
            m.insert(
                "mfu_reason".into(),
                json!(format!("no peak FLOP/s known for `{device}`")),
            );
        }
    }
    m
}

/// `FILE` → `FILE.<suffix>` beside it (`runs/gpu.json` → `runs/gpu.json.kernels.json`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mor_core::config::Precision;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mor-gpu-check-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn sections_report_ok_unsupported_failed_skipped_and_panics() {
        let budget = Budget::new(Duration::from_secs(60));
        let ok = section(&budget, Duration::ZERO, |_| {
            let mut m = Map::new();
            m.insert("x".into(), json!(3));
            Ok(m)
        });
        assert_eq!(ok["status"], "ok");
        assert_eq!(ok["x"], 3);
        assert!(ok["elapsed_s"].as_f64().unwrap() >= 0.0);
        let un = section(&budget, Duration::ZERO, |_| {
            Err(NotRun::Unsupported("not yet".into()))
        });
        assert_eq!(un["status"], "unsupported");
        assert_eq!(un["reason"], "not yet");
        let failed = section(&budget, Duration::ZERO, |_| {
            Err(anyhow::anyhow!("device mismatch").context("training on cuda"))?
        });
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"], "training on cuda: device mismatch");
        let panicked = section(&budget, Duration::ZERO, |_| panic!("boom {}", 7));
        assert_eq!(panicked["status"], "failed");
        assert_eq!(panicked["error"], "panic: boom 7");
        let skipped = section(&budget, Duration::from_secs(61), |_| {
            panic!("a skipped section must not run")
        });
        assert_eq!(skipped["status"], "skipped");
        assert!(
            skipped["reason"]
                .as_str()
                .unwrap()
                .contains("60-second budget"),
            "{skipped}"
        );
    }

    #[test]
    fn the_report_has_its_schema_and_fails_only_on_failures() {
        let budget = Budget::new(FULL_BUDGET);
        let mut r = FullReport {
            device: "NVIDIA H200".into(),
            compute_capability: Some("9.0".into()),
            budget_s: 480.0,
            ..Default::default()
        };
        assert!(!r.passed(), "an empty report does not pass");
        for name in SECTIONS {
            let v = if name == "bench_infer" {
                section(&budget, Duration::ZERO, |_| {
                    Err(NotRun::Unsupported("cpu only".into()))
                })
            } else {
                section(&budget, Duration::ZERO, |_| {
                    let mut m = Map::new();
                    m.insert("passed".into(), json!(true));
                    Ok(m)
                })
            };
            r.sections.push((name.into(), v));
        }
        let j = r.to_json();
        assert_eq!(j["schema"], SCHEMA);
        assert_eq!(j["passed"], true);
        assert_eq!(j["budget_s"], 480.0);
        assert_eq!(j["compute_capability"], "9.0");
        let names: Vec<&String> = j["sections"].as_object().unwrap().keys().collect();
        assert_eq!(names.len(), SECTIONS.len());
        for name in SECTIONS {
            assert!(j["sections"][name]["status"].is_string(), "{name}");
            assert_eq!(j["summary"][name], j["sections"][name]["status"]);
        }
        assert_eq!(j["summary"]["bench_infer"], "unsupported");
        // A section whose own check fails, or that failed, fails the report.
        r.sections[1].1["passed"] = json!(false);
        assert!(!r.passed());
        r.sections[1].1 = json!({"status": "failed", "error": "x"});
        assert!(!r.passed());
        r.sections[1].1 = json!({"status": "skipped", "reason": "budget"});
        assert!(r.passed());
    }

    #[test]
    fn the_decode_exactness_check_passes_on_the_cpu() {
        let m = decode_exactness("cpu").unwrap();
        assert_eq!(m["passed"], true, "{m:?}");
        assert_eq!(m["batched_equals_sequential"], true);
        let gap = m["logit_max_abs_diff"].as_f64().unwrap();
        assert!(gap < 1e-4, "{gap}");
        assert!(m["logit_scale"].as_f64().unwrap() > 0.1);
        // Batched against one-request logits: rounding only, and compared at all.
        let gap = m["batched_logit_max_abs_diff"].as_f64().unwrap();
        assert!(gap < 1e-4, "{gap}");
        // bf16 weights and K/V: a gap above f32 rounding, within the bf16 tolerance.
        let b = &m["bf16"];
        assert_eq!(b["passed"], true, "{b:?}");
        let gap = b["logit_max_abs_diff"].as_f64().unwrap();
        assert!(
            gap > 1e-5 && gap < 0.05 * b["logit_scale"].as_f64().unwrap(),
            "{gap}"
        );
        // Gate thresholds: every decision recorded on both engines, the same gates.
        let g = &m["gate_thresholds"];
        assert_eq!(g["passed"], true, "{g:?}");
        assert_eq!(
            (g["same_decisions"].clone(), g["tokens_equal"].clone()),
            (json!(true), json!(true))
        );
        assert!(g["decisions"].as_u64().unwrap() > 8);
        assert!(g["gate_max_abs_diff"].as_f64().unwrap() < DECODE_GATE_TOL);
    }

    #[test]
    fn the_bench_infer_config_and_its_rows_at_b32_and_relative_max_on_the_cpu() {
        let c = bench_infer_config();
        assert_eq!(c.backend, "cuda");
        assert_eq!(c.batch_size, 32);
        assert!(c.relative_max);
        assert_eq!(c.recursions, [2, 3, 4]);
        assert!(c.check().is_ok());
        // The relative-max batches are B · (vanilla / MoR K/V bytes per token): about 39,
        // 43 and 46 for MoR-2/3/4, below 1.5 · B. Twice that many requests fill them.
        assert!(c.requests >= 2 * (3 * c.batch_size / 2), "{}", c.requests);
        // The reserves fit the budget.
        let reserved = KERNELS_RESERVE + 2 * TRAINING_RESERVE + BENCH_INFER_RESERVE;
        assert!(reserved <= FULL_BUDGET, "{reserved:?}");
        // The same settings, scaled down, on the CPU: one row per model and setting.
        let tiny = mor_bench::infer::InferBenchConfig {
            backend: "cpu".into(),
            preset: "micro".into(),
            batch_size: 3,
            requests: 4,
            gen_len_mean: 4.0,
            gen_len_std: 1.0,
            warmup_requests: 1,
            base_layers: 5,
            context: 32,
            recursions: vec![2],
            block_tokens: 4,
            ..c
        };
        let r = mor_bench::infer::run(&tiny, &mut |_| {}).unwrap();
        let f = bench_infer_fields(&r);
        assert_eq!(f["passed"], true);
        let rows = f["models"].as_array().unwrap();
        // vanilla and MoR-2, at the fixed and the relative-max batch.
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert!(rows.iter().all(|m| m["precision"] == "bf16"));
        assert!(rows.iter().any(|m| m["name"] == "mor-2"));
        for m in rows {
            let steady = m["steady_tokens_per_s"].as_f64().unwrap();
            assert!(steady.is_finite() && steady > 0.0, "{m}");
            assert!(
                m["steady_throughput_ratio_vs_vanilla"].as_f64().unwrap() > 0.0,
                "{m}"
            );
            // Mean items per shared-block call: at least one, at most the batch.
            let occ = m["mean_block_occupancy"].as_f64().unwrap();
            assert!(
                occ >= 1.0 && occ <= m["batch_size"].as_f64().unwrap(),
                "{m}"
            );
        }
        let label = f["model"].as_str().unwrap();
        assert!(label.contains("backend cpu (engine host path)"), "{label}");
    }

    /// An error in one part of `bench_infer` (or a panic) leaves the other's numbers in the
    /// section; `passed` only when both passed.
    #[test]
    fn each_bench_infer_part_reports_whatever_the_other_does() {
        let tiny = mor_bench::infer::InferBenchConfig {
            backend: "cpu".into(),
            preset: "micro".into(),
            batch_size: 2,
            requests: 3,
            gen_len_mean: 3.0,
            gen_len_std: 1.0,
            warmup_requests: 1,
            base_layers: 5,
            context: 32,
            recursions: vec![2],
            block_tokens: 4,
            relative_max: false,
            calib_requests: 4,
            calib_passes: 1,
            ..bench_infer_config()
        };
        let bench = || mor_bench::infer::run(&tiny, &mut |_| {}).map_err(anyhow::Error::from);
        let ok_exact = || {
            let mut m = Map::new();
            m.insert("passed".into(), json!(true));
            Ok(m)
        };
        // The exactness check fails: the bench's rows are still there.
        let s = bench_infer_section(|| Err(anyhow::anyhow!("no kernel image")), bench);
        assert_eq!(s["passed"], false);
        assert_eq!(s["exactness"]["passed"], false);
        assert!(s["exactness"]["error"]
            .as_str()
            .unwrap()
            .contains("no kernel image"));
        assert_eq!(s["models"].as_array().unwrap().len(), 2, "{s:?}");
        assert!(s["bench_elapsed_s"].as_f64().unwrap() >= 0.0);
        assert_eq!(s["reserved_s"], BENCH_INFER_RESERVE.as_secs_f64());
        // The exactness check panics: the same.
        let s = bench_infer_section(|| panic!("boom"), bench);
        assert!(s["exactness"]["error"].as_str().unwrap().contains("boom"));
        assert_eq!(s["models"].as_array().unwrap().len(), 2);
        // The bench fails: the exactness result is still there.
        let s = bench_infer_section(ok_exact, || Err(anyhow::anyhow!("out of memory")));
        assert_eq!(s["passed"], false);
        assert_eq!(s["exactness"]["passed"], true);
        assert!(s["error"].as_str().unwrap().contains("out of memory"));
        // Both pass.
        let s = bench_infer_section(ok_exact, bench);
        assert_eq!(s["passed"], true, "{s:?}");
    }

    #[test]
    fn the_report_is_written_atomically() {
        let dir = temp_dir("atomic");
        let path = dir.join("sub").join("report.json");
        write_atomic(&path, "{\"a\": 1}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\": 1}");
        write_atomic(&path, "{\"b\": 2}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"b\": 2}");
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.json"]);
        // A path whose folder cannot exist (a file stands there) fails naming it and
        // leaves the old report untouched.
        let blocked = path.join("inner.json");
        let err = write_atomic(&blocked, "{}").unwrap_err();
        assert!(format!("{err:#}").contains("report.json"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"b\": 2}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_training_config_is_the_small_mor_e_with_three_recursions() {
        for backend in ["cpu", "cuda"] {
            let cfg = Config::from_table(
                Config::parse_table(&train_config_toml(backend, 1, "f32")).unwrap(),
            )
            .unwrap();
            let t: toml::Table = toml::from_str(&train_config_toml(backend, 1, "f32")).unwrap();
            assert_eq!(t["model"]["preset"].as_str(), Some("small"));
            assert_eq!(t["recursion"]["num_recursions"].as_integer(), Some(3));
            assert_eq!(t["router"]["kind"].as_str(), Some("expert_choice"));
            assert_eq!(t["runtime"]["backend"]["kind"].as_str(), Some(backend));
            assert_eq!(
                t["train"]["budget"]["steps"].as_integer(),
                Some(TRAIN_STEPS as i64)
            );
            assert_eq!(cfg.train.precision, Precision::F32);
            let bf16 = Config::from_table(
                Config::parse_table(&train_config_toml(backend, 1, "bf16")).unwrap(),
            )
            .unwrap();
            assert_eq!(bf16.train.precision, Precision::Bf16);
            assert_eq!(bf16.model, cfg.model, "the same model in both precisions");
        }
    }

    fn train_run(losses: &[f64], tokens_per_sec: f64) -> TrainRun {
        TrainRun {
            losses: losses.to_vec(),
            tokens_per_sec,
            flops_per_token: 1e9,
            host_reads: 0,
            device_to_host: 0,
            peak_used_bytes: None,
        }
    }

    #[test]
    fn the_bf16_training_section_compares_at_the_bf16_tolerance_with_the_bf16_peak() {
        let cpu = train_run(&[10.0, 8.0], 1e3);
        // 1.5% off at step 2: within 2e-2, far outside the f32 tolerance.
        let gpu = train_run(&[10.0, 8.12], 2e5);
        let m = bf16_training_section(&cpu, &gpu, Some(&[10.0, 8.0]), "NVIDIA H100 80GB HBM3");
        assert_eq!(m["passed"], true);
        assert!((m["max_rel_loss_diff"].as_f64().unwrap() - 0.015).abs() < 1e-12);
        assert_eq!(m["loss_rtol"], LOSS_RTOL_BF16);
        assert!((m["max_rel_diff_to_cuda_f32"].as_f64().unwrap() - 0.015).abs() < 1e-12);
        // 1e9 FLOP/token at 2e5 tokens/s against the 989 TFLOP/s bf16 peak.
        assert!((m["mfu"].as_f64().unwrap() - 2e14 / 989e12).abs() < 1e-12);
        let off = train_run(&[10.0, 8.4], 2e5);
        let m = bf16_training_section(&cpu, &off, None, "some GPU");
        assert_eq!(m["passed"], false);
        assert!(m["mfu"].is_null() && m.get("max_rel_diff_to_cuda_f32").is_none());
    }

    #[test]
    fn loss_curves_compare_step_by_step() {
        assert_eq!(compare_losses(&[2.0, 1.0], &[2.0, 1.0], 1e-3), (0.0, true));
        let (w, ok) = compare_losses(&[2.0, 1.0], &[2.0, 1.01], 1e-3);
        assert!((w - 0.01).abs() < 1e-12 && !ok);
        assert!(!compare_losses(&[2.0, 1.0], &[2.0], 1e-3).1);
        assert!(!compare_losses(&[], &[], 1e-3).1);
        assert!(!compare_losses(&[1.0], &[f64::NAN], 1e-3).1);
        assert_eq!(peak_flops("NVIDIA H200"), Some((67e12, 989e12)));
        assert_eq!(peak_flops("NVIDIA GeForce GTX 1080"), None);
    }

    #[test]
    fn the_kernel_report_is_json_with_its_memory_checks() {
        use mor_kernels::cuda::{BenchResult, GpuCheckReport, KernelCheck, MemoryCheck};
        let mut r = GpuCheckReport {
            device: "NVIDIA H200".into(),
            compute_capability: Some((9, 0)),
            checks: vec![KernelCheck {
                kernel: "flash_attention.recursion-wise.bwd.dq".into(),
                dtype: "f32".into(),
                shape: "q [2, 8, 100, 64]".into(),
                max_abs_err: 1e-7,
                max_rel_err: 2e-6,
                rtol: 1e-5,
                passed: true,
            }],
            benches: vec![BenchResult {
                op: "flash_attention.fwd+bwd".into(),
                dtype: "bf16".into(),
                shape: "L = 2048".into(),
                fused_us: 900.0,
                plain_us: Some(2500.0),
                speedup: Some(2500.0 / 900.0),
                iters: 20,
            }],
            ..Default::default()
        };
        // Without memory rows (a driver that reports none) the array is empty.
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["memory"], json!([]));
        assert_eq!(v["passed"], json!(true));
        r.memory.push(MemoryCheck {
            op: "flash_attention.fwd+bwd".into(),
            dtype: "f32".into(),
            lens: vec![1024, 2048, 4096],
            peak_bytes: vec![1 << 20, 3 << 20, 7 << 20],
            growth: 2.0,
            passed: true,
        });
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["memory"][0]["lens"], json!([1024, 2048, 4096]));
        assert_eq!(v["memory"][0]["growth"].as_f64(), Some(2.0));
        assert_eq!(v["benches"][0]["plain_us"].as_f64(), Some(2500.0));
        assert_eq!(v["passed"], json!(true));
        r.memory[0].passed = false;
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v["passed"],
            json!(false),
            "a quadratic growth fails the check"
        );
    }
}
