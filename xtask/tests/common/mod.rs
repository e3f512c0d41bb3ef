//! Helpers shared by the `xtask` integration tests: the micro run they train, their
//! temporary folders, running the `xtask` binary and comparing folders. Each test file uses
//! some of them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A micro MoR model (d = 32, 5 layers, expert choice) on the built-in corpus, trained for
/// `steps` steps with a checkpoint every `checkpoint_every`.
pub fn config(steps: u64, checkpoint_every: u64) -> String {
    format!(
        r#"
[model]
preset = "micro"
vocab_size = 300
hidden_size = 32
num_heads = 4
num_kv_heads = 2
head_dim = 8
intermediate_size = 48
num_layers = 5
seq_len = 16
[recursion]
num_recursions = 3
sharing = {{ kind = "middle_cycle" }}
[router]
kind = "expert_choice"
[runtime]
seed = 7
threads = 1
[data]
source = "builtin"
builtin_docs = 80
tokenizer = "byte"
[eval]
max_batches = 1
[train]
budget = {{ steps = {steps} }}
batch_seqs = 4
micro_batch_seqs = 4
checkpoint_every = {checkpoint_every}
"#
    )
}

/// A fresh, empty temporary folder `mor-{prefix}-{tag}-{pid}` (the caller removes it).
pub fn tmp(prefix: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mor-{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// [`config`] as the `[base]` of an ablation grid (every table under `base.`).
pub fn grid_base(config: &str) -> String {
    [
        "model",
        "recursion",
        "router",
        "runtime",
        "data",
        "eval",
        "train",
    ]
    .iter()
    .fold(config.to_string(), |text, t| {
        text.replace(&format!("[{t}]"), &format!("[base.{t}]"))
    })
}

/// Runs the `xtask` binary with `args`, then each `(flag, path)` pair.
pub fn xtask(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

/// `xtask train --quiet --config CFG --out OUT` with `extra` flags.
pub fn train(cfg: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--quiet"];
    args.extend_from_slice(extra);
    xtask(&args, &[("--config", cfg), ("--out", out)])
}

/// `xtask ablate --quiet --grid GRID --out OUT` with `extra` flags.
pub fn ablate(grid: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["ablate", "--quiet"];
    args.extend_from_slice(extra);
    xtask(&args, &[("--grid", grid), ("--out", out)])
}

/// Asserts that the command failed and that its stderr says each of `says`; returns the
/// stderr.
pub fn refused(o: &Output, says: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded: {err}");
    for s in says {
        assert!(err.contains(s), "no {s:?} in: {err}");
    }
    err
}

/// A command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` (path relative to `dir`) with its bytes: a folder compared before
/// and after a command that must change nothing.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
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
