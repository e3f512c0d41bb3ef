//! The device decode path (weights and the paged KV pool as candle tensors on the model's
//! device, decode attention through `paged_decode_attention`), run here on `Device::Cpu`:
//! the same code a CUDA device runs. Its logits match the host path's, its batched engine
//! reproduces decoding each request alone on the device path token for token, and what it
//! does not cover is refused with an error naming it.

mod common;

use common::VANILLA;
use mor_core::config::ResolvedConfig;
use mor_models::engine::{
    Batching, DecodeOptions, Decoder, Engine, EngineConfig, KvPrecision, Precision, Request,
};
use mor_models::MorModel;

const VOCAB: usize = common::ENGINE_VOCAB;
const CONTEXT: usize = common::ENGINE_CONTEXT;

/// The shared micro model of the engine tests (`common::engine_micro`).
fn cfg(recursion: &str, extra: &str) -> ResolvedConfig {
    common::engine_micro(recursion, extra)
}

fn mor(router: &str, kv: &str) -> ResolvedConfig {
    common::engine_mor(router, kv)
}

fn recursive(kv: &str) -> ResolvedConfig {
    cfg(
        "num_recursions = 3\nsharing = { kind = \"middle_cycle\" }",
        &format!("[kv]\nkind = \"{kv}\""),
    )
}

/// The models the device path covers: vanilla, vanilla with shared K/V, the recursive
/// baseline (no router) under both caches, expert-choice and token-choice MoR.
fn cases() -> Vec<(&'static str, ResolvedConfig)> {
    vec![
        ("vanilla", cfg(VANILLA, "")),
        (
            "vanilla-kv/cycle2",
            cfg(
                VANILLA,
                "[kv]\nkind = \"recursive_sharing\"\nshare_pattern = \"cycle\"\nshare_loops = 2",
            ),
        ),
        ("recursive/recursion_wise", recursive("recursion_wise")),
        (
            "recursive/recursive_sharing",
            recursive("recursive_sharing"),
        ),
        (
            "expert/recursion_wise",
            mor("kind = \"expert_choice\"", "recursion_wise"),
        ),
        (
            "expert/recursive_sharing",
            mor("kind = \"expert_choice\"", "recursive_sharing"),
        ),
        (
            "token/recursion_wise",
            mor("kind = \"token_choice\"", "recursion_wise"),
        ),
        (
            "token/recursive_sharing",
            mor("kind = \"token_choice\"", "recursive_sharing"),
        ),
        (
            "token/gate-intermediate",
            mor(
                "kind = \"token_choice\"\ngate_intermediate = true",
                "recursion_wise",
            ),
        ),
        // Per-slot norms: one block call mixes norm groups (split and put back in order).
        (
            "expert/no-ln-share",
            cfg(
                "num_recursions = 3\nsharing = { kind = \"middle_cycle\" }\nln_share = false",
                "[router]\nkind = \"expert_choice\"\n[kv]\nkind = \"recursion_wise\"",
            ),
        ),
        // A non-cyclic plan: one stage of every recursion slot.
        (
            "recursive-sequence",
            cfg(
                "num_recursions = 2\nsharing = { kind = \"sequence\" }",
                "[kv]\nkind = \"recursion_wise\"",
            ),
        ),
    ]
}

fn link() {
    let _ = mor_models::builtin::link();
}

/// Largest absolute difference.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Decodes `ids` with a host and a device decoder (block size 2: every request spans
/// several blocks) and returns the largest logit difference and the largest host logit;
/// the depths must agree.
fn decoder_gap(model: &MorModel, ids: &[u32], opts: &DecodeOptions, name: &str) -> (f32, f32) {
    let mut host = Decoder::new(model, opts.clone()).unwrap();
    let mut dev = Decoder::new_device(model, opts.clone()).unwrap();
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (i, &t) in ids.iter().enumerate() {
        let a = host.step(t).unwrap();
        let b = dev.step(t).unwrap();
        assert_eq!(a.depth, b.depth, "{name}: depth at position {i}");
        assert!(b.logits.iter().all(|x| x.is_finite()), "{name}");
        worst = worst.max(max_diff(&a.logits, &b.logits));
        scale = a.logits.iter().fold(scale, |m, x| m.max(x.abs()));
    }
    (worst, scale)
}

