//! One training step (forward + backward + AdamW) of a small vanilla model and of a MoR
//! model, `cpu` (fused) in f32 and bf16 vs `reference` (plain candle ops) backend, in
//! tokens per second; and the `cpu` backend's product kernels on one thread at the model's
//! product shapes, in FLOP/s (`products` group: every kernel this CPU has).
//!
//! The model is the speed-target shape: d=256, 4 layers, 4 heads, batch 8 × 256 tokens,
//! vocabulary 4096. Threads follow `RAYON_NUM_THREADS` (set it to pin them).
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

fn config(backend: &str, precision: &str, mor: bool) -> mor_core::config::ResolvedConfig {
    let recursion = if mor {
        "[recursion]\nnum_recursions = 2\nsharing = { kind = \"middle_cycle\" }\n[router]\nkind = \"expert_choice\"\n"
    } else {
        "[recursion]\nnum_recursions = 1\nsharing = { kind = \"none\" }\n"
    };
    let text = format!(
        "[model]\npreset = \"small\"\nvocab_size = 4096\nhidden_size = 256\nnum_layers = 4\nnum_heads = 4\nnum_kv_heads = 4\nhead_dim = 64\nintermediate_size = 704\nseq_len = {T}\n{recursion}[runtime]\nbackend = {{ kind = \"{backend}\" }}\n[train]\nbudget = {{ steps = 1 }}\nprecision = \"{precision}\"\nbatch_seqs = {B}\nmicro_batch_seqs = {B}\n"
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
        for (backend, precision) in [("cpu", "f32"), ("cpu", "bf16"), ("reference", "f32")] {
            let model = MorModel::new(&config(backend, precision, mor)).unwrap();
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
                "{}/{backend}{}",
                if mor { "mor_expert_nr2" } else { "vanilla" },
                if precision == "f32" { "" } else { "-bf16" }
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

/// The product kernels on one thread: `x · wᵀ` of the gate+up projection, the down
/// projection, a weight gradient (`gᵀ · x`, transposed left operand) and the LM head.
fn products(c: &mut Criterion) {
    use mor_kernels::cpu::{matmul_with, Kernel};
    let mut g = c.benchmark_group("products");
    g.sample_size(10);
    for (m, n, k, ta) in [
        (2048, 1408, 256, false),
        (2048, 256, 704, false),
        (256, 704, 2048, true),
        (2048, 4096, 256, false),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut d = vec![0f32; m * n];
        let (ars, acs) = if ta { (1, m) } else { (k, 1) };
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        for kern in Kernel::available() {
            g.bench_function(
                format!("{m}x{n}x{k}{}/{kern:?}", if ta { "t" } else { "" }),
                |bch| {
                    bch.iter(|| {
                        matmul_with(
                            kern,
                            (m, n, k),
                            (&a, ars, acs),
                            (&b, n, 1),
                            (&mut d, n),
                            false,
                            1.0,
                        )
                        .unwrap()
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench, products);
criterion_main!(benches);
