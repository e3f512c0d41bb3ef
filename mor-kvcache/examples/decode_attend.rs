//! Measures decode attention over the paged cache: one query per call against a request's
//! history, at the 360M shape of spec §1.1 (15 query heads, 5 kv heads, head dim 64).
//!
//! Run with `cargo run --release -p mor-kvcache --example decode_attend [context]`.

use mor_core::plan::{RecursionPlan, Segment, Slot};
use mor_kvcache::{attend_into, DecodeCacheSpec, Hybrid, KvPolicy, RecursionWise};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2048);
    let (hq, hkv, dh, bt) = (15usize, 5usize, 64usize, 16usize);
    let slots = (1..=2)
        .map(|step| Slot {
            block: 0,
            segment: Segment::Recursion { step, layer: 0 },
        })
        .collect();
    let plan = RecursionPlan {
        strategy: "cycle".into(),
        num_recursions: 2,
        base_depth: 1,
        num_blocks: 1,
        requested_layers: 2,
        depth_fix: Default::default(),
        slots,
    };
    let blocks = 2 * (ctx as usize).div_ceil(bt) + 2;
    let spec = DecodeCacheSpec {
        plan,
        num_kv_heads: hkv,
        head_dim: dh,
        block_tokens: bt,
        max_blocks: blocks,
    };
    let row: Vec<f32> = (0..hkv * dh)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    let q: Vec<f32> = (0..hq * dh)
        .map(|i| ((i * 53 % 97) as f32 / 97.0) - 0.5)
        .collect();
    let mut out = vec![0f32; hq * dh];
    let policies: [Box<dyn KvPolicy>; 2] =
        [Box::new(RecursionWise::new(2)?), Box::new(Hybrid::new(2)?)];
    for policy in policies {
        let mut cache = policy.new_decode_cache(&spec)?;
        cache.start(0)?;
        let t0 = Instant::now();
        for p in 0..ctx {
            cache.append(0, 0, p, &row, &row)?;
            // Every other token reaches step 2.
            if p % 2 == 0 {
                cache.append(0, 1, p, &row, &row)?;
            }
        }
        let append_ns = t0.elapsed().as_nanos() as f64 / (ctx as f64 * 1.5);
        for slot in 0..2 {
            let view = cache.view(0, slot)?;
            // The best of five rounds, to read through noise from other processes.
            let iters = 40;
            let mut s = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..iters {
                    attend_into(&view, &q, ctx, hq, 0.125, &mut out)?;
                }
                s = s.min(t.elapsed().as_secs_f64() / iters as f64);
            }
            let bytes = view.len() * 2 * hkv * dh * 4;
            println!(
                "{:>14} slot {slot}: {:>5} keys, attend {:8.1} us/query, {:6.2} GB/s of K/V read; append {:.0} ns/entry",
                policy.name(),
                view.len(),
                s * 1e6,
                bytes as f64 / s / 1e9,
                append_ns
            );
        }
    }
    Ok(())
}