#[test]
fn device_decoder_logits_match_the_host_decoder() {
    link();
    let ids = common::random_ids(CONTEXT, VOCAB, 3);
    for (name, c) in cases() {
        let model = MorModel::new(&c).unwrap();
        let f32_opts = DecodeOptions {
            block_tokens: 2,
            ..Default::default()
        };
        let (gap, _) = decoder_gap(&model, &ids, &f32_opts, name);
        assert!(gap < 1e-4, "{name}: f32 logits differ by {gap}");
        // bf16 weights and bf16 K/V: both paths round the products' inputs and the stored
        // K/V to bf16 (the device path also rounds each layer product's output, the queries
        // and the attention output; its LM head, like the host's, returns f32): a few percent of the logits' scale (bf16's 2^-8 per product
        // through 8 layers and the head), not O(1) as a wrong product or KV row would.
        let bf16_opts = DecodeOptions {
            precision: Precision::Bf16,
            kv_precision: KvPrecision::Bf16,
            ..f32_opts
        };
        let (gap, scale) = decoder_gap(&model, &ids, &bf16_opts, name);
        assert!(
            gap < 0.05 * scale,
            "{name}: bf16 logits differ by {gap} (scale {scale})"
        );
    }
}

/// Each request alone with a device decoder.
fn sequential_device(
    model: &MorModel,
    reqs: &[Request],
    opts: &DecodeOptions,
) -> Vec<(Vec<u32>, Vec<u8>)> {
    common::decode_each_on(model, reqs, opts, true)
}

fn run_device_engine(
    model: &MorModel,
    reqs: &[Request],
    ecfg: EngineConfig,
) -> (Vec<(Vec<u32>, Vec<u8>)>, mor_models::engine::EngineStats) {
    let mut engine = Engine::new_device(model, ecfg).unwrap();
    assert!(engine.on_device());
    for rq in reqs {
        engine.submit(rq.clone()).unwrap();
    }
    let done = engine.run_to_completion().unwrap();
    assert_eq!(done.len(), reqs.len());
    for c in &done {
        assert!(
            !matches!(c.finish, mor_models::engine::FinishReason::Error(_)),
            "request {} failed: {:?}",
            c.id,
            c.finish
        );
    }
    // Every block is back on the free list.
    assert_eq!(engine.cache().free_blocks(), engine.cache().total_blocks());
    (
        done.into_iter().map(|c| (c.tokens, c.depths)).collect(),
        engine.stats().clone(),
    )
}

#[test]
fn device_engine_batched_equals_sequential_device_decoding() {
    link();
    let reqs = common::requests(9, VOCAB, 11);
    for (name, c) in cases() {
        let model = MorModel::new(&c).unwrap();
        let want = sequential_device(&model, &reqs, &DecodeOptions::default());
        // The device path gives the host path's greedy tokens in f32.
        assert_eq!(
            want,
            common::decode_each(&model, &reqs, &DecodeOptions::default()),
            "{name}: device and host decoding differ"
        );
        for (batch, block_tokens, exit_batch) in [(1, 4, 1), (3, 2, 1), (8, 2, 1), (8, 3, 5)] {
            for batching in [Batching::DepthWise, Batching::SequenceWise] {
                let ecfg = EngineConfig {
                    batch_size: batch,
                    block_tokens,
                    batching,
                    exit_batch,
                    ..Default::default()
                };
                let (got, stats) = run_device_engine(&model, &reqs, ecfg.clone());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g, w,
                        "{name}, batch {batch}, block {block_tokens}, {batching:?}: request {i} differs"
                    );
                }
                // The device cache keeps the host cache's books: the same K/V entries.
                let (_, host_stats) = common::run_engine(&model, &reqs, ecfg);
                assert_eq!(
                    stats.kv_bytes_finished, host_stats.kv_bytes_finished,
                    "{name}"
                );
                assert_eq!(stats.depth_histogram, host_stats.depth_histogram, "{name}");
                assert_eq!(stats.linear_flops, host_stats.linear_flops, "{name}");
                assert_eq!(stats.attention_flops, host_stats.attention_flops, "{name}");
            }
        }
    }
}

