//! `cargo xtask` commands never damage a user's runs and use the data a run was trained on:
//! refused commands change nothing, finished runs stay as they are, corrupt weights are
//! refused, a held run folder is refused with the holder's PID, and `ablate` never reports a
//! run trained with another config or other data.

use std::path::PathBuf;

mod common;

use common::{snapshot, stderr, train, xtask};

/// The run these tests train: 3 steps, a checkpoint every 2.
fn config() -> String {
    common::config(3, 2)
}

fn tmp(tag: &str) -> PathBuf {
    common::tmp("safety", tag)
}

#[test]
fn another_config_or_a_finished_run_changes_nothing() {
    let root = tmp("cfg");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, config()).unwrap();
    let out = root.join("run");
    let o = train(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&out);
    let other = root.join("other.toml");
    std::fs::write(
        &other,
        config().replace("hidden_size = 32", "hidden_size = 48"),
    )
    .unwrap();
    for extra in [&[][..], &["--resume"][..]] {
        let o = train(&other, &out, extra);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains("model.hidden_size: 32 -> 48"), "{err}");
        assert_eq!(snapshot(&out), before, "{extra:?} changed the run");
    }
    // --resume on the finished run: says so, changes nothing, succeeds.
    let o = train(&cfg, &out, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("already finished"), "{}", stderr(&o));
    assert_eq!(snapshot(&out), before);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_held_run_folder_is_refused_with_the_pid() {
    let root = tmp("lock");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, config()).unwrap();
    let out = root.join("run");
    let lock = mor_models::runlock::RunLock::acquire(&out).unwrap();
    let o = train(&cfg, &out, &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "only the lock file"
    );
    drop(lock);
    let _ = std::fs::remove_dir_all(&root);
}

fn nll(json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["full_sequence"]["nll"].as_f64().unwrap()
}

