//! Splits one training step of the speed-target model (d=256, 4 layers, 4 heads,
//! batch 8 × 256, vocabulary 4096) into forward, loss, backward and optimiser time, in f32
//! or bf16 (`train.precision`: bf16 products with f32 accumulation, everything else f32).
//!
//! `cargo run --release -p mor-bench --example step_profile [cpu|reference] [steps] [f32|bf16]`

use candle_core::{Device, Tensor};
use mor_core::config::Config;
use mor_models::model::MorModel;
use mor_models::optim::{AdamW, AdamWConfig};
use mor_router::RouteMode;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    mor_bench::tune_cpu_process();
    let _ = mor_models::builtin::link();
    let args: Vec<String> = std::env::args().collect();
    let backend = args.get(1).map(String::as_str).unwrap_or("cpu");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let precision = args.get(3).map(String::as_str).unwrap_or("f32");
    let (b, t) = (8usize, 256usize);
    let text = format!(
        "[model]\npreset = \"small\"\nvocab_size = 4096\nhidden_size = 256\nnum_layers = 4\nnum_heads = 4\nnum_kv_heads = 4\nhead_dim = 64\nintermediate_size = 704\nseq_len = {t}\n[recursion]\nnum_recursions = 1\nsharing = {{ kind = \"none\" }}\n[runtime]\nbackend = {{ kind = \"{backend}\" }}\n[train]\nbudget = {{ steps = 1 }}\nprecision = \"{precision}\"\nbatch_seqs = {b}\nmicro_batch_seqs = {b}\n"
    );
    let cfg = Config::from_toml_str(&text).unwrap();
    let model = MorModel::new(&cfg).unwrap();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        },
        model
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v, true))
            .collect(),
    )
    .unwrap();
    let mut rng = mor_core::rng::Rng::new(1);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(4096) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (b, t), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 4096).collect::<Vec<_>>(),
        (b, t),
        &Device::Cpu,
    )
    .unwrap();
    let mut tot = [0f64; 4];
    let mut first_loss = f32::NAN;
    for s in 0..steps + 1 {
        let t0 = Instant::now();
        // The training path: LM head and loss as one op (`forward_loss`), so "forward"
        // includes the head and the loss; "loss" is only reading the value.
        let out = model.forward_loss(&x, &y, RouteMode::Train).unwrap();
        let t1 = Instant::now();
        let loss = out.ce;
        let value = loss.to_scalar::<f32>().unwrap();
        if s == 0 {
            first_loss = value;
        }
        let t2 = Instant::now();
        let grads = loss.backward().unwrap();
        let t3 = Instant::now();
        opt.step(&grads, 1e-3).unwrap();
        let t4 = Instant::now();
        if s > 0 {
            for (i, (a, z)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4)].iter().enumerate() {
                tot[i] += (*z - *a).as_secs_f64();
            }
        }
    }
    let n = steps as f64;
    let step: f64 = tot.iter().sum::<f64>() / n;
    println!(
        "{backend} {precision}: forward {:.3}s, loss {:.3}s, backward {:.3}s, optimiser {:.3}s, step {:.3}s = {:.0} tokens/s (threads: {}), first loss {first_loss:.5}",
        tot[0] / n,
        tot[1] / n,
        tot[2] / n,
        tot[3] / n,
        step,
        (b * t) as f64 / step,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
}