#[test]
fn device_engine_in_bf16_equals_sequential_bf16_device_decoding() {
    link();
    let reqs = common::requests(7, VOCAB, 5);
    for (name, c) in [
        ("vanilla", cfg(VANILLA, "")),
        (
            "expert/recursion_wise",
            mor("kind = \"expert_choice\"", "recursion_wise"),
        ),
    ] {
        let model = MorModel::new(&c).unwrap();
        let opts = DecodeOptions {
            precision: Precision::Bf16,
            kv_precision: KvPrecision::Bf16,
            ..Default::default()
        };
        let want = sequential_device(&model, &reqs, &opts);
        for batch in [3, 8] {
            let ecfg = EngineConfig {
                batch_size: batch,
                block_tokens: 2,
                precision: Precision::Bf16,
                kv_precision: KvPrecision::Bf16,
                ..Default::default()
            };
            let (got, stats) = run_device_engine(&model, &reqs, ecfg);
            assert_eq!(got, want, "{name}, batch {batch}");
            // bf16 K/V: 2 bytes per stored element.
            let m = &c.model;
            let per_pos = stats.kv_bytes_finished as f64 / stats.kv_positions_finished as f64;
            let max_per_pos =
                (model.plan().num_slots() * 2 * m.num_kv_heads * m.head_dim * 2) as f64;
            assert!(per_pos > 0.0 && per_pos <= max_per_pos, "{name}: {per_pos}");
        }
    }
}

#[test]
fn the_device_path_refuses_what_it_does_not_cover() {
    link();
    let err = |r: Result<Engine<'_>, mor_models::Error>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // A relaxation (LoRA on the recursion block).
    let lora = cfg(
        "num_recursions = 3\nsharing = { kind = \"middle_cycle\" }\nrelaxation = { kind = \"lora\", rank = 2, alpha = 3.0, targets = [\"q_proj\"] }",
        "",
    );
    let model = MorModel::new(&lora).unwrap();
    let e = err(Engine::new_device(&model, EngineConfig::default()));
    assert!(e.contains("relaxation"), "{e}");
    // The host path still serves it.
    assert!(Engine::new(&model, EngineConfig::default()).is_ok());
    // The hybrid KV policy (its overlay view has no paged kernel).
    let model = MorModel::new(&recursive("hybrid")).unwrap();
    let e = err(Engine::new_device(&model, EngineConfig::default()));
    assert!(e.contains("hybrid"), "{e}");
    assert!(Decoder::new_device(&model, DecodeOptions::default()).is_err());
    // The device cache has no host view: an error, not a panic.
    let model = MorModel::new(&cfg(VANILLA, "")).unwrap();
    let engine = Engine::new_device(&model, EngineConfig::default()).unwrap();
    assert!(!engine.cache().writes(usize::MAX));
    let host = Engine::new(&model, EngineConfig::default()).unwrap();
    assert!(!host.on_device());
    let mut dev = Decoder::new_device(&model, DecodeOptions::default()).unwrap();
    dev.step(1).unwrap();
    let e = dev.cache().view(0, 0).unwrap_err().to_string();
    assert!(e.contains("no host view"), "{e}");
}

/// Host reads per decoded token on the device path (counted by `mor_kernels::host_sync`):
/// one per phase with layers (prelude, each recursion step, coda) and one for the logits;
/// the engine reads once per phase whatever its batch.
#[test]
fn the_device_path_reads_once_per_phase() {
    use mor_core::plan::Segment;
    use mor_kernels::host_sync::Scope;
    link();
    for (name, c) in [
        ("vanilla", cfg(VANILLA, "")),
        ("recursive/recursion_wise", recursive("recursion_wise")),
    ] {
        let model = MorModel::new(&c).unwrap();
        let plan = model.plan();
        let has = |seg: Segment| plan.slots.iter().any(|s| s.segment == seg);
        let want = has(Segment::Prelude) as u64
            + plan.num_recursions as u64
            + has(Segment::Coda) as u64
            + 1;
        let mut dev = Decoder::new_device(&model, DecodeOptions::default()).unwrap();
        let mut host = Decoder::new(&model, DecodeOptions::default()).unwrap();
        for t in [1u32, 2, 3] {
            let s = Scope::start();
            dev.step(t).unwrap();
            assert_eq!(s.counts().reads, want, "{name}: device reads per token");
            let s = Scope::start();
            host.step(t).unwrap();
            assert_eq!(s.counts().reads, 0, "{name}: the host path reads no tensor");
        }
        // Batched: one read per layer phase and per LM-head call, not per item.
        let reqs = common::requests(8, VOCAB, 2);
        let s = Scope::start();
        let (_, stats) = run_device_engine(
            &model,
            &reqs,
            EngineConfig {
                batch_size: 8,
                ..Default::default()
            },
        );
        let reads = s.counts().reads;
        let tokens: u64 = reqs
            .iter()
            .map(|r| (r.prompt.len() + r.max_new_tokens) as u64)
            .sum();
        assert!(
            reads >= stats.block_calls,
            "{name}: {reads} < {}",
            stats.block_calls
        );
        // Per exit call at most a coda and a head read, and the prelude of the next tokens
        // (one more prelude call admits the first tokens).
        assert!(
            reads <= stats.block_calls + 3 * stats.exit_calls + 1,
            "{name}: {reads} reads for {} block and {} exit calls",
            stats.block_calls,
            stats.exit_calls
        );
        assert!(
            reads < tokens * want / 2,
            "{name}: {reads} reads for {tokens} tokens"
        );
    }
}