#[test]
fn eval_uses_the_recorded_data_and_refuses_corrupt_weights() {
    let root = tmp("eval");
    let data = root.join("corpus");
    std::fs::create_dir_all(&data).unwrap();
    let doc = |i: usize| format!("doc {i}: {} zebras cross {} rivers.\n", i * 3 % 17, i % 5);
    for i in 0..60 {
        std::fs::write(data.join(format!("{i:02}.txt")), doc(i)).unwrap();
    }
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, config()).unwrap();
    let out = root.join("run");
    let o = xtask(
        &["train", "--quiet"],
        &[("--config", &cfg), ("--out", &out), ("--data", &data)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // `eval --run` scores the data the run was trained on: the NLL of training's own
    // evaluation (not the built-in corpus).
    let trained = nll(&std::fs::read_to_string(out.join("eval.json")).unwrap());
    let o = xtask(&["eval"], &[("--run", &out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(nll(&String::from_utf8_lossy(&o.stdout)), trained);
    // The data changed: refused, with the reason.
    std::fs::write(data.join("03.txt"), doc(4)).unwrap();
    let o = xtask(&["eval"], &[("--run", &out)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has changed"), "{}", stderr(&o));
    std::fs::write(data.join("03.txt"), doc(3)).unwrap();
    // A moved copy of the same data given with --data: scored like the run's own data.
    let copy = root.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for i in 0..60 {
        std::fs::write(copy.join(format!("{i:02}.txt")), doc(i)).unwrap();
    }
    let o = xtask(&["eval"], &[("--run", &out), ("--data", &copy)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(nll(&String::from_utf8_lossy(&o.stdout)), trained);
    // One flipped byte in the weights: eval and generate refuse, naming the file.
    let w = out.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let mid = bytes.len() - 5;
    bytes[mid] ^= 0x40;
    std::fs::write(&w, &bytes).unwrap();
    for args in [&["eval"][..], &["generate", "--prompt", "doc"][..]] {
        let o = xtask(args, &[("--run", &out)]);
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        assert!(
            err.contains("model.safetensors") && err.contains("hash"),
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn generate_says_when_it_stops_at_the_context_limit() {
    let root = tmp("ctx");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, common::config(1, 2)).unwrap();
    let out = root.join("run");
    assert!(train(&cfg, &out, &[]).status.success());
    let o = xtask(
        &["generate", "--prompt", "ab", "--max-tokens", "40"],
        &[("--run", &out)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("context limit") && err.contains("seq_len = 16"),
        "{err}"
    );
    // Within the limit: no such line.
    let o = xtask(
        &["generate", "--prompt", "ab", "--max-tokens", "4"],
        &[("--run", &out)],
    );
    assert!(!stderr(&o).contains("context limit"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn ablate_never_reports_a_stale_run() {
    let root = tmp("ablate");
    let base = common::grid_base(&common::config(2, 2));
    let grid = root.join("g.toml");
    std::fs::write(&grid, &base).unwrap();
    let out = root.join("abl");
    let ablate = |extra: &[&str]| common::ablate(&grid, &out, extra);
    let o = ablate(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Rerun unchanged: reused.
    let before = snapshot(&out.join("base"));
    let o = ablate(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("reused"), "{}", stderr(&o));
    assert_eq!(snapshot(&out.join("base")), before);
    // The grid changed: refused with the key, nothing trained or changed.
    std::fs::write(&grid, base.replace("seed = 7", "seed = 8")).unwrap();
    let o = ablate(&[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("seed: 7 -> 8") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(snapshot(&out.join("base")), before);
    // --force while another process holds the run: refused with its PID, nothing moved.
    let lock = mor_models::runlock::RunLock::acquire(&out.join("base")).unwrap();
    let o = ablate(&["--force"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    drop(lock);
    assert_eq!(snapshot(&out.join("base")), before);
    // --force: the old run is moved aside intact and the run trained again.
    let o = ablate(&["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let aside: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("base.old-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(snapshot(&aside[0]), before);
    let cfg_now = std::fs::read_to_string(out.join("base/config.toml")).unwrap();
    assert!(cfg_now.contains("seed = 8"), "{cfg_now}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_model_too_large_for_memory_is_refused_before_anything_is_written() {
    let root = tmp("mem");
    let cfg = root.join("huge.toml");
    let text = config()
        .replace("hidden_size = 32", "hidden_size = 100000")
        .replace("num_layers = 5", "num_layers = 200");
    std::fs::write(&cfg, text).unwrap();
    let out = root.join("run");
    let o = train(&cfg, &out, &[]);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "a 200-layer d=100000 model was accepted"
    );
    assert!(
        err.contains("hidden_size 100000") && err.contains("num_layers 200"),
        "{err}"
    );
    assert!(err.contains("available"), "{err}");
    assert!(
        !out.exists(),
        "the refused command created {}",
        out.display()
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A new run whose settings cannot work is refused before anything is written, and a
/// nested `--out` leaves none of the folders it would have created: more threads than the
/// machine has, and a task file of the final evaluation that does not exist (before, it
/// was read only after training).
#[test]
fn a_bad_new_run_is_refused_before_anything_is_written() {
    let root = tmp("badnew");
    let cfg = root.join("threads.toml");
    std::fs::write(&cfg, config().replace("threads = 1", "threads = 100000")).unwrap();
    let out = root.join("a").join("b").join("run");
    let o = train(&cfg, &out, &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("runtime.threads") && err.contains("100000"),
        "{err}"
    );
    assert!(
        !root.join("a").exists(),
        "the refused run left {}",
        root.join("a").display()
    );
    let missing = root.join("missing.jsonl");
    let cfg = root.join("tasks.toml");
    std::fs::write(
        &cfg,
        config().replace(
            "[eval]\n",
            &format!("[eval]\ntasks = [{:?}]\n", missing.display().to_string()),
        ),
    )
    .unwrap();
    let o = train(&cfg, &out, &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("missing.jsonl"), "{err}");
    assert!(
        !root.join("a").exists(),
        "the refused run left {}",
        root.join("a").display()
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The saved `config.json` (the config as resolved when the run started) is what a rerun
/// is compared with, so a default that changed since is seen; and a finished run that does
/// not record its data is never reused as a run on the data given.
#[test]
fn reuse_compares_the_saved_resolved_config_and_needs_the_data_record() {
    let root = tmp("reuse");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, common::config(1, 2)).unwrap();
    let out = root.join("run");
    let o = train(&cfg, &out, &["--data", "builtin"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // As if the default of `train.min_lr_ratio` had been 0.2 when the run was trained.
    let json_path = out.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(v["train"]["min_lr_ratio"], serde_json::json!(0.1));
    v["train"]["min_lr_ratio"] = serde_json::json!(0.2);
    std::fs::write(&json_path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    mor_models::checkpoint::record_files(&out, &["config.json"]).unwrap();
    let before = snapshot(&out);
    let o = train(&cfg, &out, &["--resume"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("train.min_lr_ratio: 0.2 -> 0.1"),
        "{}",
        stderr(&o)
    );
    assert_eq!(snapshot(&out), before);
    // Back to the true value; then without its data record the finished run cannot be
    // matched to any data, even one named explicitly.
    v["train"]["min_lr_ratio"] = serde_json::json!(0.1);
    std::fs::write(&json_path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    mor_models::checkpoint::record_files(&out, &["config.json"]).unwrap();
    let o = train(&cfg, &out, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("already finished"), "{}", stderr(&o));
    std::fs::remove_file(out.join("data.json")).unwrap();
    let o = train(&cfg, &out, &["--resume", "--data", "builtin"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not record the data"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A run written before manifests and data records existed (simulated by removing them):
/// `train --resume` continues it on the built-in corpus its config names and records what it
/// lacked; `eval` and `generate` use a run without a manifest, with a notice.
#[test]
fn a_run_from_an_older_version_stays_usable() {
    let root = tmp("older");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, config()).unwrap();
    let out = root.join("run");
    let o = train(&cfg, &out, &["--stop-after", "2"]);
    assert!(!o.status.success(), "stopped early");
    for f in ["manifest.json", "data.json", "config.json"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let o = train(&cfg, &out, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = mor_models::checkpoint::read_manifest(&out)
        .unwrap()
        .unwrap();
    for f in [
        "config.toml",
        "config.json",
        "data.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        assert!(
            m.files.contains_key(f),
            "{f} not recorded: {:?}",
            m.files.keys()
        );
    }
    // One step ran in the resumed invocation: the rate comes from the logged steps.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(
        summary["train_tokens_per_sec"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    for args in [
        &["eval"][..],
        &["generate", "--prompt", "ab", "--max-tokens", "2"][..],
    ] {
        let o = xtask(args, &[("--run", &out)]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no manifest.json"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A newer checkpoint that fails its checks is skipped on resume, and said.
#[test]
fn a_skipped_checkpoint_is_reported() {
    let root = tmp("skipped");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, common::config(5, 2)).unwrap();
    let out = root.join("run");
    assert!(!train(&cfg, &out, &["--stop-after", "4"]).status.success());
    let ck = out.join("checkpoints");
    std::fs::remove_file(ck.join("latest")).unwrap();
    let w = ck.join("step-0000004").join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let mid = bytes.len() - 3;
    bytes[mid] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let o = train(&cfg, &out, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("skipped a newer checkpoint") && err.contains("step-0000004"),
        "{err}"
    );
    assert!(err.contains("step-0000002"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A run folder's model is the trained model whole: `eval --run` scores exactly what the
/// training run's own evaluation scored, for an expert-choice model whose causal routing
/// uses its auxiliary router (`infer_rule = "aux_router"`), and a token-choice model with the loss-free balancing bias
/// (before, both were saved without them and reloaded untrained).
#[test]
fn a_saved_run_keeps_its_auxiliary_router_and_router_buffers() {
    let root = tmp("whole");
    let expert = config().replace(
        "kind = \"expert_choice\"",
        "kind = \"expert_choice\"\nsampling = \"aux_router\"\ninfer_rule = \"aux_router\"",
    );
    let token = config().replace(
        "kind = \"expert_choice\"",
        "kind = \"token_choice\"\nbalancing = \"loss_free\"\nbal_warmup_steps = 0",
    );
    for (tag, text) in [("expert", expert), ("token", token)] {
        let cfg = root.join(format!("{tag}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let out = root.join(tag);
        let o = train(&cfg, &out, &[]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
        let o = xtask(&["eval"], &[("--run", &out)]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        let now: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for key in ["full_sequence", "causal"] {
            assert_eq!(now[key]["nll"], saved[key]["nll"], "{tag} {key}");
        }
        // Test-time depth: the sweep's full depth is the causal NLL (the scored split is
        // one batch, smaller than the sweep's token limit), depth 1 differs, and
        // `eval --max-depth 1` scores what the sweep scored at depth 1.
        let sweep = saved["nll_by_max_depth"].as_array().unwrap();
        assert_eq!(sweep.len(), 3, "{tag}: {sweep:?}");
        assert_eq!(sweep[2]["nll"], saved["causal"]["nll"], "{tag}");
        assert_ne!(sweep[0]["nll"], sweep[2]["nll"], "{tag}");
        let o = xtask(&["eval", "--max-depth", "1"], &[("--run", &out)]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        let d1: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(d1["causal"]["nll"], sweep[0]["nll"], "{tag}");
        let o = xtask(&["eval", "--max-depth", "4"], &[("--run", &out)]);
        assert!(
            !o.status.success() && stderr(&o).contains("1..=3"),
            "{}",
            stderr(&o)
        );
        let names = mor_models::checkpoint::load_tensors(&out.join("model.safetensors"))
            .unwrap()
            .into_keys()
            .collect::<Vec<_>>();
        let want = if tag == "token" { "buffer." } else { "aux" };
        assert!(names.iter().any(|n| n.contains(want)), "{tag}: {names:?}");
    }
    let _ = std::fs::remove_dir_all(&root);
}
