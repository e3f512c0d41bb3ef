//! The decode-time products: a weight packed once ([`PackedMatrix`]) against candle's
//! `matmul` on the same pre-transposed weight, for the `small` preset's layer shapes and the
//! batch sizes of `cargo xtask bench infer`. Single-threaded, as the decode benchmark.
//!
//! `cargo bench -p mor-bench --bench decode_matmul`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
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
        let packed = PackedMatrix::new(&w, n, k).expect("a packed weight");
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)
            .and_then(|t| t.t()?.contiguous())
            .expect("the transposed weight");
        for m in [1usize, 8, 16, 24, 32, 48] {
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let x = values(m * k, 2);
            let mut y = vec![0f32; m * n];
            g.bench_with_input(BenchmarkId::new("packed", m), &m, |b, _| {
                pool.install(|| b.iter(|| packed.matmul(&x, &mut y, false).expect("product")))
            });
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