/// Calibrated exits (`ExitRule::GateThresholds`, what `bench infer` uses) with the gate
/// trace: the device engine gives the host engine's tokens, depths and gates; also with the
/// expert-choice router's device path (`routing_path = "device"`: radix top-k, index_add,
/// the f64 sums; what a CUDA model takes), whose gates equal the host routing's.
#[test]
fn gate_threshold_exits_match_the_host_engine() {
    use mor_models::engine::ExitRule;
    link();
    let model = MorModel::new(&mor("kind = \"expert_choice\"", "recursion_wise")).unwrap();
    let device_routed = MorModel::new(&mor(
        "kind = \"expert_choice\"\nrouting_path = \"device\"",
        "recursion_wise",
    ))
    .unwrap();
    // The median gate of steps 2 and 3 at full depth: about half the tokens leave.
    let mut dec = Decoder::new(
        &model,
        DecodeOptions {
            exit: ExitRule::GateThresholds(vec![f64::NEG_INFINITY; 3]),
            ..Default::default()
        },
    )
    .unwrap();
    let mut gates = [Vec::new(), Vec::new()];
    for t in common::random_ids(CONTEXT, VOCAB, 21) {
        let s = dec.step(t).unwrap();
        gates[0].push(s.gates[1] as f64);
        gates[1].push(s.gates[2] as f64);
    }
    let median = |g: &mut Vec<f64>| {
        g.sort_by(f64::total_cmp);
        g[g.len() / 2]
    };
    let th = vec![
        f64::NEG_INFINITY,
        median(&mut gates[0]),
        median(&mut gates[1]),
    ];
    let reqs = common::requests(8, VOCAB, 13);
    let ecfg = EngineConfig {
        batch_size: 4,
        block_tokens: 2,
        exit: ExitRule::GateThresholds(th),
        record_gates: true,
        ..Default::default()
    };
    let run = |model: &MorModel, device: bool| {
        let mut e = if device {
            Engine::new_device(model, ecfg.clone()).unwrap()
        } else {
            Engine::new(model, ecfg.clone()).unwrap()
        };
        for rq in &reqs {
            e.submit(rq.clone()).unwrap();
        }
        let done = e.run_to_completion().unwrap();
        let out: Vec<(Vec<u32>, Vec<u8>)> =
            done.into_iter().map(|c| (c.tokens, c.depths)).collect();
        (
            out,
            e.gate_trace().to_vec(),
            e.stats().depth_histogram.clone(),
        )
    };
    let (host, host_gates, hist) = run(&model, false);
    assert!(
        hist[1] > 0 && hist[3] > 0,
        "exits at several depths: {hist:?}"
    );
    for (name, m) in [("host routing", &model), ("device routing", &device_routed)] {
        let (dev, dev_gates, dev_hist) = run(m, true);
        assert_eq!(dev, host, "{name}");
        assert_eq!(dev_hist, hist, "{name}");
        assert_eq!(dev_gates.len(), host_gates.len(), "{name}");
        for (a, b) in dev_gates.iter().zip(&host_gates) {
            assert_eq!((a.id, a.pos, a.step), (b.id, b.pos, b.step), "{name}");
            assert!((a.gate - b.gate).abs() < 1e-5, "{name}: {a:?} vs {b:?}");
        }
    }
}

