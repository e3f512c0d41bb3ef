//! Training loop guarantees: resume is bit-identical, NaN/Inf stops with the step and the
//! last good checkpoint kept, corrupt checkpoints are refused without being overwritten.

use common::{metric, quiet_opts as opts, run_dir as dir, snapshot, weights, Micro, MOR_RECURSION};
mod common;

use mor_core::config::{Config, ResolvedConfig};
use mor_models::run::run;
use std::path::Path;

fn cfg(extra_train: &str) -> ResolvedConfig {
    let train = format!(
        "budget = {{ steps = 6 }}\nbatch_seqs = 4\nmicro_batch_seqs = 2\ncheckpoint_every = 2\n{extra_train}"
    );
    Micro {
        runtime: "seed = 5",
        train: &train,
        tables: &format!(
            "{MOR_RECURSION}\n[router]\nkind = \"expert_choice\"\n[data]\nsource = \"builtin\"\nbuiltin_docs = 60\ntokenizer = \"byte\"\n[eval]\nmax_batches = 1"
        ),
        ..common::micro(300, 32, 5, 16)
    }
    .resolve()
}

fn losses(out: &Path) -> Vec<f64> {
    metric(out, "loss")
}

#[test]
fn resume_is_bit_identical() {
    let c = cfg("");
    let a = dir("full");
    run(&c, "full", &opts(&a)).unwrap();
    let b = dir("resumed");
    // Interrupt after 3 steps (the last checkpoint is at step 2), then resume.
    let mut o = opts(&b);
    o.stop_after = Some(3);
    assert!(
        run(&c, "resumed", &o).is_err(),
        "an interrupted run must not report success"
    );
    let mut o = opts(&b);
    o.resume = true;
    run(&c, "resumed", &o).unwrap();
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "per-step losses differ after resume");
    assert_eq!(
        weights(&a),
        weights(&b),
        "final weights differ after resume"
    );
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn non_finite_loss_stops_with_step_and_last_good_checkpoint() {
    // A huge learning rate makes the loss overflow after a few steps.
    let c = cfg("lr = 1e12\ngrad_clip = 0.0\nspike_action = \"off\"\nwarmup_steps = 0\nschedule = \"constant\"\n");
    let c = ResolvedConfig {
        train: mor_core::config::TrainConfig {
            steps: 40,
            ..c.train.clone()
        },
        ..c
    };
    let out = dir("nan");
    let err = run(&c, "nan", &opts(&out)).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    assert!(err.contains("at step "), "{err}");
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).ok();
    match latest {
        Some(name) => {
            assert!(err.contains(name.trim()), "{err} should name {name}");
            // The kept checkpoint is valid.
            mor_models::checkpoint::load_checkpoint(&out.join("checkpoints").join(name.trim()))
                .unwrap();
        }
        None => assert!(err.contains("last good checkpoint: none"), "{err}"),
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn corrupt_checkpoint_is_refused_and_kept() {
    let c = cfg("");
    let out = dir("corrupt");
    let mut o = opts(&out);
    o.stop_after = Some(2);
    let _ = run(&c, "c", &o);
    let ck = out.join("checkpoints/step-0000002");
    let p = ck.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut o = opts(&out);
    o.resume = true;
    let err = run(&c, "c", &o).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "the refused checkpoint was modified"
    );
    // Starting over without --resume in a folder with checkpoints is refused too.
    let err = run(&c, "c", &opts(&out)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

fn metric_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn resume_without_latest_pointer_logs_each_step_once() {
    let c = cfg("");
    let a = dir("ptr-full");
    run(&c, "full", &opts(&a)).unwrap();
    // (1) Killed after step 3 (checkpoint at 2) and `latest` lost: the newest valid
    // checkpoint is found. (2) Killed after step 1, before the first checkpoint: resume
    // restarts from step 0. Either way the log holds steps 1..=6 once, with the same losses.
    for (tag, stop, drop_latest) in [("ptr-lost", 3, true), ("ptr-early", 1, false)] {
        let b = dir(tag);
        let mut o = opts(&b);
        o.stop_after = Some(stop);
        assert!(run(&c, tag, &o).is_err());
        if drop_latest {
            std::fs::remove_file(b.join("checkpoints/latest")).unwrap();
        } else {
            assert!(
                !b.join("checkpoints").exists(),
                "{tag}: a checkpoint was written"
            );
        }
        let mut o = opts(&b);
        o.resume = true;
        run(&c, tag, &o).unwrap();
        assert_eq!(metric_steps(&b), (1..=6).collect::<Vec<_>>(), "{tag}");
        assert_eq!(losses(&a), losses(&b), "{tag}");
        assert_eq!(weights(&a), weights(&b), "{tag}");
        let _ = std::fs::remove_dir_all(&b);
    }
    let _ = std::fs::remove_dir_all(&a);
}

#[test]
fn an_existing_run_is_never_changed_by_a_refused_or_finished_command() {
    let c = cfg("");
    let out = dir("keep");
    run(&c, "keep", &opts(&out)).unwrap();
    let before = snapshot(&out);
    assert!(before.contains_key(Path::new("manifest.json")));
    // Another config, with or without --resume: refused naming the key, nothing written.
    let other = cfg("lr = 0.5");
    for resume in [false, true] {
        let mut o = opts(&out);
        o.resume = resume;
        let err = run(&other, "keep", &o).unwrap_err().to_string();
        assert!(
            err.contains("train.lr") && err.contains("another config"),
            "{err}"
        );
        assert_eq!(snapshot(&out), before, "resume = {resume}");
    }
    // The same config with --resume: reported as finished, nothing written.
    let mut o = opts(&out);
    o.resume = true;
    let got = run(&c, "keep", &o).unwrap();
    assert!(got.already_finished);
    assert_eq!(got.summary.steps, 6);
    assert_eq!(snapshot(&out), before);
    // Without --resume: refused.
    let err = run(&c, "keep", &opts(&out)).unwrap_err().to_string();
    assert!(err.contains("finished"), "{err}");
    assert_eq!(snapshot(&out), before);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_failed_start_leaves_no_files() {
    let root = dir("nofiles");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("empty.txt"), "").unwrap();
    let c = cfg("");
    // A new folder: not created. An existing empty folder: stays empty.
    let fresh = root.join("fresh");
    let empty = root.join("empty-dir");
    std::fs::create_dir_all(&empty).unwrap();
    for out in [&fresh, &empty] {
        let mut o = opts(out);
        o.data = Some(root.join("empty.txt"));
        assert!(run(&c, "x", &o).is_err());
    }
    assert!(!fresh.exists(), "the failed run created its folder");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    // A folder that holds something else is refused before anything is written.
    let other = root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.md"), "mine").unwrap();
    let err = run(&c, "x", &opts(&other)).unwrap_err().to_string();
    assert!(
        err.contains("holds no run") && err.contains("notes.md"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_locked_run_folder_is_refused_with_the_holder_pid() {
    let c = cfg("");
    let out = dir("locked");
    let lock = mor_models::runlock::RunLock::acquire(&out).unwrap();
    let err = run(&c, "l", &opts(&out)).unwrap_err().to_string();
    assert!(
        err.contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    assert!(!out.join("config.toml").exists());
    drop(lock);
    // Released: the run goes ahead, and releases the lock when done.
    run(&c, "l", &opts(&out)).unwrap();
    assert!(!out.join(mor_models::runlock::LOCK_FILE).exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resume_removes_leftover_temporary_checkpoints() {
    let c = cfg("");
    let out = dir("leftover");
    let mut o = opts(&out);
    o.stop_after = Some(3);
    assert!(run(&c, "x", &o).is_err());
    // What a SIGTERM or a full disk during a checkpoint leaves.
    let tmp = out.join("checkpoints/.step-0000004.tmp-999999");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    let tmp_file = out.join(".metrics.jsonl.tmp-999999");
    std::fs::write(&tmp_file, b"partial").unwrap();
    let mut o = opts(&out);
    o.resume = true;
    run(&c, "x", &o).unwrap();
    assert!(!tmp.exists() && !tmp_file.exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_data_of_a_run_is_recorded_and_checked_on_resume() {
    let root = dir("data");
    std::fs::create_dir_all(&root).unwrap();
    // A folder of 40 one-document files.
    let data = root.join("corpus");
    std::fs::create_dir_all(&data).unwrap();
    let doc = |i: usize| format!("document {i}: the quick brown fox {} jumps\n", i * 7 % 13);
    for i in 0..40 {
        std::fs::write(data.join(format!("{i:02}.txt")), doc(i)).unwrap();
    }
    let bytes: usize = (0..40).map(|i| doc(i).len()).sum();
    let c = cfg("");
    let out = root.join("run");
    let mut o = opts(&out);
    o.data = Some(data.clone());
    o.stop_after = Some(3);
    let err = run(&c, "d", &o).unwrap_err().to_string();
    assert!(err.contains("stopped after step 3"), "{err}");
    let rec = mor_models::provenance::DataRecord::read(&out)
        .unwrap()
        .unwrap();
    let abs = std::fs::canonicalize(&data).unwrap();
    assert_eq!(rec.source, abs.display().to_string());
    assert_eq!((rec.files, rec.bytes), (40, bytes as u64));
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains(&abs.display().to_string()), "{saved}");
    // A file changes: resume (without --data, so the recorded data) is refused.
    std::fs::write(data.join("07.txt"), doc(7).replace("fox", "cat")).unwrap();
    let mut o = opts(&out);
    o.resume = true;
    let err = run(&c, "d", &o).unwrap_err().to_string();
    assert!(err.contains("data differs"), "{err}");
    // Another --data is refused too.
    let other = root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for i in 0..20 {
        std::fs::write(other.join(format!("{i:02}.txt")), doc(i)).unwrap();
    }
    o.data = Some(other);
    let err = run(&c, "d", &o).unwrap_err().to_string();
    assert!(err.contains("data differs"), "{err}");
    // Restored: the resumed run trains on the recorded data, as an uninterrupted one does.
    std::fs::write(data.join("07.txt"), doc(7)).unwrap();
    o.data = None;
    run(&c, "d", &o).unwrap();
    let full = root.join("full");
    let mut f = opts(&full);
    f.data = Some(data.clone());
    run(&c, "d", &f).unwrap();
    assert_eq!(losses(&out), losses(&full));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn resume_with_a_trained_bpe_tokenizer() {
    // The run's tokenizer.json is reused on resume and must come back byte for byte.
    let c = Config::from_toml_str(
        &cfg("")
            .to_toml_string()
            .replace("tokenizer = \"byte\"", "tokenizer = \"bpe\""),
    )
    .unwrap();
    let out = dir("bpe");
    let mut o = opts(&out);
    o.stop_after = Some(3);
    assert!(run(&c, "b", &o).is_err());
    let tok = std::fs::read(out.join("tokenizer.json")).unwrap();
    let mut o = opts(&out);
    o.resume = true;
    run(&c, "b", &o).unwrap();
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), tok);
    let _ = std::fs::remove_dir_all(&out);
}
