//! Inference: incremental decoding equals one causal full forward for every KV policy and
//! router (vanilla models with KV sharing included), and the batched engine (continuous
//! depth-wise batching, back-pressure, preemption) produces token for token what decoding
//! each request alone produces.

mod common;

use candle_core::{Device, Tensor};
use common::{Micro, VANILLA};
use mor_core::config::ResolvedConfig;
use mor_models::engine::{
    encode_prompt, Batching, DecodeOptions, Decoder, Engine, EngineConfig, ExitRule, FinishReason,
    Request, SamplingParams,
};
use mor_models::tokenizer::Tokenizer;
use mor_models::MorModel;
use mor_router::RouteMode;

const VOCAB: usize = 64;
const CONTEXT: usize = 24;

/// A tiny model: d = 32, 4 heads (2 KV) of 8, 8 layers, context 24. `init_std = 0.2` makes
/// logits O(1) and router logits far from the threshold, so a 1e-4 tolerance is meaningful.
fn cfg(recursion: &str, extra: &str) -> ResolvedConfig {
    Micro {
        model: "init_std = 0.2",
        runtime: &common::runtime("cpu", 5),
        tables: &format!("[recursion]\n{recursion}\n{extra}"),
        ..common::micro(VOCAB, 32, 8, CONTEXT)
    }
    .resolve()
}

fn vanilla() -> ResolvedConfig {
    cfg(VANILLA, "")
}

/// Vanilla (8 unique layers) with its K/V shared by `pattern` over `loops` layers (spec §4).
fn vanilla_kv(pattern: &str, loops: usize) -> ResolvedConfig {
    cfg(
        VANILLA,
        &format!(
            "[kv]\nkind = \"recursive_sharing\"\nshare_pattern = \"{pattern}\"\nshare_loops = {loops}"
        ),
    )
}

fn recursive(sharing: &str, n: usize, kv: &str) -> ResolvedConfig {
    cfg(
        &format!("num_recursions = {n}\nsharing = {{ kind = \"{sharing}\" }}"),
        &format!("[kv]\nkind = \"{kv}\""),
    )
}

fn mor(router: &str, kv: &str, recursion_extra: &str) -> ResolvedConfig {
    cfg(
        &format!("num_recursions = 3\nsharing = {{ kind = \"middle_cycle\" }}\n{recursion_extra}"),
        &format!("[router]\n{router}\n[kv]\nkind = \"{kv}\""),
    )
}

fn cases() -> Vec<(&'static str, ResolvedConfig)> {
    let ec = "kind = \"expert_choice\"";
    let tc = "kind = \"token_choice\"";
    vec![
        ("vanilla", vanilla()),
        ("vanilla-kv/cycle2", vanilla_kv("cycle", 2)),
        ("vanilla-kv/seq2", vanilla_kv("seq", 2)),
        ("vanilla-kv/middle_cycle3", vanilla_kv("middle_cycle", 3)),
        ("vanilla-kv/seq4", vanilla_kv("seq", 4)),
        ("recursive/recursion_wise", recursive("middle_cycle", 3, "recursion_wise")),
        ("recursive/recursive_sharing", recursive("middle_cycle", 3, "recursive_sharing")),
        ("recursive/hybrid", recursive("middle_cycle", 3, "hybrid")),
        ("recursive-sequence", recursive("sequence", 2, "recursion_wise")),
        (
            "recursive-sequence/recursive_sharing",
            recursive("sequence", 2, "recursive_sharing"),
        ),
        (
            "recursive-middle_sequence/recursive_sharing",
            recursive("middle_sequence", 3, "recursive_sharing"),
        ),
        ("expert/recursion_wise", mor(ec, "recursion_wise", "")),
        ("expert/recursive_sharing", mor(ec, "recursive_sharing", "")),
        ("expert/hybrid", mor(ec, "hybrid", "")),
        ("expert/no-ln-share", mor(ec, "recursion_wise", "ln_share = false")),
        (
            "expert/aux-router-mlp",
            mor(
                "kind = \"expert_choice\"\nsampling = \"aux_router\"\ninfer_rule = \"aux_router\"\nrouter_arch = \"mlp\"",
                "hybrid",
                "",
            ),
        ),
        ("token/recursion_wise", mor(tc, "recursion_wise", "")),
        ("token/recursive_sharing", mor(tc, "recursive_sharing", "")),
        ("token/gate-intermediate", mor("kind = \"token_choice\"\ngate_intermediate = true", "recursion_wise", "")),
    ]
}

