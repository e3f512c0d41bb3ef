//! The training path a GPU run takes, run on the CPU: expert-choice routing on the device
//! path (`routing_path = "device"`). It trains to the same losses and weights as the host
//! path, and a run interrupted after a checkpoint resumes bit-identically.

use common::{metric, quiet_opts as opts, run_dir as dir, weights, Micro, MOR_RECURSION};
mod common;

use mor_core::config::ResolvedConfig;
use mor_models::run::run;
use std::path::Path;

fn cfg(routing_path: &str) -> ResolvedConfig {
    cfg_with(routing_path, "")
}

/// [`cfg`] with more `[train]` keys.
fn cfg_with(routing_path: &str, train: &str) -> ResolvedConfig {
    router_cfg(
        &format!("kind = \"expert_choice\"\nz_loss = true\nrouting_path = \"{routing_path}\""),
        train,
    )
}

/// The training config with `router` as the `[router]` table and more `[train]` keys.
fn router_cfg(router: &str, train: &str) -> ResolvedConfig {
    Micro {
        runtime: "seed = 9",
        train: &format!(
            "budget = {{ steps = 5 }}\nbatch_seqs = 4\nmicro_batch_seqs = 2\ncheckpoint_every = 2\n{train}\n"
        ),
        tables: &format!(
            "{MOR_RECURSION}\n[router]\n{router}\n\
             [data]\nsource = \"builtin\"\nbuiltin_docs = 60\ntokenizer = \"byte\"\n[eval]\nmax_batches = 1"
        ),
        ..common::micro(300, 32, 5, 16)
    }
    .resolve()
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
    // Host reads per optimiser step on the device path: one, by the trainer (loss, CE,
    // gradient norm and the router's logged terms and statistics of both micro-batches
    // together). The kept positions of the 3 recursion steps stay on the device
    // (`Router::route_device`). The host path reads the scores, gates and kept positions
    // of every step.
    let steps = 5;
    assert_eq!(device_reads, steps, "host reads {host_reads}");
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

/// A model forward on the device routing path: the kept positions of every step stay on
/// the device (gather/scatter indices are the router's `[b, k]` tensor), one host read per
/// forward (the router's terms, statistics and token depths). Logits, depths and routing
/// statistics equal the host path's, in training, full-sequence and causal forwards, with
/// the first step gathering a subset (capacity < 1) or running every token.
#[test]
fn model_forward_on_the_device_path_reads_once_and_equals_the_host_path() {
    let model_cfg = |path: &str, capacity: &str| {
        Micro {
            runtime: "seed = 4",
            tables: &format!(
                "{MOR_RECURSION}\n[router]\nkind = \"expert_choice\"\nz_loss = true\n\
                 infer_rule = \"full_sequence\"\ncapacity = {capacity}\nrouting_path = \"{path}\""
            ),
            ..common::micro(64, 32, 5, 16)
        }
        .resolve()
    };
    let ids = common::id_tensor(3, 16, 64, 5);
    for capacity in ["\"auto\"", "[0.75, 0.5, 0.25]"] {
        let host = mor_models::model::MorModel::new(&model_cfg("host", capacity)).unwrap();
        let dev = mor_models::model::MorModel::new(&model_cfg("device", capacity)).unwrap();
        for mode in [
            mor_router::RouteMode::Train,
            mor_router::RouteMode::FullSequence,
            mor_router::RouteMode::Causal,
        ] {
            let a = host.forward(&ids, mode).unwrap();
            let scope = mor_kernels::host_sync::Scope::start();
            let b = dev.forward(&ids, mode).unwrap();
            let reads = scope.counts().reads;
            // A causal forward decides a step of capacity 1 on the host (every candidate
            // kept), then reads its scores and gates there.
            let causal_host_step = mode == mor_router::RouteMode::Causal && capacity == "\"auto\"";
            if !causal_host_step {
                assert_eq!(reads, 1, "{capacity} {mode:?}");
            }
            let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&a.logits), flat(&b.logits), "{capacity} {mode:?}");
            assert_eq!(a.depths, b.depths, "{capacity} {mode:?}");
            assert!(a.depths.iter().flatten().any(|&d| d == 3));
            assert_eq!(a.router.terms, b.router.terms, "{capacity} {mode:?}");
            let (mut x, mut y) = (a.router.stats.clone(), b.router.stats.clone());
            for (p, q) in x.gate_sum.iter().zip(&y.gate_sum) {
                assert!((p - q).abs() <= 1e-9 * p.abs().max(1.0), "{p} vs {q}");
            }
            x.gate_sum.clear();
            y.gate_sum.clear();
            assert_eq!(x, y, "{capacity} {mode:?}");
        }
    }
}

