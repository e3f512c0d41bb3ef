//! Decoding with bf16 packed weights: the batched engine still equals decoding each request
//! alone, token for token (the bf16 products are batch-invariant too), and bf16 logits stay
//! within bf16's rounding of the f32 logits.

mod common;

use common::VANILLA;
use mor_core::config::ResolvedConfig;
use mor_models::engine::{
    Batching, DecodeOptions, Decoder, EngineConfig, ExitRule, KvPrecision, Precision, Request,
    SamplingParams,
};
use mor_models::MorModel;

const VOCAB: usize = common::ENGINE_VOCAB;

/// The shared micro model of the engine tests (`common::engine_micro`).
fn cfg(recursion: &str, extra: &str) -> ResolvedConfig {
    common::engine_micro(recursion, extra)
}

fn mor(router: &str, kv: &str) -> ResolvedConfig {
    common::engine_mor(router, kv)
}

fn link() {
    let _ = mor_models::builtin::link();
}

fn requests(n: usize, seed: u64) -> Vec<Request> {
    common::requests(n, VOCAB, seed)
}

/// Each request alone with the plain decoder, in `precision` (f32 KV cache).
fn sequential(
    model: &MorModel,
    reqs: &[Request],
    precision: Precision,
) -> Vec<(Vec<u32>, Vec<u8>)> {
    sequential_kv(model, reqs, precision, KvPrecision::F32)
}

/// Each request alone with the plain decoder, in `precision`, with a `kv` cache.
fn sequential_kv(
    model: &MorModel,
    reqs: &[Request],
    precision: Precision,
    kv: KvPrecision,
) -> Vec<(Vec<u32>, Vec<u8>)> {
    let opts = DecodeOptions {
        precision,
        kv_precision: kv,
        ..Default::default()
    };
    common::decode_each(model, reqs, &opts)
}

fn run_engine(model: &MorModel, reqs: &[Request], ecfg: EngineConfig) -> Vec<(Vec<u32>, Vec<u8>)> {
    common::run_engine(model, reqs, ecfg).0
}

#[test]
fn bf16_batched_engine_equals_sequential_bf16_decoding() {
    link();
    let configs = [
        (
            "expert/recursion_wise",
            mor("kind = \"expert_choice\"", "recursion_wise"),
        ),
        (
            "token/recursive_sharing",
            mor("kind = \"token_choice\"", "recursive_sharing"),
        ),
        ("vanilla", cfg(VANILLA, "")),
    ];
    // Sampled at a high temperature: the draws are sensitive to the small bf16 changes of
    // the logits, so f32 decoding would not reproduce these tokens.
    let mut reqs = requests(9, 7);
    for (i, r) in reqs.iter_mut().enumerate() {
        r.sampling = SamplingParams {
            temperature: 2.0,
            top_k: 0,
            top_p: 1.0,
            seed: 40 + i as u64,
        };
    }
    for (name, c) in configs {
        let model = MorModel::new(&c).unwrap();
        let want = sequential(&model, &reqs, Precision::Bf16);
        assert_ne!(want, sequential(&model, &reqs, Precision::F32), "{name}");
        for (batch, exit_batch) in [(1, 1), (3, 1), (8, 1), (8, 5)] {
            for batching in [Batching::DepthWise, Batching::SequenceWise] {
                let ecfg = EngineConfig {
                    batch_size: batch,
                    block_tokens: 4,
                    batching,
                    exit_batch,
                    precision: Precision::Bf16,
                    ..Default::default()
                };
                let got = run_engine(&model, &reqs, ecfg);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g, w,
                        "{name}, batch {batch}, {batching:?}: request {i} differs"
                    );
                }
            }
        }
    }
}

