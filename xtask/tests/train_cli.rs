//! `cargo xtask train` as a user runs it: SIGKILL in the middle and `--resume` give the
//! same losses as an uninterrupted run; bad input is a clear error that overwrites nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// The run these tests train: 40 steps, a checkpoint every 4.
fn config() -> String {
    common::config(40, 4)
}

fn tmp(tag: &str) -> PathBuf {
    common::tmp("cli", tag)
}

fn xtask() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn sigkill_then_resume_matches_an_uninterrupted_run() {
    let root = tmp("kill");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, config()).unwrap();
    let a = root.join("a");
    let st = xtask()
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&a)
        .status()
        .unwrap();
    assert!(st.success());

    let b = root.join("b");
    let mut child = xtask()
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill (SIGKILL) as soon as a second checkpoint exists, i.e. mid-run.
    let start = Instant::now();
    loop {
        let latest = std::fs::read_to_string(b.join("checkpoints/latest")).unwrap_or_default();
        if latest.trim() >= "step-0000008" || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_mid_run = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(killed_mid_run, "the run finished before it could be killed");
    assert!(!b.join("summary.json").exists());
    let st = xtask()
        .args(["train", "--quiet", "--resume", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&b)
        .status()
        .unwrap();
    assert!(st.success());
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 40);
    assert_eq!(la, lb, "per-step losses differ after SIGKILL + resume");
    let fa: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    let fb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap()).unwrap();
    assert_eq!(fa["val_nll"], fb["val_nll"]);
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs `xtask train` expecting a failure whose stderr contains every string of `expect`;
/// removes its temporary folder afterwards.
fn fails_with(args: &[&str], cfg_text: &str, expect: &[&str]) {
    let root = tmp(&format!("err-{}", expect[0].len()));
    let cfg = root.join("c.toml");
    std::fs::write(&cfg, cfg_text).unwrap();
    let out = root.join("out");
    let o = xtask()
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&o.stderr);
    for e in expect {
        assert!(err.contains(e), "stderr lacks {e:?}:\n{err}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_input_is_a_clear_error() {
    // A missing data path.
    fails_with(
        &["--data", "/definitely/not/here"],
        &config(),
        &["/definitely/not/here", "no such file"],
    );
    // A config typo.
    let typo = config().replace("checkpoint_every", "checkpoint_evry");
    fails_with(&[], &typo, &["checkpoint_evry"]);
    // An empty corpus: a folder whose only text file is empty.
    let root = tmp("empty");
    std::fs::write(root.join("empty.txt"), "").unwrap();
    let cfg = config().replace(
        "source = \"builtin\"",
        &format!("source = \"{}\"", root.display()),
    );
    fails_with(&[], &cfg, &["empty"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_finished_run_is_not_overwritten() {
    let root = tmp("keep");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, common::config(4, 4)).unwrap();
    let out = root.join("run");
    let st = xtask()
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let o = xtask()
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    let _ = std::fs::remove_dir_all(&root);
}