/// Deterministic batches: the ids of batch `cursor` are drawn from `Rng::new(cursor)`.
/// Each call also notes this thread's host-read count so far (`reads`).
#[derive(Default)]
struct Batches {
    cursor: u64,
    t: usize,
    reads: Vec<u64>,
}

impl mor_models::train::TrainData for Batches {
    fn next_batch(&mut self, rows: usize) -> mor_models::Result<mor_models::train::TokenBatch> {
        self.reads.push(mor_kernels::host_sync::snapshot().reads);
        let ids = common::random_ids(rows * (self.t + 1), 300, self.cursor);
        self.cursor += 1;
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for r in ids.chunks(self.t + 1) {
            inputs.extend_from_slice(&r[..self.t]);
            targets.extend_from_slice(&r[1..]);
        }
        Ok(mor_models::train::TokenBatch {
            inputs,
            targets,
            b: rows,
            t: self.t,
        })
    }
    fn cursor(&self) -> serde_json::Value {
        self.cursor.into()
    }
    fn restore(&mut self, cursor: &serde_json::Value) -> mor_models::Result<()> {
        self.cursor = cursor.as_u64().unwrap();
        Ok(())
    }
}

/// Trains the device-routing model with AdamW on `update`; `stop_after` / `resume` as in
/// the run options. Returns the logged losses and the final weights.
fn train_update(
    out: &Path,
    update: mor_models::optim::UpdatePath,
    stop_after: Option<usize>,
    resume: bool,
) -> (bool, Vec<f64>, Vec<(String, Vec<f32>)>) {
    let c = cfg("device");
    let model = mor_models::model::MorModel::new(&c).unwrap();
    let mut o = opts(out);
    o.stop_after = stop_after;
    let settings = mor_models::run::train_settings(&c, &o);
    let mut data = Batches {
        t: 16,
        ..Default::default()
    };
    let summary =
        mor_models::train::train_with(&model, &mut data, &settings, out, resume, 1.0, update)
            .unwrap();
    (
        summary.finished,
        metric(out, "loss"),
        sorted_weights(&model),
    )
}

