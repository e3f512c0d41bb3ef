//! Training loop guarantees: resume is bit-identical, NaN/Inf stops with the step and the
//! last good checkpoint kept, corrupt checkpoints are refused without being overwritten.

use mor_core::config::{Config, ResolvedConfig};
use mor_models::run::{run, RunOptions};
use std::path::{Path, PathBuf};

fn cfg(extra_train: &str) -> ResolvedConfig {
    let text = format!(
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
seed = 5
[data]
source = "builtin"
builtin_docs = 60
tokenizer = "byte"
[eval]
max_batches = 1
[train]
budget = {{ steps = 6 }}
batch_seqs = 4
micro_batch_seqs = 2
checkpoint_every = 2
{extra_train}
"#
    );
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mor-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn opts(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        quiet: true,
        label: "t".into(),
        skip_eval: true,
        ..Default::default()
    }
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

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let t =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut v: Vec<_> = t
        .into_iter()
        .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
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
