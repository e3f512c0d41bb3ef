//! One training step (forward + backward + AdamW) of a small vanilla model and of a MoR
//! model, `cpu` (fused) vs `reference` (plain candle ops) backend, in tokens per second.
//!
//! The model is the speed-target shape: d=256, 4 layers, 4 heads, batch 8 × 256 tokens,
//! vocabulary 4096, f32. Threads follow `RAYON_NUM_THREADS` (set it to pin them).
//!
//! `cargo bench -p mor-bench --bench train_step`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mor_core::config::Config;
use mor_models::model::MorModel;
use mor_models::optim::{AdamW, AdamWConfig};
use mor_router::RouteMode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const B: usize = 8;
const T: usize = 256;

fn config(backend: &str, mor: bool) -> mor_core::config::ResolvedConfig {
    let recursion = if mor {
        "[recursion]\nnum_recursions = 2\nsharing = { kind = \"middle_cycle\" }\n[router]\nkind = \"expert_choice\"\n"
    } else {
        "[recursion]\nnum_recursions = 1\nsharing = { kind = \"none\" }\n"
    };
    let text = format!(
        "[model]\npreset = \"small\"\nvocab_size = 4096\nhidden_size = 256\nnum_layers = 4\nnum_heads = 4\nnum_kv_heads = 4\nhead_dim = 64\nintermediate_size = 704\nseq_len = {T}\n{recursion}[runtime]\nbackend = {{ kind = \"{backend}\" }}\n[train]\nbudget = {{ steps = 1 }}\nbatch_seqs = {B}\nmicro_batch_seqs = {B}\n"
    );
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn bench(c: &mut Criterion) {
    mor_bench::tune_cpu_process();
    let _ = mor_models::builtin::link();
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((B * T) as u64));
    let mut rng = mor_core::rng::Rng::new(1);
    let ids: Vec<u32> = (0..B * T).map(|_| rng.below(4096) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (B, T), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 4096).collect::<Vec<_>>(),
        (B, T),
        &Device::Cpu,
    )
    .unwrap();
    for mor in [false, true] {
        for backend in ["cpu", "reference"] {
            let model = MorModel::new(&config(backend, mor)).unwrap();
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
            let name = format!(
                "{}/{backend}",
                if mor { "mor_expert_nr2" } else { "vanilla" }
            );
            g.bench_function(name, |bch| {
                bch.iter(|| {
                    let out = model.forward_loss(&x, &y, RouteMode::Train).unwrap();
                    let mut loss = out.ce;
                    if let Some(r) = &out.router.loss {
                        loss = (loss + r).unwrap();
                    }
                    let grads = loss.backward().unwrap();
                    opt.step(&grads, 1e-3).unwrap();
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