/// A model's parameters by name, sorted.
fn sorted_weights(model: &mor_models::model::MorModel) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// The trainer's AdamW on the device update path (the tensor ops a GPU run takes), run on
/// the CPU end to end: it trains like the host update (f32 rounding apart), and a run
/// interrupted after a checkpoint resumes bit-identically (moments saved and restored).
#[test]
fn trainer_adamw_device_update_trains_like_the_host_update_and_resumes() {
    use mor_models::optim::UpdatePath;
    let (host_dir, dev_dir, res_dir) = (dir("upd-host"), dir("upd-dev"), dir("upd-res"));
    let (done, host_loss, host_w) = train_update(&host_dir, UpdatePath::Host, None, false);
    assert!(done);
    let (done, dev_loss, dev_w) = train_update(&dev_dir, UpdatePath::Device, None, false);
    assert!(done);
    assert_eq!(host_loss.len(), 5);
    for (a, b) in host_loss.iter().zip(&dev_loss) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "loss {a} (host) vs {b} (device)"
        );
    }
    let mut worst = 0f32;
    for ((n, a), (_, b)) in host_w.iter().zip(&dev_w) {
        for (x, y) in a.iter().zip(b) {
            let e = (x - y).abs() / x.abs().max(1e-2);
            assert!(e <= 1e-3, "{n}: {x} (host) vs {y} (device)");
            worst = worst.max(e);
        }
    }
    // The device update is taken (f32 tensor ops round differently from the fused host
    // loop), and the weights moved from their initial values.
    assert!(worst > 0.0, "the device update was not taken");
    let init = mor_models::model::MorModel::new(&cfg("device")).unwrap();
    let init_w = sorted_weights(&init);
    assert_ne!(init_w, dev_w);

    let (done, _, _) = train_update(&res_dir, UpdatePath::Device, Some(3), false);
    assert!(!done);
    let (done, res_loss, res_w) = train_update(&res_dir, UpdatePath::Device, None, true);
    assert!(done);
    assert_eq!(dev_loss, res_loss);
    assert_eq!(dev_w, res_w);
    for d in [host_dir, dev_dir, res_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Ten optimiser steps of two micro-batches on `routing_path`: the metric records, the
/// routing statistics of the last step, and the host reads of each step (from one step's
/// first batch to the next's; the last step up to the end of training).
fn train_counted(
    routing_path: &str,
) -> (Vec<serde_json::Value>, mor_router::RouterStats, Vec<u64>) {
    train_counted_with(&format!("ec-{routing_path}"), cfg(routing_path))
}

/// [`train_counted`] of config `c`.
fn train_counted_with(
    tag: &str,
    mut c: ResolvedConfig,
) -> (Vec<serde_json::Value>, mor_router::RouterStats, Vec<u64>) {
    let out = dir(&format!("count-{tag}"));
    c.train.steps = 10;
    let model = mor_models::model::MorModel::new(&c).unwrap();
    let settings = mor_models::run::train_settings(&c, &opts(&out));
    assert_eq!(
        (
            settings.steps,
            settings.batch_seqs / settings.micro_batch_seqs
        ),
        (10, 2)
    );
    let mut data = Batches {
        t: 16,
        ..Default::default()
    };
    let summary = mor_models::train::train_with(
        &model,
        &mut data,
        &settings,
        &out,
        false,
        1.0,
        mor_models::optim::UpdatePath::Auto,
    )
    .unwrap();
    let end = mor_kernels::host_sync::snapshot().reads;
    let firsts: Vec<u64> = data.reads.iter().step_by(2).copied().chain([end]).collect();
    let per_step = firsts.windows(2).map(|w| w[1] - w[0]).collect();
    let records = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for timing in ["tokens_per_sec", "elapsed"] {
                v.as_object_mut().unwrap().remove(timing);
            }
            v
        })
        .collect();
    let _ = std::fs::remove_dir_all(&out);
    (records, summary.router_stats.unwrap(), per_step)
}

/// A training step on the device routing path reads the host exactly once: the loss, the
/// CE, the gradient norm and the router's logged terms and statistics of both
/// micro-batches come in one read. Every logged value equals the host path's: loss, CE,
/// gradient norm and router terms bit for bit (the same scalar tensors, summed over the
/// micro-batches in the same order on the host), the routing statistics exactly except the
/// gate sums, which the device sums in another order (f64 sums of the same f32 gates,
/// equal to 1e-12 relative).
#[test]
fn a_device_path_training_step_reads_the_host_once_and_logs_what_the_host_path_logs() {
    let (host_log, host_stats, host_reads) = train_counted("host");
    let (dev_log, dev_stats, dev_reads) = train_counted("device");
    assert_eq!(dev_reads, vec![1; 10], "host reads per step");
    assert!(host_reads.iter().all(|&n| n > 1), "{host_reads:?}");
    assert_eq!(host_log.len(), 10);
    assert_eq!(host_log, dev_log);
    let terms = &dev_log[9]["router_terms"];
    assert_eq!(terms[0][0], "bce", "{terms}");
    assert_eq!(terms[1][0], "z", "{terms}");
    let (mut x, mut y) = (host_stats, dev_stats);
    assert_eq!(
        x.tokens_per_depth.iter().sum::<u64>(),
        4 * 16,
        "last step: 4 rows of 16"
    );
    assert!(x.sampling_correct.iter().sum::<u64>() > 0);
    for (p, q) in x.gate_sum.iter().zip(&y.gate_sum) {
        assert!(*p > 0.0 && (p - q).abs() <= 1e-12 * p, "{p} vs {q}");
    }
    x.gate_sum.clear();
    y.gate_sum.clear();
    assert_eq!(x, y);
}