/// KV back-pressure and preemption on the device path (a pool far smaller than the batch
/// needs): the engine stalls and preempts, every request still gets the tokens of decoding
/// it alone on the device path, and every block comes back.
#[test]
fn device_kv_back_pressure_and_preemption_keep_outputs_exact() {
    link();
    let model = MorModel::new(&mor("kind = \"expert_choice\"", "recursion_wise")).unwrap();
    let reqs = common::requests(8, VOCAB, 11);
    let want = sequential_device(&model, &reqs, &DecodeOptions::default());
    // 8 storing slots, blocks of 2 tokens: 72 blocks hold far less than 8 concurrent
    // requests.
    let ecfg = EngineConfig {
        batch_size: 8,
        block_tokens: 2,
        kv_blocks: 72,
        ..Default::default()
    };
    // `run_device_engine` also checks free_blocks == total_blocks at the end.
    let (got, stats) = run_device_engine(&model, &reqs, ecfg);
    assert_eq!(got, want);
    assert!(
        stats.stalls > 0 && stats.preemptions > 0,
        "the small pool never pushed back: {stats:?}"
    );
}

/// bf16 weights: the LM head's product returns f32 (its inputs rounded to bf16, as the host
/// path's are), so the logits are not bf16 values (bf16 logits would tie often under
/// greedy choice); the layers' products are bf16.
#[test]
fn bf16_logits_are_an_f32_product() {
    use candle_core::{DType, Device, Tensor};
    link();
    let model = MorModel::new(&cfg(VANILLA, "")).unwrap();
    let opts = DecodeOptions {
        precision: Precision::Bf16,
        ..Default::default()
    };
    let mut dev = Decoder::new_device(&model, opts.clone()).unwrap();
    let mut host = Decoder::new(&model, opts).unwrap();
    for t in [1u32, 7, 9] {
        let a = dev.step(t).unwrap().logits;
        let b = host.step(t).unwrap().logits;
        let rounded = Tensor::from_slice(&a, a.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let off_grid = a.iter().zip(&rounded).filter(|(x, r)| x != r).count();
        assert!(
            off_grid > a.len() / 2,
            "{off_grid} of {} logits are not bf16 values",
            a.len()
        );
        assert!(max_diff(&a, &b) < 0.05 * b.iter().fold(1f32, |m, x| m.max(x.abs())));
    }
}

/// The logits of each sampled token, by (request, position), from a device engine run.
fn device_logits(
    model: &MorModel,
    reqs: &[Request],
    ecfg: EngineConfig,
) -> std::collections::BTreeMap<(u64, u32), Vec<f32>> {
    let mut engine = Engine::new_device(model, ecfg).unwrap();
    engine.record_logits(true);
    for rq in reqs {
        engine.submit(rq.clone()).unwrap();
    }
    engine.run_to_completion().unwrap();
    // A preempted request may be traced twice; its replay recomputes the same bits, so the
    // last entry of a key stands for both.
    engine
        .logit_trace()
        .iter()
        .map(|(id, pos, l)| ((*id, *pos), l.clone()))
        .collect()
}

/// Batch invariance to the bit: every product of the device path has one fixed number of
/// rows (`PRODUCT_ROWS`), so a token's logits are the same bits whether it is decoded alone
/// (batch 1) or among others (batch 8, mixed depths), in f32 and with bf16 weights and K/V.
/// Products of the batch's own height round some rows differently (about 1e-5 here), which
/// would leave a near-tie to decide a greedy token differently on a GPU.
#[test]
fn device_logits_are_the_same_bits_at_every_batch_size() {
    link();
    let reqs = common::requests(9, VOCAB, 11);
    let picked = [
        "vanilla",
        "expert/recursion_wise",
        "token/recursive_sharing",
    ];
    for (name, c) in cases().into_iter().filter(|(n, _)| picked.contains(n)) {
        let model = MorModel::new(&c).unwrap();
        for (precision, kv_precision) in [
            (Precision::F32, KvPrecision::F32),
            (Precision::Bf16, KvPrecision::Bf16),
        ] {
            let run = |batch_size: usize| {
                device_logits(
                    &model,
                    &reqs,
                    EngineConfig {
                        batch_size,
                        block_tokens: 4,
                        precision,
                        kv_precision,
                        ..Default::default()
                    },
                )
            };
            let alone = run(1);
            let batched = run(8);
            assert_eq!(alone.len(), batched.len(), "{name} {precision:?}");
            assert!(!alone.is_empty(), "{name}: no logits were recorded");
            for (key, a) in &alone {
                let b = &batched[key];
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{name} {precision:?}: logits of request {} at position {} differ between \
                     batch 1 and batch 8 (largest gap {})",
                    key.0,
                    key.1,
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max)
                );
            }
        }
    }
}
