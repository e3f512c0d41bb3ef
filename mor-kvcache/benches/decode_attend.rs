//! Decode attention over the paged KV cache at the `bench infer` vanilla-32 shape (32
//! layers, 4 query heads over 2 KV heads of 64, blocks of 16 tokens), B = 32 requests with
//! contexts of 256 to 380 tokens: one iteration is the attention of one decode step (every
//! layer, every request), on each instruction-set tier this CPU runs, with the K/V pool in
//! f32 and in bf16. Single-threaded, as
//! the decode benchmark.
//!
//! `cargo bench -p mor-kvcache --bench decode_attend`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mor_kernels::cpu::isa::{detected, Tier};
use mor_kvcache::decode::{attend_into_tier, KvPrecision};
use mor_kvcache::{DecodeCache, DecodeCacheSpec, KvPolicy, RecursionWise};

const LAYERS: usize = 32;
const HQ: usize = 4;
const HKV: usize = 2;
const DH: usize = 64;
const BT: usize = 16;
const BATCH: u64 = 32;

fn context(req: u64) -> u32 {
    256 + 4 * req as u32
}

fn filled(precision: KvPrecision) -> Box<dyn DecodeCache> {
    let blocks = (0..BATCH)
        .map(|r| (context(r) as usize).div_ceil(BT))
        .sum::<usize>()
        * LAYERS;
    let spec = DecodeCacheSpec::vanilla(LAYERS, HKV, DH, BT, blocks);
    let mut c = RecursionWise::new(1)
        .expect("one recursion")
        .new_decode_cache(&spec)
        .expect("a vanilla cache");
    c.set_kv_precision(precision).expect("an empty cache");
    let row = HKV * DH;
    let mut x = 0x2545_f491u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x >> 8) as f32 / (1 << 24) as f32 - 0.5
    };
    for r in 0..BATCH {
        c.start(r).expect("start");
        for pos in 0..context(r) {
            for slot in 0..LAYERS {
                let k: Vec<f32> = (0..row).map(|_| next()).collect();
                let v: Vec<f32> = (0..row).map(|_| next()).collect();
                c.append(r, slot, pos, &k, &v).expect("append");
            }
        }
    }
    c
}

fn bench(c: &mut Criterion) {
    let caches = [KvPrecision::F32, KvPrecision::Bf16].map(|p| (p, filled(p)));
    let q: Vec<f32> = (0..HQ * DH)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let scale = 1.0 / (DH as f32).sqrt();
    let tokens: u64 = (0..BATCH).map(|r| context(r) as u64).sum::<u64>() * LAYERS as u64;
    let mut g = c.benchmark_group("decode_attend_vanilla32_b32");
    g.throughput(Throughput::Elements(tokens));
    for tier in Tier::ALL.into_iter().filter(|&t| t <= detected()) {
        if tier == Tier::Avx512Bf16 {
            continue; // Same attention kernel as Tier::Avx512.
        }
        for (precision, cache) in &caches {
            g.bench_function(BenchmarkId::new(precision.name(), tier.name()), |b| {
                let mut out = vec![0f32; HQ * DH];
                b.iter(|| {
                    for slot in 0..LAYERS {
                        for r in 0..BATCH {
                            let view = cache.view(r, slot).expect("view");
                            attend_into_tier(&view, &q, context(r), HQ, scale, &mut out, tier)
                                .expect("attend");
                        }
                    }
                    out[0]
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
