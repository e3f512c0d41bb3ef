//! `cargo xtask` on a run moved between backends (docs/runs-across-devices.md): `train
//! --resume` on another backend is refused naming `--backend`, and continues with it;
//! `eval --backend` scores the run on another backend. `reference` stands for the backend the
//! run was trained on (`cuda`), `cpu` for the one it moves to.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{refused, snapshot, stderr, xtask};

fn nll(o: &Output) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["full_sequence"]["nll"].as_f64().unwrap()
}

/// A temporary folder holding `tiny.toml`, the micro run of `steps` steps (a checkpoint
/// every 2) on `reference`, and the path of its run folder (not created).
fn reference_run(tag: &str, steps: u64) -> (PathBuf, PathBuf, PathBuf) {
    let root = common::tmp("xb", tag);
    let cfg = root.join("tiny.toml");
    std::fs::write(
        &cfg,
        common::config(steps, 2).replace("seed = 7", "backend = \"reference\"\nseed = 7"),
    )
    .unwrap();
    let out = root.join("run");
    (root, cfg, out)
}

#[test]
fn train_resumes_and_eval_scores_on_another_backend() {
    let (root, cfg, out) = reference_run("cli", 4);
    let train = |extra: &[&str]| common::train(&cfg, &out, extra);
    // Interrupted on `reference` after 3 steps (checkpoint at step 2).
    assert!(!train(&["--stop-after", "3"]).status.success());
    let before = snapshot(&out);
    // The config's backend changed without the flag: refused, naming it; nothing changed.
    let o = train(&["--resume", "--set", "runtime.backend=cpu"]);
    refused(
        &o,
        &["backend.kind: \"reference\" -> \"cpu\"", "--backend cpu"],
    );
    assert_eq!(snapshot(&out), before);
    // With the flag: continues on `cpu` from step 2, with the notice.
    let o = train(&["--resume", "--backend", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("continuing from step 2 on backend `cpu`")
            && err.contains("not bit-identical"),
        "{err}"
    );
    assert_eq!(segments(&out), [(0, "reference".into()), (2, "cpu".into())]);
    // `eval` on the run's own backend, then on `cpu` with the notice: the same NLL to f32
    // rounding (the two backends sum in other orders; measured 4e-9 relative).
    let own = xtask(&["eval"], &[("--run", &out)]);
    assert!(own.status.success(), "{}", stderr(&own));
    let moved = xtask(&["eval", "--backend", "cpu"], &[("--run", &out)]);
    assert!(moved.status.success(), "{}", stderr(&moved));
    assert!(
        stderr(&moved).contains("trained on backend `reference`; using backend `cpu`"),
        "{}",
        stderr(&moved)
    );
    let (a, b) = (nll(&own), nll(&moved));
    assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    // `generate` takes the flag too.
    let o = xtask(
        &[
            "generate",
            "--backend",
            "cpu",
            "--prompt",
            "doc",
            "--max-tokens",
            "3",
        ],
        &[("--run", &out)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("using backend `cpu`"), "{}", stderr(&o));
    // An unknown backend lists the registered ones.
    let o = xtask(&["eval", "--backend", "tpu"], &[("--run", &out)]);
    refused(&o, &["cpu, cuda, reference"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn ablate_reuses_a_run_of_another_backend_only_with_the_flag() {
    let root = common::tmp("xb", "ablate");
    let base = common::grid_base(
        &common::config(2, 2).replace("seed = 7", "backend = \"reference\"\nseed = 7"),
    );
    let grid = root.join("g.toml");
    std::fs::write(&grid, &base).unwrap();
    let out = root.join("abl");
    let ablate = |extra: &[&str]| common::ablate(&grid, &out, extra);
    let o = ablate(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&out.join("base"));
    // The grid now names `cpu`: refused as stale, naming the flag; nothing changed.
    std::fs::write(&grid, base.replace("\"reference\"", "\"cpu\"")).unwrap();
    let o = ablate(&[]);
    refused(
        &o,
        &["backend.kind: \"reference\" -> \"cpu\"", "--backend cpu"],
    );
    assert_eq!(snapshot(&out.join("base")), before);
    // With --backend cpu the finished run is reused as it is.
    let o = ablate(&["--backend", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("reused"), "{}", stderr(&o));
    assert_eq!(snapshot(&out.join("base")), before);
    let _ = std::fs::remove_dir_all(&root);
}

/// The `(from_step, backend kind)` of each line of the run's segments.jsonl.
fn segments(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("segments.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["from_step"].as_u64().unwrap(),
                v["backend"]["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_run_moved_to_cpu_goes_back_only_with_the_flag_and_keeps_its_config() {
    let (root, cfg, out) = reference_run("back", 6);
    let train = |extra: &[&str]| common::train(&cfg, &out, extra);
    let config_json = || std::fs::read(out.join("config.json")).unwrap();
    assert!(!train(&["--stop-after", "3"]).status.success());
    let own = config_json();
    // Steps 3-4 on `cpu` (checkpoint at step 4).
    let o = train(&["--resume", "--backend", "cpu", "--stop-after", "2"]);
    // Stopped (a failure) after the notice.
    refused(&o, &["continuing from step 2 on backend `cpu`"]);
    // Its own config, no flag: refused, naming the flag; nothing changed.
    let before = snapshot(&out);
    let o = train(&["--resume"]);
    refused(
        &o,
        &["last trained on backend `cpu`", "--backend reference"],
    );
    assert_eq!(snapshot(&out), before);
    // With the flag: back on `reference` from step 4, with the notice.
    let o = train(&["--resume", "--backend", "reference"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("continuing from step 4 on backend `reference` (it ran on `cpu` before"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        segments(&out),
        [
            (0, "reference".into()),
            (2, "cpu".into()),
            (4, "reference".into())
        ]
    );
    // The finished run is still the run of its own config: reported with it.
    assert_eq!(config_json(), own);
    let o = train(&["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("already finished"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_unknown_backend_is_refused_once_and_before_any_notice() {
    let root = common::tmp("xb", "unknown");
    let cfg = root.join("tiny.toml");
    std::fs::write(&cfg, common::config(2, 2)).unwrap();
    let out = root.join("run");
    let o = xtask(
        &["train", "--quiet", "--backend", "tpu"],
        &[("--config", &cfg), ("--out", &out)],
    );
    let err = refused(&o, &["cpu, cuda, reference"]);
    assert!(!err.contains("using backend `tpu`"), "{err}");
    assert!(!out.exists());
    // A grid of two runs: one refusal, not one per run.
    let grid = root.join("g.toml");
    std::fs::write(
        &grid,
        common::grid_base(&common::config(2, 2))
            + "\n[[runs]]\nname = \"a\"\n\n[[runs]]\nname = \"b\"\nset = { \"train.lr\" = 2e-3 }\n",
    )
    .unwrap();
    let dry = xtask(&["ablate", "--dry-run"], &[("--grid", &grid)]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(String::from_utf8_lossy(&dry.stdout).lines().count(), 2);
    let o = xtask(
        &["ablate", "--quiet", "--backend", "tpu"],
        &[("--grid", &grid), ("--out", &root.join("abl"))],
    );
    let err = refused(&o, &["cpu, cuda, reference"]);
    assert_eq!(err.matches("--backend tpu").count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
