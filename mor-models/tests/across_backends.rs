//! A run trained on one backend is evaluated and continued on another. `reference` and
//! `cpu` stand for `cuda` and `cpu`: a change of backend takes the same code path whatever
//! the two backends are (the run's `backend.kind` replaced, the weights and the optimiser
//! moments loaded onto the new backend's device).
//!
//! Tolerances: the two backends compute the same f32 arithmetic, the `cpu` backend partly
//! in fused kernels whose sums may run in another order than the reference's plain candle
//! ops, so an op can differ by a few f32 roundings (relative 1e-7 each). Measured on this
//! 5-layer, 3-recursion micro model: the validation NLLs differ by 4e-9 relative and the
//! training losses not at all. 1e-5 relative leaves room for other sum orders (another CPU
//! kernel tier) through a few AdamW steps, and stays far below what a wrong step or
//! optimiser moments restarted from zero change (the loss moves by about 1e-2 relative per
//! step here).

use common::{metric, quiet_opts as opts, run_dir as dir, Micro, MOR_RECURSION};
mod common;

use mor_core::config::ResolvedConfig;
use mor_models::run::{
    data_config, evaluate, prepare_existing, read_run_config, read_segments, run, run_with,
    with_backend, BackendSwitch, Segment,
};
use std::path::{Path, PathBuf};

/// Relative tolerance of a quantity computed on `reference` against `cpu` (module doc).
const TOL: f64 = 1e-5;