fn random_ids(n: usize, seed: u64) -> Vec<u32> {
    let mut r = mor_core::rng::Rng::new(seed);
    (0..n).map(|_| r.below(VOCAB) as u32).collect()
}

fn link() {
    let _ = mor_models::builtin::link();
}

#[test]
fn incremental_decoding_equals_the_causal_forward() {
    link();
    for (name, c) in cases() {
        let model = MorModel::new(&c).unwrap();
        let rows = 2;
        let ids: Vec<u32> = random_ids(rows * CONTEXT, 17);
        let t = Tensor::from_vec(ids.clone(), (rows, CONTEXT), &Device::Cpu).unwrap();
        let full = model.forward(&t, RouteMode::Causal).unwrap();
        let logits = full.logits.to_vec3::<f32>().unwrap();
        let mut worst = 0f32;
        let mut spread = 0f32;
        let mut depths_seen = std::collections::BTreeSet::new();
        for row in 0..rows {
            let mut dec = Decoder::new(&model, DecodeOptions::default()).unwrap();
            for pos in 0..CONTEXT {
                let step = dec.step(ids[row * CONTEXT + pos]).unwrap();
                let want = &logits[row][pos];
                assert_eq!(step.logits.len(), VOCAB);
                for (a, b) in step.logits.iter().zip(want) {
                    worst = worst.max((a - b).abs());
                }
                spread = spread.max(want.iter().fold(0f32, |m, x| m.max(x.abs())));
                assert_eq!(
                    step.depth, full.depths[row][pos] as usize,
                    "{name}: row {row} position {pos}: decode depth {} vs forward depth {}",
                    step.depth, full.depths[row][pos]
                );
                depths_seen.insert(step.depth);
            }
            assert!(
                dec.step(0).is_err(),
                "{name}: a full context must be refused"
            );
        }
        assert!(
            worst < 1e-4,
            "{name}: max |decode - forward| logit difference {worst}"
        );
        assert!(
            spread > 0.1,
            "{name}: logits are too small ({spread}) for the comparison to mean anything"
        );
        if name.starts_with("expert") || name.starts_with("token") {
            assert!(
                depths_seen.len() >= 2,
                "{name}: every token took the same depth {depths_seen:?}; routing untested"
            );
        }
    }
}

#[test]
fn decode_caches_store_what_each_policy_promises() {
    link();
    // recursion-wise: a token stores at the prelude, the coda and each step it reaches;
    // recursive sharing: prelude, coda and step 1 only. B_d = 2 here.
    for (kv, per_depth) in [
        ("recursion_wise", [2 + 2, 2 + 4, 2 + 6]),
        ("recursive_sharing", [4, 4, 4]),
    ] {
        let model = MorModel::new(&mor("kind = \"expert_choice\"", kv, "")).unwrap();
        let mut dec = Decoder::new(&model, DecodeOptions::default()).unwrap();
        let mut want = 0;
        for &t in &random_ids(12, 3) {
            let step = dec.step(t).unwrap();
            want += per_depth[step.depth - 1];
            assert_eq!(
                dec.cache().tokens_stored(),
                want,
                "{kv}: entries after depth {}",
                step.depth
            );
        }
        let row = 2 * 8; // hkv · dh
        assert_eq!(dec.cache().bytes_stored(), want * 2 * row * 4);
    }
}

fn requests(n: usize, seed: u64) -> Vec<Request> {
    common::requests(n, VOCAB, seed)
}

/// Generates each request alone with the plain decoder.
fn sequential(model: &MorModel, reqs: &[Request], exit: &ExitRule) -> Vec<(Vec<u32>, Vec<u8>)> {
    let opts = DecodeOptions {
        exit: exit.clone(),
        ..Default::default()
    };
    common::decode_each(model, reqs, &opts)
}

use common::run_engine;