/// `train.update_path` reaches the trainer: `device` trains with the tensor-op AdamW (like
/// the host update within f32 rounding, the tolerance of the `train_with` test above, and
/// not bit-identical to it, so the path was taken), `auto` on the CPU is the host update
/// bit for bit.
#[test]
fn the_update_path_config_key_selects_the_adamw_update() {
    let train = |path: &str| {
        let out = dir(&format!("key-{path}"));
        let c = cfg_with("device", &format!("update_path = \"{path}\""));
        run(&c, path, &opts(&out)).unwrap();
        let got = (metric(&out, "loss"), weights(&out));
        let _ = std::fs::remove_dir_all(&out);
        got
    };
    let (host_loss, host_w) = train("host");
    let (dev_loss, dev_w) = train("device");
    assert_eq!(train("auto"), (host_loss.clone(), host_w.clone()));
    assert_eq!(host_loss.len(), 5);
    for (a, b) in host_loss.iter().zip(&dev_loss) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "loss {a} (host) vs {b} (device)"
        );
    }
    let mut worst = 0f32;
    for ((n, a), (m, b)) in host_w.iter().zip(&dev_w) {
        assert_eq!(n, m);
        for (x, y) in a.iter().zip(b) {
            let e = (x - y).abs() / x.abs().max(1e-2);
            // f32 rounding of the tensor-op update over 5 steps is about 1.2e-5 here; a
            // dropped weight decay (lr·wd·w per step) would be far over this.
            assert!(e <= 5e-5, "{n}: {x} (host) vs {y} (device)");
            worst = worst.max(e);
        }
    }
    eprintln!("worst relative weight difference: {worst:e}");
    assert!(worst > 0.0, "the device update was not taken");
}

