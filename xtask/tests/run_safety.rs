//! `cargo xtask` commands never damage a user's runs and use the data a run was trained on:
//! refused commands change nothing, finished runs stay as they are, corrupt weights are
//! refused, a held run folder is refused with the holder's PID, and `ablate` never reports a
//! run trained with another config or other data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

/// The run these tests train: 3 steps, a checkpoint every 2.
fn config() -> String {
    common::config(3, 2)
}

fn tmp(tag: &str) -> PathBuf {
    common::tmp("safety", tag)
}

fn xtask(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn train(cfg: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--quiet"];
    args.extend_from_slice(extra);
    xtask(&args, &[("--config", cfg), ("--out", out)])
}

/// Every file under `dir` (relative path → bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
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
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
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
    let base = common::config(2, 2)
        .replace("[model]", "[base.model]")
        .replace("[recursion]", "[base.recursion]")
        .replace("[router]", "[base.router]")
        .replace("[runtime]", "[base.runtime]")
        .replace("[data]", "[base.data]")
        .replace("[eval]", "[base.eval]")
        .replace("[train]", "[base.train]");
    let grid = root.join("g.toml");
    std::fs::write(&grid, &base).unwrap();
    let out = root.join("abl");
    let ablate = |extra: &[&str]| {
        let mut args = vec!["ablate", "--quiet"];
        args.extend_from_slice(extra);
        xtask(&args, &[("--grid", &grid), ("--out", &out)])
    };
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