#[test]
fn depthwise_batched_engine_equals_sequential_greedy_decoding() {
    link();
    let configs = [
        (
            "expert/recursion_wise",
            mor("kind = \"expert_choice\"", "recursion_wise", ""),
        ),
        (
            "expert/hybrid",
            mor("kind = \"expert_choice\"", "hybrid", ""),
        ),
        (
            "token/recursive_sharing",
            mor("kind = \"token_choice\"", "recursive_sharing", ""),
        ),
        ("vanilla", vanilla()),
        ("vanilla-kv/cycle2", vanilla_kv("cycle", 2)),
        ("vanilla-kv/seq2", vanilla_kv("seq", 2)),
        (
            "recursive-sequence",
            recursive("sequence", 2, "recursion_wise"),
        ),
        (
            "recursive-sequence/recursive_sharing",
            recursive("sequence", 2, "recursive_sharing"),
        ),
    ];
    let reqs = requests(9, 7);
    for (name, c) in configs {
        let model = MorModel::new(&c).unwrap();
        let want = sequential(&model, &reqs, &ExitRule::Router);
        for (batch, exit_batch) in [(1, 1), (3, 1), (8, 1), (8, 5)] {
            for batching in [Batching::DepthWise, Batching::SequenceWise] {
                let ecfg = EngineConfig {
                    batch_size: batch,
                    block_tokens: 4,
                    batching,
                    exit_batch,
                    ..Default::default()
                };
                let (got, stats) = run_engine(&model, &reqs, ecfg);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g, w,
                        "{name}, batch {batch}, {batching:?}: request {i} (tokens, depths) differ"
                    );
                }
                let total: usize = reqs.iter().map(|r| r.max_new_tokens).sum();
                assert_eq!(stats.tokens_generated as usize, total);
                if name.starts_with("expert") && batch == 8 && batching == Batching::DepthWise {
                    assert!(
                        stats.mixed_depth_calls > 0,
                        "{name}: no block call mixed depths: {stats:?}"
                    );
                }
                if batching == Batching::SequenceWise {
                    assert_eq!(
                        stats.mixed_depth_calls, 0,
                        "{name}: sequence-wise batching mixed depths"
                    );
                }
            }
        }
    }
}