fn cfg(backend: &str, steps: usize, extra_train: &str) -> ResolvedConfig {
    let train = format!(
        "budget = {{ steps = {steps} }}\nbatch_seqs = 4\nmicro_batch_seqs = 2\ncheckpoint_every = 2\nlr = 1e-3\n{extra_train}"
    );
    let runtime = common::runtime(backend, 5);
    Micro {
        runtime: &runtime,
        train: &train,
        tables: &format!(
            "{MOR_RECURSION}\n[router]\nkind = \"expert_choice\"\n[data]\nsource = \"builtin\"\nbuiltin_docs = 60\ntokenizer = \"byte\"\n[eval]\nmax_batches = 2"
        ),
        ..common::micro(300, 32, 5, 16)
    }
    .resolve()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Evaluates the run in `dir` as `eval --run DIR [--backend KIND]` does: the backend that
/// ran, the full-sequence and the causal validation NLL.
fn eval_run(dir: &Path, backend: Option<&str>) -> (String, f64, f64) {
    let rc = read_run_config(dir, backend).unwrap();
    let model = rc.load_model(dir).unwrap();
    let ds = prepare_existing(dir, &data_config(&rc.cfg, None)).unwrap();
    let (ev, _) = evaluate(&model, &ds, &rc.cfg, "t", &[]).unwrap();
    (
        model.backend().name().to_string(),
        ev.full_sequence.unwrap().nll,
        ev.causal.unwrap().nll,
    )
}

/// Every file of a folder (recursively) with its bytes.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Rewrites a run folder's config as `cfg` (both files re-hashed in its manifest), as a run
/// started with `cfg` would have written it.
fn relabel(dir: &Path, cfg: &ResolvedConfig) {
    use mor_models::checkpoint::{record_files, write_atomic};
    write_atomic(&dir.join("config.toml"), cfg.to_toml_string().as_bytes()).unwrap();
    write_atomic(&dir.join("config.json"), cfg.to_json().unwrap().as_bytes()).unwrap();
    record_files(dir, &["config.toml", "config.json"]).unwrap();
}

#[test]
fn a_reference_run_evaluates_on_cpu_as_on_reference() {
    let d = dir("xb-eval");
    run(&cfg("reference", 2, ""), "t", &opts(&d)).unwrap();
    let (own, nll, causal) = eval_run(&d, None);
    assert_eq!(own, "reference");
    let rc = read_run_config(&d, Some("cpu")).unwrap();
    let notice = rc.notice().unwrap();
    assert!(
        notice.contains("`reference`") && notice.contains("`cpu`"),
        "{notice}"
    );
    let (other, nll_cpu, causal_cpu) = eval_run(&d, Some("cpu"));
    assert_eq!(other, "cpu");
    assert!(nll.is_finite() && nll > 1.0, "{nll}");
    assert!(
        rel(nll_cpu, nll) < TOL && rel(causal_cpu, causal) < TOL,
        "full-sequence NLL {nll_cpu} on cpu vs {nll} on reference; causal {causal_cpu} vs {causal}"
    );
    // `--backend` naming the run's own backend changes nothing and gives no notice.
    assert!(read_run_config(&d, Some("reference"))
        .unwrap()
        .notice()
        .is_none());
    // An unknown backend lists the registered ones.
    let err = read_run_config(&d, Some("tpu")).unwrap_err().to_string();
    for k in ["tpu", "reference", "cpu", "cuda"] {
        assert!(err.contains(k), "{err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_run_continues_on_another_backend_only_when_asked() {
    let (on_ref, on_cpu) = (cfg("reference", 6, ""), cfg("cpu", 6, ""));
    let a = dir("xb-full");
    run(&on_ref, "t", &opts(&a)).unwrap();
    let b = dir("xb-switched");
    // Interrupted after 3 steps on `reference` (the last checkpoint is at step 2).
    let mut o = opts(&b);
    o.stop_after = Some(3);
    assert!(run(&on_ref, "t", &o).is_err());
    let mut o = opts(&b);
    o.resume = true;
    let before = snapshot(&b);
    // Without the explicit switch: refused, naming the key and the flag; nothing changed.
    let err = run(&on_cpu, "t", &o).unwrap_err().to_string();
    assert!(
        err.contains("backend.kind: \"reference\" -> \"cpu\"") && err.contains("--backend cpu"),
        "{err}"
    );
    assert_eq!(snapshot(&b), before);
    // A numerics key still refuses with the switch, without the backend hint.
    let bf16 = cfg("cpu", 6, "precision = \"bf16\"");
    let err = run_with(&bf16, "t", &o, BackendSwitch::Allow)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.precision") && !err.contains("--backend"),
        "{err}"
    );
    assert_eq!(snapshot(&b), before);
    // With it: continues on `cpu` from the checkpoint of step 2.
    run_with(&on_cpu, "t", &o, BackendSwitch::Allow).unwrap();
    let steps = metric(&b, "step");
    assert_eq!(
        steps,
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "each step logged once"
    );
    let (la, lb) = (metric(&a, "loss"), metric(&b, "loss"));
    // Steps 1-2 ran on `reference` in both runs: the same numbers.
    assert_eq!(la[..2], lb[..2]);
    // Step 3, the first on `cpu`, starts from the saved weights; steps 4-6 also take the
    // saved optimiser moments.
    for s in 2..6 {
        assert!(
            rel(lb[s], la[s]) < TOL,
            "step {}: loss {} after the switch vs {} uninterrupted",
            s + 1,
            lb[s],
            la[s]
        );
    }
    // The optimiser's step counter went on from the checkpoint's (2), not from 0.
    let latest = std::fs::read_to_string(b.join("checkpoints/latest")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.join("checkpoints").join(latest.trim()).join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 6);
    assert_eq!(state["optimizer_t"], 6);
    // The run records which backend each segment ran on.
    assert_eq!(
        read_segments(&b).unwrap(),
        [
            Segment {
                from_step: 0,
                backend: on_ref.backend.clone()
            },
            Segment {
                from_step: 2,
                backend: on_cpu.backend.clone()
            }
        ]
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["extra"]["backends"],
        serde_json::json!(["reference", "cpu"])
    );
    mor_models::checkpoint::verify_files(&b, &["segments.jsonl", "config.toml"], true).unwrap();
    // A finished run is only reported, on any backend, and never changed.
    let done = snapshot(&b);
    let again = run_with(&on_cpu, "t", &o, BackendSwitch::Allow).unwrap();
    assert!(again.already_finished);
    assert_eq!(snapshot(&b), done);
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn a_cuda_run_evaluates_here_with_backend_cpu() {
    let ctx = mor_kernels::BackendCtx::new(candle_core::Device::Cpu);
    if mor_kernels::build_backend("cuda", &toml::Table::new(), &ctx).is_ok() {
        eprintln!("skipped: the cuda backend builds here");
        return;
    }
    let d = dir("xb-cuda");
    let trained = cfg("reference", 2, "");
    run(&trained, "t", &opts(&d)).unwrap();
    let (_, nll, _) = eval_run(&d, None);
    // The folder of the same run trained on `cuda`.
    relabel(&d, &with_backend(&trained, "cuda").unwrap());
    let rc = read_run_config(&d, None).unwrap();
    assert_eq!(rc.cfg.backend.kind, "cuda");
    let err = rc.load_model(&d).unwrap_err().to_string();
    assert!(
        err.contains("`cuda` cannot be built here") && err.contains("--backend cpu"),
        "{err}"
    );
    let (ran, nll_cpu, _) = eval_run(&d, Some("cpu"));
    assert_eq!(ran, "cpu");
    assert!(rel(nll_cpu, nll) < TOL, "{nll_cpu} vs {nll}");
    // Resuming it here without the switch names the flag.
    let mut o = opts(&d);
    o.resume = true;
    let err = run(&trained, "t", &o).unwrap_err().to_string();
    assert!(
        err.contains("backend.kind: \"cuda\" -> \"reference\"")
            && err.contains("--backend reference"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
    // An unfinished `cuda` run (interrupted after step 3, checkpoint at step 2): resuming it
    // with its own config says that its backend is unavailable and names `--backend cpu`;
    // with the switch it continues on `cpu` from step 2.
    let u = dir("xb-cuda-partial");
    let mut o = opts(&u);
    o.stop_after = Some(3);
    assert!(run(&cfg("reference", 4, ""), "t", &o).is_err());
    let on_cuda = with_backend(&cfg("reference", 4, ""), "cuda").unwrap();
    relabel(&u, &on_cuda);
    let mut o = opts(&u);
    o.resume = true;
    let err = run(&on_cuda, "t", &o).unwrap_err().to_string();
    assert!(
        err.contains("cuda") && err.contains("pass --backend cpu"),
        "{err}"
    );
    run_with(&cfg("cpu", 4, ""), "t", &o, BackendSwitch::Allow).unwrap();
    assert_eq!(metric(&u, "step"), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(read_segments(&u).unwrap().last().unwrap().from_step, 2);
    let _ = std::fs::remove_dir_all(&u);
}

#[test]
fn a_bf16_run_on_a_backend_without_bf16_is_refused_with_the_precision_message() {
    let d = dir("xb-bf16");
    run(&cfg("cpu", 2, "precision = \"bf16\""), "t", &opts(&d)).unwrap();
    let Err(err) = read_run_config(&d, Some("reference")).and_then(|rc| rc.build_model()) else {
        panic!("the reference backend has no bf16, yet it built the bf16 run");
    };
    let err = err.to_string();
    assert!(
        err.contains("--backend reference")
            && err.contains("train.precision = \"bf16\"")
            && err.contains("`reference`"),
        "{err}"
    );
    // Its own backend builds it.
    let rc = read_run_config(&d, Some("cpu")).unwrap();
    assert!(rc.notice().is_none());
    assert_eq!(rc.load_model(&d).unwrap().backend().name(), "cpu");
    let _ = std::fs::remove_dir_all(&d);
}
