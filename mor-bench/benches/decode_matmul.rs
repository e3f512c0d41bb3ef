//! The decode-time products: a weight packed once ([`PackedMatrix`]), in f32 and in bf16,
//! with the kernels of every instruction-set tier this CPU runs, against candle's `matmul`
//! on the same pre-transposed weight, for the `small` preset's layer shapes and the batch
//! sizes of `cargo xtask bench infer`. Single-threaded, as the decode benchmark.
//!
//! `cargo bench -p mor-bench --bench decode_matmul`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mor_core::config::Precision;
use mor_kernels::cpu::isa::{detected, Tier};
use mor_kernels::cpu::PackedMatrix;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    mor_bench::tune_cpu_process();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    // (name, outputs n, inputs k): [q; k; v], [gate; up], down, LM head.
    let shapes = [
        ("qkv", 512, 256),
        ("gate_up", 1408, 256),
        ("down", 256, 704),
        ("head", 4096, 256),
    ];
    for (name, n, k) in shapes {
        let mut g = c.benchmark_group(format!("decode_matmul/{name}"));
        g.sample_size(20);
        let w = values(n * k, 1);
        let packed: Vec<(String, Tier, PackedMatrix)> = [Precision::F32, Precision::Bf16]
            .into_iter()
            .flat_map(|p| {
                let m = PackedMatrix::with_precision(&w, n, k, p).expect("a packed weight");
                Tier::ALL
                    .into_iter()
                    .filter(move |&t| {
                        t <= detected() && (t != Tier::Avx512Bf16 || p == Precision::Bf16)
                    })
                    .map(move |t| (format!("packed-{p:?}-{t}").to_lowercase(), t, m.clone()))
            })
            .collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)
            .and_then(|t| t.t()?.contiguous())
            .expect("the transposed weight");
        for m in [1usize, 8, 16, 24, 32, 48] {
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let x = values(m * k, 2);
            let mut y = vec![0f32; m * n];
            for (label, tier, a) in &packed {
                g.bench_with_input(BenchmarkId::new(label, m), &m, |b, _| {
                    pool.install(|| {
                        b.iter(|| a.matmul_at(*tier, &x, &mut y, false).expect("product"))
                    })
                });
            }
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("x");
            g.bench_with_input(BenchmarkId::new("candle", m), &m, |b, _| {
                pool.install(|| {
                    b.iter(|| {
                        xt.matmul(&wt)
                            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                            .expect("product")
                    })
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
