//! Decodes with one vanilla model of the `bench infer` shape (`small` width, 34 layers by
//! default) at a fixed batch, for profiling a decode step (`perf record`) or timing it:
//! `n` requests of 96 tokens from a single start token, sampled at temperature 1. Prints
//! generated tokens per second of wall time and per second of this thread's CPU time (the
//! steadier figure on a shared machine).
//!
//! `cargo run --release -p mor-bench --example decode_profile [f32|bf16] [f32|bf16 (KV)]
//! [batch] [requests] [layers] [block tokens]`

use mor_core::config::{Config, Precision};
use mor_models::engine::{
    Batching, Engine, EngineConfig, ExitRule, KvPrecision, Request, SamplingParams,
};
use mor_models::model::MorModel;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    mor_bench::tune_cpu_process();
    let _ = mor_models::builtin::link();
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let precision = match arg(1, "bf16").as_str() {
        "f32" => Precision::F32,
        _ => Precision::Bf16,
    };
    let kv_precision = match arg(2, "bf16").as_str() {
        "f32" => KvPrecision::F32,
        _ => KvPrecision::Bf16,
    };
    let batch: usize = arg(3, "32").parse().expect("batch");
    let requests: usize = arg(4, "64").parse().expect("requests");
    let layers: usize = arg(5, "34").parse().expect("layers");
    let block_tokens: usize = arg(6, "16").parse().expect("block tokens");
    let text = format!(
        "[model]\npreset = \"small\"\nnum_layers = {layers}\nseq_len = 256\n\
         [recursion]\nnum_recursions = 1\nsharing = {{ kind = \"none\" }}\n\
         [runtime]\nbackend = {{ kind = \"cpu\" }}\nseed = 0\n\
         [train]\nbudget = {{ steps = 1 }}\n"
    );
    let t_setup = Instant::now();
    let cfg = Config::from_toml_str(&text).expect("config");
    let model = MorModel::new(&cfg).expect("model");
    let len = 96;
    let mut engine = Engine::new(
        &model,
        EngineConfig {
            batch_size: batch,
            max_active: batch,
            block_tokens,
            kv_blocks: batch * layers * (len + 2usize).div_ceil(block_tokens),
            exit: ExitRule::Router,
            max_depth: None,
            batching: Batching::SequenceWise,
            record_gates: false,
            exit_batch: 1,
            precision,
            kv_precision,
        },
    )
    .expect("engine");
    let submit = |engine: &mut Engine<'_>, n: usize, seed: u64| {
        for i in 0..n {
            engine
                .submit(Request {
                    prompt: vec![0],
                    max_new_tokens: len,
                    sampling: SamplingParams {
                        temperature: 1.0,
                        top_k: 0,
                        top_p: 1.0,
                        seed: seed + i as u64,
                    },
                    stop_token: None,
                })
                .expect("submit");
        }
    };
    submit(&mut engine, batch.min(4), 1_000);
    engine.run_to_completion().expect("warm-up");
    submit(&mut engine, requests, 0);
    eprintln!(
        "set-up and warm-up: {:.2} s",
        t_setup.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let c0 = cpu_seconds();
    let done = engine.run_to_completion().expect("run");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(c0).map(|(b, a)| b - a);
    let tokens: usize = done.iter().map(|c| c.tokens.len()).sum();
    println!(
        "vanilla-{layers} weights {} KV {:?} B = {batch}: {tokens} tokens in {secs:.2} s, {:.1} tokens/s, {} tokens per CPU second",
        mor_bench::infer::precision_name(precision),
        kv_precision,
        tokens as f64 / secs,
        cpu.map_or("?".to_string(), |c| format!("{:.1}", tokens as f64 / c)),
    );
}

/// CPU time this thread has run, in seconds (the first field of
/// `/proc/thread-self/schedstat`, in nanoseconds; `None` where it cannot be read). On a
/// shared machine the time the thread waits for a core is not counted.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}