/// With the KV cache in bf16 as well (K and V rounded on write), batched decoding still
/// equals sequential decoding token for token, and the bf16 cache moves the logits by
/// rounding only (so the option reaches the cache).
#[test]
fn bf16_kv_cache_batched_engine_equals_sequential_decoding() {
    link();
    let mut reqs = requests(6, 11);
    for (i, r) in reqs.iter_mut().enumerate() {
        r.sampling = SamplingParams {
            temperature: 2.0,
            top_k: 0,
            top_p: 1.0,
            seed: 70 + i as u64,
        };
    }
    for (name, c) in [
        (
            "expert/recursion_wise",
            mor("kind = \"expert_choice\"", "recursion_wise"),
        ),
        ("vanilla", cfg(VANILLA, "")),
    ] {
        let model = MorModel::new(&c).unwrap();
        let want = sequential_kv(&model, &reqs, Precision::Bf16, KvPrecision::Bf16);
        // The option reaches the cache: teacher-forced logits move, by rounding only.
        let logits = |kv| {
            let mut dec = Decoder::new(
                &model,
                DecodeOptions {
                    precision: Precision::Bf16,
                    kv_precision: kv,
                    ..Default::default()
                },
            )
            .unwrap();
            (0..12u32)
                .flat_map(|t| dec.step(t * 5 % 64).unwrap().logits)
                .collect::<Vec<f32>>()
        };
        let (a, b) = (logits(KvPrecision::F32), logits(KvPrecision::Bf16));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff > 0.0 && diff < 0.05 * scale,
            "{name}: bf16 KV moved the logits by {diff} (scale {scale})"
        );
        for batch in [3, 8] {
            let ecfg = EngineConfig {
                batch_size: batch,
                block_tokens: 4,
                precision: Precision::Bf16,
                kv_precision: KvPrecision::Bf16,
                ..Default::default()
            };
            assert_eq!(
                run_engine(&model, &reqs, ecfg),
                want,
                "{name}, batch {batch}"
            );
        }
    }
}

/// The logits of a teacher-forced prefix in bf16 against f32: every product rounds its two
/// inputs to 8 significant bits (relative error at most 2⁻⁸ per product, about 0.4%), so
/// through 8 layers and the head a logit moves by a few percent of the logits' scale
/// (measured: 2.0% for vanilla, 1.0% for MoR), not by O(1) as a wrong product would.
#[test]
fn bf16_logits_stay_within_bf16_rounding_of_f32() {
    link();
    for (name, c) in [
        ("vanilla", cfg(VANILLA, "")),
        ("expert", mor("kind = \"expert_choice\"", "recursion_wise")),
    ] {
        let model = MorModel::new(&c).unwrap();
        // Forced depths (every token runs every step): the same path in both precisions.
        let exit = if name == "vanilla" {
            ExitRule::Router
        } else {
            ExitRule::GateThresholds(vec![f64::NEG_INFINITY; 3])
        };
        let mk = |precision| {
            let opts = DecodeOptions {
                exit: exit.clone(),
                precision,
                ..Default::default()
            };
            Decoder::new(&model, opts).unwrap()
        };
        let (mut f, mut b) = (mk(Precision::F32), mk(Precision::Bf16));
        let (mut max_err, mut scale) = (0f32, 0f32);
        for &t in &common::random_ids(12, VOCAB, 3) {
            let (sf, sb) = (f.step(t).unwrap(), b.step(t).unwrap());
            assert_eq!(sf.depth, sb.depth, "{name}");
            for (x, y) in sf.logits.iter().zip(&sb.logits) {
                max_err = max_err.max((x - y).abs());
                scale = scale.max(x.abs());
            }
        }
        assert!(scale > 0.5, "{name}: logits of scale {scale}");
        assert!(max_err > 0.0, "{name}: bf16 logits equal the f32 ones");
        assert!(
            max_err <= 0.05 * scale,
            "{name}: bf16 logits differ by {max_err} (scale {scale})"
        );
        eprintln!("{name}: max |Δ logit| {max_err:.5}, scale {scale:.3}");
    }
}
