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

use common::{metric, quiet_opts as opts, run_dir as dir, snapshot, Micro, MOR_RECURSION};
mod common;

use mor_core::config::ResolvedConfig;
use mor_models::run::{
    data_config, evaluate, prepare_existing, read_run_config, read_segments, run, run_with,
    with_backend, BackendSwitch, Segment,
};
use std::path::Path;

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

/// Rewrites a run folder's config as `cfg`, and the backend of its training segments as
/// `cfg`'s (the files re-hashed in its manifest), as a run started with `cfg` would have
/// written them.
fn relabel(dir: &Path, cfg: &ResolvedConfig) {
    use mor_models::checkpoint::{record_files, write_atomic};
    write_atomic(&dir.join("config.toml"), cfg.to_toml_string().as_bytes()).unwrap();
    write_atomic(&dir.join("config.json"), cfg.to_json().unwrap().as_bytes()).unwrap();
    record_files(dir, &["config.toml", "config.json"]).unwrap();
    let segs = read_segments(dir).unwrap();
    if !segs.is_empty() {
        let text: String = segs
            .into_iter()
            .map(|s| {
                let s = Segment {
                    backend: cfg.backend.clone(),
                    ..s
                };
                serde_json::to_string(&s).unwrap() + "\n"
            })
            .collect();
        write_atomic(&dir.join("segments.jsonl"), text.as_bytes()).unwrap();
        record_files(dir, &["segments.jsonl"]).unwrap();
    }
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
    interrupt(&on_ref, &b, 3);
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
    let config_json = std::fs::read(b.join("config.json")).unwrap();
    run_with(&on_cpu, "t", &o, BackendSwitch::Allow).unwrap();
    // The run's own config is kept as it was written at its start.
    assert_eq!(std::fs::read(b.join("config.json")).unwrap(), config_json);
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
    // With its own config (no flag) too: it is the run of that config.
    assert!(run(&on_ref, "t", &o).unwrap().already_finished);
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
    interrupt(&cfg("reference", 4, ""), &u, 3);
    let on_cuda = with_backend(&cfg("reference", 4, ""), "cuda").unwrap();
    relabel(&u, &on_cuda);
    let mut o = opts(&u);
    o.resume = true;
    let before = snapshot(&u);
    let err = run(&on_cuda, "t", &o).unwrap_err().to_string();
    assert!(
        err.contains("cuda") && err.contains("pass --backend cpu"),
        "{err}"
    );
    assert_eq!(snapshot(&u), before, "the refused resume changed the run");
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

/// The segments of `dir` as `(from_step, backend kind)`.
fn segments(dir: &Path) -> Vec<(usize, String)> {
    read_segments(dir)
        .unwrap()
        .into_iter()
        .map(|s| (s.from_step, s.backend.kind))
        .collect()
}

/// Trains `c` in `dir` and interrupts it after `steps` optimiser steps.
fn interrupt(c: &ResolvedConfig, dir: &Path, steps: usize) {
    let mut o = opts(dir);
    o.stop_after = Some(steps);
    let err = run(c, "t", &o).unwrap_err().to_string();
    assert!(
        err.contains(&format!("stopped after step {steps}")),
        "{err}"
    );
}

fn resume_opts(dir: &Path, stop_after: Option<usize>) -> mor_models::run::RunOptions {
    let mut o = opts(dir);
    o.resume = true;
    o.stop_after = stop_after;
    o
}

#[test]
fn a_run_moved_to_another_backend_does_not_move_back_without_the_flag() {
    let (on_ref, on_cpu) = (cfg("reference", 6, ""), cfg("cpu", 6, ""));
    let d = dir("xb-back");
    interrupt(&on_ref, &d, 3);
    // Steps 3-4 on `cpu` (checkpoint at step 4), then interrupted.
    assert!(run_with(
        &on_cpu,
        "t",
        &resume_opts(&d, Some(2)),
        BackendSwitch::Allow
    )
    .is_err());
    assert_eq!(segments(&d), [(0, "reference".into()), (2, "cpu".into())]);
    // Its config names `reference`, but it last ran on `cpu`: without the flag, refused,
    // naming it; nothing changed.
    let before = snapshot(&d);
    let err = run(&on_ref, "t", &resume_opts(&d, None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`cpu`") && err.contains("--backend reference"),
        "{err}"
    );
    assert_eq!(snapshot(&d), before);
    // With it, back to `reference` from step 4.
    run_with(&on_ref, "t", &resume_opts(&d, None), BackendSwitch::Allow).unwrap();
    assert_eq!(
        segments(&d),
        [
            (0, "reference".into()),
            (2, "cpu".into()),
            (4, "reference".into())
        ]
    );
    assert_eq!(metric(&d, "step"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_segment_records_the_checkpoint_training_resumes_from() {
    let on_cpu = cfg("cpu", 6, "");
    let d = dir("xb-corrupt-newest");
    interrupt(&cfg("reference", 6, ""), &d, 5);
    // Checkpoints at steps 2 and 4; the newest one corrupt.
    let p = d.join("checkpoints/step-0000004/model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    // `latest` names it: the resume is refused before anything is written (no segment).
    let before = snapshot(&d);
    assert!(run_with(&on_cpu, "t", &resume_opts(&d, None), BackendSwitch::Allow).is_err());
    assert_eq!(snapshot(&d), before);
    // Without `latest`, training continues from the valid checkpoint of step 2, and that is
    // the step recorded.
    std::fs::remove_file(d.join("checkpoints/latest")).unwrap();
    run_with(&on_cpu, "t", &resume_opts(&d, None), BackendSwitch::Allow).unwrap();
    assert_eq!(segments(&d), [(0, "reference".into()), (2, "cpu".into())]);
    assert_eq!(metric(&d, "step"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_older_run_without_config_json_keeps_its_own_backend_after_a_switch() {
    use mor_models::checkpoint::{read_manifest, write_atomic, MANIFEST_FILE};
    let on_ref = cfg("reference", 4, "");
    let d = dir("xb-no-json");
    interrupt(&on_ref, &d, 3);
    // A run started before config.json was written.
    std::fs::remove_file(d.join("config.json")).unwrap();
    let mut m = read_manifest(&d).unwrap().unwrap();
    m.files.remove("config.json");
    write_atomic(
        &d.join(MANIFEST_FILE),
        &serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    run_with(
        &cfg("cpu", 4, ""),
        "t",
        &resume_opts(&d, None),
        BackendSwitch::Allow,
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["backend"]["kind"], "reference");
    assert!(
        run(&on_ref, "t", &resume_opts(&d, None))
            .unwrap()
            .already_finished
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_segment_record_that_does_not_match_its_hash_is_refused_with_a_way_forward() {
    let on_ref = cfg("reference", 4, "");
    let d = dir("xb-segments");
    interrupt(&on_ref, &d, 3);
    // Altered, still valid JSON of the same length.
    let p = d.join("segments.jsonl");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"from_step\":0"), "{text}");
    std::fs::write(&p, text.replace("\"from_step\":0", "\"from_step\":1")).unwrap();
    let before = snapshot(&d);
    let err = run(&on_ref, "t", &resume_opts(&d, None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("segments.jsonl") && err.contains("hash") && err.contains("remove"),
        "{err}"
    );
    assert_eq!(snapshot(&d), before);
    assert!(read_segments(&d).is_err());
    // Removed as the message says: the run continues, starting a new record.
    std::fs::remove_file(&p).unwrap();
    run(&on_ref, "t", &resume_opts(&d, None)).unwrap();
    assert_eq!(
        segments(&d),
        [(0, "reference".into()), (2, "reference".into())]
    );
    let _ = std::fs::remove_dir_all(&d);
}