/// Token choice on the device routing path inside the model: the depths, subsets and
/// padding are device tensors, so a forward reads the host once (its logged values and
/// depths) and a training step once; the routing, the logged values and the training
/// equal the host path's (the host path runs each step on its widest row, the device path
/// on all `L` positions with padding: the same tokens in the same order, padding apart,
/// so the logits and losses agree to f32 rounding of the products at another row count).
#[test]
fn token_choice_on_the_device_path_reads_once_and_trains_like_the_host_path() {
    let tc = |path: &str, extra: &str| {
        router_cfg(
            &format!("kind = \"token_choice\"\nrouting_path = \"{path}\"\n{extra}"),
            "",
        )
    };
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ids = common::id_tensor(3, 16, 300, 5);
    for extra in [
        "",
        "gate_intermediate = true\nrouter_func = \"sigmoid\"\nalpha = 0.1",
    ] {
        let host = mor_models::model::MorModel::new(&tc("host", extra)).unwrap();
        let dev = mor_models::model::MorModel::new(&tc("device", extra)).unwrap();
        for mode in [mor_router::RouteMode::Train, mor_router::RouteMode::Causal] {
            let a = host.forward(&ids, mode).unwrap();
            let scope = mor_kernels::host_sync::Scope::start();
            let b = dev.forward(&ids, mode).unwrap();
            assert_eq!(scope.counts().reads, 1, "{extra} {mode:?}");
            assert_eq!(a.depths, b.depths, "{extra} {mode:?}");
            for d in 1..=3u8 {
                assert!(a.depths.iter().flatten().any(|&x| x == d), "depth {d} used");
            }
            assert_eq!(a.router.terms, b.router.terms);
            for (x, y) in flat(&a.logits).iter().zip(flat(&b.logits)) {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                    "{extra}: logits {x} vs {y}"
                );
            }
            let (mut x, mut y) = (a.router.stats.clone(), b.router.stats.clone());
            for (p, q) in x
                .gate_sum
                .iter()
                .zip(&y.gate_sum)
                .chain(x.prob_sum.iter().zip(&y.prob_sum))
            {
                assert!((p - q).abs() <= 1e-9 * p.abs().max(1.0), "{p} vs {q}");
            }
            for s in [&mut x, &mut y] {
                s.gate_sum.clear();
                s.prob_sum.clear();
            }
            assert_eq!(x, y, "{extra} {mode:?}");
        }
        // A depth cap finishes every running token at the cap on both paths.
        host.set_max_depth(Some(2)).unwrap();
        dev.set_max_depth(Some(2)).unwrap();
        let a = host.forward(&ids, mor_router::RouteMode::Causal).unwrap();
        let b = dev.forward(&ids, mor_router::RouteMode::Causal).unwrap();
        assert_eq!(a.depths, b.depths);
        assert!(a.depths.iter().flatten().all(|&d| (1..=2).contains(&d)));
        assert!(a.depths.iter().flatten().any(|&d| d == 2));
        for (x, y) in flat(&a.logits).iter().zip(flat(&b.logits)) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "capped: {x} vs {y}"
            );
        }
    }
    let (host_log, _, host_reads) = train_counted_with("tc-host", tc("host", ""));
    let (dev_log, _, dev_reads) = train_counted_with("tc-device", tc("device", ""));
    assert_eq!(dev_reads, vec![1; 10], "host reads per step");
    assert!(host_reads.iter().all(|&n| n > 1), "{host_reads:?}");
    assert_eq!(host_log.len(), 10);
    for (a, b) in host_log.iter().zip(&dev_log) {
        for key in ["loss", "ce", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs(), "{key}: {x} vs {y}");
        }
        // Every router term, by name and value (a micro-batch's value dropped or counted
        // twice would move it by half).
        let terms = |r: &serde_json::Value| -> Vec<(String, f64)> {
            r["router_terms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t[0].as_str().unwrap().to_string(), t[1].as_f64().unwrap()))
                .collect()
        };
        let (ta, tb) = (terms(a), terms(b));
        assert!(!ta.is_empty());
        assert_eq!(ta.len(), tb.len());
        for ((n, x), (m, y)) in ta.iter().zip(&tb) {
            assert_eq!(n, m);
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-6), "{n}: {x} vs {y}");
        }
    }
}

/// `train.update_path = "host"` with parameters the host update cannot take (f64 here, a
/// GPU in a real run) is refused before the first step, naming the key.
#[test]
fn a_host_update_path_for_parameters_off_the_f32_cpu_is_refused_before_training() {
    let out = dir("host-f64");
    let c = cfg("host");
    let model = mor_models::model::MorModel::new_with(
        &c,
        candle_core::DType::F64,
        candle_core::Device::Cpu,
    )
    .unwrap();
    let settings = mor_models::run::train_settings(&c, &opts(&out));
    let mut data = Batches {
        t: 16,
        ..Default::default()
    };
    let e = mor_models::train::train_with(
        &model,
        &mut data,
        &settings,
        &out,
        false,
        1.0,
        mor_models::optim::UpdatePath::Host,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.update_path") && e.contains("F64"), "{e}");
    assert!(data.reads.is_empty(), "no batch was drawn");
    assert!(!out.exists(), "the refused run left no folder");
    let _ = std::fs::remove_dir_all(&out);
}
