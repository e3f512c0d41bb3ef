//! The training path a GPU run takes, run on the CPU: expert-choice routing on the device
//! path (`routing_path = "device"`). It trains to the same losses and weights as the host
//! path, and a run interrupted after a checkpoint resumes bit-identically.

use common::{Micro, MOR_RECURSION};
mod common;

use mor_core::config::ResolvedConfig;
use mor_models::run::{run, RunOptions};
use std::path::{Path, PathBuf};

fn cfg(routing_path: &str) -> ResolvedConfig {
    Micro {
        runtime: "seed = 9",
        train: "budget = { steps = 5 }\nbatch_seqs = 4\nmicro_batch_seqs = 2\ncheckpoint_every = 2\n",
        tables: &format!(
            "{MOR_RECURSION}\n[router]\nkind = \"expert_choice\"\nz_loss = true\nrouting_path = \"{routing_path}\"\n\
             [data]\nsource = \"builtin\"\nbuiltin_docs = 60\ntokenizer = \"byte\"\n[eval]\nmax_batches = 1"
        ),
        ..common::micro(300, 32, 5, 16)
    }
    .resolve()
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mor-devpath-{tag}-{}", std::process::id()));
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

fn metric(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
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
fn device_routing_path_trains_like_the_host_path_and_resumes_bit_identically() {
    let host = dir("host");
    let scope = mor_kernels::host_sync::Scope::start();
    run(&cfg("host"), "host", &opts(&host)).unwrap();
    let host_reads = scope.counts().reads;
    let full = dir("full");
    let scope = mor_kernels::host_sync::Scope::start();
    run(&cfg("device"), "full", &opts(&full)).unwrap();
    let device_reads = scope.counts().reads;
    // Host reads per optimiser step on the device path: one by the trainer (loss, CE and
    // gradient norm together) and, per micro-batch (2 here), one per recursion step (3: the
    // kept positions, which the `Router` interface returns on the host) plus one for the
    // router's logged terms. The host path reads the scores and gates of every step too.
    let (steps, micro, nr) = (5, 2, 3);
    assert_eq!(
        device_reads,
        steps * (1 + micro * (nr + 1)),
        "host reads {host_reads}"
    );
    assert!(host_reads > device_reads, "{device_reads} vs {host_reads}");
    // Same selections, so the same losses and weights as the host path.
    assert_eq!(metric(&host, "loss").len(), 5);
    assert_eq!(metric(&host, "loss"), metric(&full, "loss"));
    assert_eq!(weights(&host), weights(&full));

    // Interrupted after 3 steps (last checkpoint at step 2), then resumed.
    let resumed = dir("resumed");
    let mut o = opts(&resumed);
    o.stop_after = Some(3);
    assert!(run(&cfg("device"), "resumed", &o).is_err());
    let mut o = opts(&resumed);
    o.resume = true;
    run(&cfg("device"), "resumed", &o).unwrap();
    assert_eq!(metric(&full, "loss"), metric(&resumed, "loss"));
    assert_eq!(weights(&full), weights(&resumed));
    for d in [host, full, resumed] {
        let _ = std::fs::remove_dir_all(d);
    }
}