#[test]
fn sampled_generation_is_seeded_and_matches_sequential() {
    link();
    let model = MorModel::new(&mor("kind = \"expert_choice\"", "recursion_wise", "")).unwrap();
    let mut reqs = requests(5, 9);
    for (i, r) in reqs.iter_mut().enumerate() {
        r.sampling = SamplingParams {
            temperature: 1.3,
            top_k: 20,
            top_p: 0.9,
            seed: 40 + i as u64,
        };
    }
    let want = sequential(&model, &reqs, &ExitRule::Router);
    let (got, _) = run_engine(
        &model,
        &reqs,
        EngineConfig {
            batch_size: 3,
            ..Default::default()
        },
    );
    assert_eq!(got, want);
    let greedy: Vec<_> = requests(5, 9);
    let g = sequential(&model, &greedy, &ExitRule::Router);
    assert_ne!(
        g.iter().map(|x| &x.0).collect::<Vec<_>>(),
        want.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
}

#[test]
fn kv_back_pressure_and_preemption_keep_outputs_exact() {
    link();
    let model = MorModel::new(&mor("kind = \"expert_choice\"", "recursion_wise", "")).unwrap();
    let reqs = requests(8, 11);
    let want = sequential(&model, &reqs, &ExitRule::Router);
    // 8 storing slots, blocks of 2 tokens: the longest request (16 tokens) needs at most 64
    // blocks alone; 72 blocks hold far less than 8 concurrent requests.
    let ecfg = EngineConfig {
        batch_size: 8,
        block_tokens: 2,
        kv_blocks: 72,
        ..Default::default()
    };
    let (got, stats) = run_engine(&model, &reqs, ecfg);
    assert_eq!(got, want);
    assert!(
        stats.stalls > 0 && stats.preemptions > 0,
        "the small pool never pushed back: {stats:?}"
    );
}

#[test]
fn a_request_too_large_for_the_pool_fails_alone() {
    link();
    let model = MorModel::new(&vanilla()).unwrap();
    // Vanilla: 8 storing slots. 16 blocks of 4 tokens: 8 tokens per slot at most.
    let ecfg = EngineConfig {
        batch_size: 4,
        block_tokens: 4,
        kv_blocks: 16,
        ..Default::default()
    };
    let mut engine = Engine::new(&model, ecfg).unwrap();
    let small = Request::greedy(vec![1, 2], 3);
    let big = Request::greedy(vec![3], 20);
    let a = engine.submit(small.clone()).unwrap();
    let b = engine.submit(big).unwrap();
    // Prompts that can never fit are refused up front.
    assert!(engine
        .submit(Request::greedy(random_ids(20, 1), 1))
        .is_err());
    let done = engine.run_to_completion().unwrap();
    assert_eq!(done[0].id, a);
    assert_eq!(done[0].finish, FinishReason::Length);
    let want = sequential(&model, &[small], &ExitRule::Router);
    assert_eq!((done[0].tokens.clone(), done[0].depths.clone()), want[0]);
    assert_eq!(done[1].id, b);
    match &done[1].finish {
        FinishReason::Error(msg) => assert!(msg.contains("KV pool"), "{msg}"),
        other => panic!("the oversized request finished with {other:?}"),
    }
    assert!(engine.is_idle());
    assert_eq!(
        engine.cache().free_blocks(),
        16,
        "every block must be returned"
    );
}

#[test]
fn bad_requests_are_refused_and_others_complete() {
    link();
    let model = MorModel::new(&mor("kind = \"token_choice\"", "recursion_wise", "")).unwrap();
    let mut engine = Engine::new(
        &model,
        EngineConfig {
            batch_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let good = Request::greedy(vec![4, 5], 4);
    let id = engine.submit(good.clone()).unwrap();
    let bad = [
        Request::greedy(vec![], 4),
        Request::greedy(random_ids(CONTEXT + 1, 2), 4),
        Request::greedy(vec![VOCAB as u32], 4),
        Request::greedy(vec![1], 0),
        Request {
            sampling: SamplingParams {
                temperature: -1.0,
                ..SamplingParams::greedy()
            },
            ..good.clone()
        },
        Request {
            sampling: SamplingParams {
                top_p: 0.0,
                temperature: 1.0,
                ..SamplingParams::greedy()
            },
            ..good.clone()
        },
    ];
    for (i, b) in bad.into_iter().enumerate() {
        let err = engine
            .submit(b)
            .expect_err(&format!("bad request {i} was accepted"));
        assert!(!err.to_string().is_empty());
    }
    let done = engine.run_to_completion().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, id);
    assert_eq!(
        (done[0].tokens.clone(), done[0].depths.clone()),
        sequential(&model, &[good], &ExitRule::Router)[0]
    );
    // The text API refuses invalid UTF-8 and empty prompts.
    let tok = Tokenizer::byte_level();
    assert!(encode_prompt(&tok, b"ok \xff\xfe")
        .unwrap_err()
        .to_string()
        .contains("UTF-8"));
    assert!(encode_prompt(&tok, b"").is_err());
    assert_eq!(
        encode_prompt(&tok, "hé".as_bytes()).unwrap(),
        vec![104, 195, 169]
    );
}

#[test]
fn stop_token_and_context_end_generation() {
    link();
    let model = MorModel::new(&mor("kind = \"expert_choice\"", "hybrid", "")).unwrap();
    let prompt = random_ids(4, 21);
    let (free, _) = sequential(
        &model,
        &[Request::greedy(prompt.clone(), 8)],
        &ExitRule::Router,
    )
    .remove(0);
    let stop = free[2];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let rq = Request {
        stop_token: Some(stop),
        ..Request::greedy(prompt.clone(), 8)
    };
    let mut engine = Engine::new(
        &model,
        EngineConfig {
            batch_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    engine.submit(rq).unwrap();
    // A prompt filling the context minus 2 positions: 3 more tokens can be produced.
    let long = random_ids(CONTEXT - 2, 5);
    engine.submit(Request::greedy(long.clone(), 10)).unwrap();
    let done = engine.run_to_completion().unwrap();
    assert_eq!(done[0].finish, FinishReason::Stop);
    assert_eq!(done[0].tokens, free[..=first].to_vec());
    assert_eq!(done[1].finish, FinishReason::Context);
    assert_eq!(done[1].tokens.len(), 3);
    let want = sequential(&model, &[Request::greedy(long, 10)], &ExitRule::Router).remove(0);
    assert_eq!((done[1].tokens.clone(), done[1].depths.clone()), want);
}

#[test]
fn gate_thresholds_and_max_depth_control_the_exit() {
    link();
    let model = MorModel::new(&mor("kind = \"expert_choice\"", "recursion_wise", "")).unwrap();
    let ids = random_ids(16, 8);
    // Thresholds of -inf: every token runs every step, and the gates equal alpha * sigmoid(z).
    let all = ExitRule::GateThresholds(vec![f64::NEG_INFINITY; 3]);
    let mut dec = Decoder::new(
        &model,
        DecodeOptions {
            exit: all,
            ..Default::default()
        },
    )
    .unwrap();
    for &t in &ids {
        let s = dec.step(t).unwrap();
        assert_eq!(s.depth, 3);
        assert_eq!(s.gates.len(), 3);
        assert!(s.gates.iter().all(|&g| g > 0.0 && g < 0.1), "{:?}", s.gates);
    }
    // Thresholds above alpha: nobody passes step 2 (step 1 has capacity 1 and a -inf bar).
    let none = ExitRule::GateThresholds(vec![f64::NEG_INFINITY, 0.2, 0.2]);
    let mut dec = Decoder::new(
        &model,
        DecodeOptions {
            exit: none,
            ..Default::default()
        },
    )
    .unwrap();
    for &t in &ids {
        assert_eq!(dec.step(t).unwrap().depth, 1);
    }
    // max_depth caps the router's rule.
    let mut dec = Decoder::new(
        &model,
        DecodeOptions {
            max_depth: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ids.iter().all(|&t| dec.step(t).unwrap().depth <= 2));
    assert!(Decoder::new(
        &model,
        DecodeOptions {
            max_depth: Some(4),
            ..Default::default()
        }
    )
    .is_err());
    assert!(Decoder::new(
        &model,
        DecodeOptions {
            exit: ExitRule::GateThresholds(vec![0.0]),
            ..Default::default()
        }
    )
    .is_err());
    let van = MorModel::new(&vanilla()).unwrap();
    assert!(Decoder::new(
        &van,
        DecodeOptions {
            exit: ExitRule::GateThresholds(vec![0.0]),
            ..Default::default()
        }
    )
    .is_err());
}

/// The engine's FLOP counters against a closed form: a vanilla model (every position runs
/// every layer), one request of `P` prompt tokens generating `G`. Positions processed:
/// `P + G − 1` (the last token is never fed back); per position and layer, `2·MACs` of the
/// projections and `2·2·hq·dh·(pos + 1)` of attention (scores and weighted values over the
/// position's own cache); `G` LM-head rows of `2·d·V`. A recursion-wise MoR model with
/// every token forced to full depth counts the same work as its unrolled vanilla layers.
#[test]
fn flop_counters_match_the_closed_form() {
    link();
    let (p, g) = (5usize, 7usize);
    let (d, hq, hkv, dh, ff, layers) = (32usize, 4usize, 2usize, 8usize, 48usize, 8usize);
    let macs = d * hq * dh + 2 * d * hkv * dh + hq * dh * d + 2 * d * ff + ff * d;
    let positions = p + g - 1;
    let want_linear = (2 * macs * layers * positions) as u64;
    let want_attention: u64 = (0..positions)
        .map(|pos| (4 * hq * dh * (pos + 1) * layers) as u64)
        .sum();
    let want_head = (2 * d * VOCAB * g) as u64;
    let check = |name: &str, model: &MorModel, exit: ExitRule| {
        let mut e = Engine::new(
            model,
            EngineConfig {
                batch_size: 2,
                exit,
                ..Default::default()
            },
        )
        .unwrap();
        e.submit(Request::greedy(random_ids(p, 3), g)).unwrap();
        let done = e.run_to_completion().unwrap();
        assert_eq!(done[0].tokens.len(), g, "{name}");
        let s = e.stats();
        assert_eq!(s.linear_flops, want_linear, "{name}: linear");
        assert_eq!(s.attention_flops, want_attention, "{name}: attention");
        assert_eq!(s.head_flops, want_head, "{name}: head");
        assert_eq!(s.total_flops(), want_linear + want_attention + want_head);
        // `since` of the same counters is zero work.
        assert_eq!(s.since(s).total_flops(), 0, "{name}");
    };
    let v = MorModel::new(&vanilla()).unwrap();
    check("vanilla", &v, ExitRule::Router);
    // Middle-Cycle N_r = 3 over 8 base layers: 1 + 2·3 + 1 = 8 slots, all run when the
    // thresholds never stop a token.
    let m = MorModel::new(&mor("kind = \"expert_choice\"", "recursion_wise", "")).unwrap();
    assert_eq!(m.plan().num_slots(), layers);
    check(
        "mor at full depth",
        &m,
        ExitRule::GateThresholds(vec![f64::NEG_INFINITY; 3]),
    );
    // Vanilla with KV sharing (spec §4): each sharing layer skips its K/V projections,
    // `2·(2·d·hkv·dh)` per position, and attends over the same number of cached positions.
    for (pattern, loops, sharing_layers) in [("cycle", 2, 4), ("seq", 4, 6), ("middle_cycle", 3, 4)]
    {
        let model = MorModel::new(&vanilla_kv(pattern, loops)).unwrap();
        let mut e = Engine::new(
            &model,
            EngineConfig {
                batch_size: 2,
                ..Default::default()
            },
        )
        .unwrap();
        e.submit(Request::greedy(random_ids(p, 3), g)).unwrap();
        e.run_to_completion().unwrap();
        let s = e.stats();
        let saved = (2 * 2 * d * hkv * dh * sharing_layers * positions) as u64;
        assert_eq!(
            s.linear_flops,
            want_linear - saved,
            "{pattern}{loops}: linear"
        );
        assert_eq!(
            s.attention_flops, want_attention,
            "{pattern}{loops}: attention"
        );
        assert_eq!(s.head_flops, want_head, "{pattern}{loops}: head");
    }
}
