//! Uses a decode-time KV cache directly, without a model: a Middle-Cycle plan with
//! `N_r = 2`, six decoded tokens of which three reach step 2, under recursion-wise caching
//! and recursive sharing (spec §4). Each token appends its K/V at every slot it reaches where
//! the cache stores, then attends over the slot's view; the program checks what each view
//! holds and the exact bytes stored, and shows back-pressure when the pool is full.
//!
//! Run with `cargo run -p mor-kvcache --example decode_cache`.

use mor_core::plan::{DepthFix, PlanRequest, Segment};
use mor_kvcache::{attend, DecodeCacheSpec, Error, KvPolicy, RecursionWise, RecursiveSharing};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Middle-Cycle, 4 layers, N_r = 2: prelude, step 1, step 2 (the same block), coda.
    let req = PlanRequest {
        num_layers: 4,
        num_recursions: 2,
        depth_fix: DepthFix::AddLayers,
    };
    let plan = mor_core::sharing::plan("middle_cycle", &toml::Table::new(), &req)?;
    let step2 = plan
        .slots
        .iter()
        .position(|s| s.segment == Segment::Recursion { step: 2, layer: 0 })
        .ok_or("the plan has a step-2 slot")?;
    let (hkv, dh, hq) = (1usize, 2usize, 2usize);
    let spec = DecodeCacheSpec {
        plan: plan.clone(),
        num_kv_heads: hkv,
        head_dim: dh,
        block_tokens: 4,
        max_blocks: 16,
    };
    // Recursion depth of each decoded token (what a router's causal rule would decide).
    let depth = [2usize, 1, 2, 1, 1, 2];
    let policies: [(Box<dyn KvPolicy>, &[u32], usize); 2] = [
        // Step 2 attends to the tokens that reached step 2; every slot stores.
        (Box::new(RecursionWise::new(2)?), &[0, 2, 5], 6 + 6 + 3 + 6),
        // Step 2 reads the step-1 entries of every token and stores nothing.
        (
            Box::new(RecursiveSharing::new(2)?),
            &[0, 1, 2, 3, 4, 5],
            6 + 6 + 6,
        ),
    ];
    for (policy, step2_keys, entries) in policies {
        let mut cache = policy.new_decode_cache(&spec)?;
        cache.start(7)?;
        for (pos, &d) in depth.iter().enumerate() {
            let pos = pos as u32;
            for (slot, s) in plan.slots.iter().enumerate() {
                if matches!(s.segment, Segment::Recursion { step, .. } if step > d) {
                    continue; // The token stopped before this step.
                }
                // K/V rows of this token at this slot (RoPE would already be applied).
                let k = [pos as f32, slot as f32];
                let v = [pos as f32, 1.0];
                if cache.writes(slot) {
                    cache.append(7, slot, pos, &k, &v)?;
                }
                let view = cache.view(7, slot)?;
                let q = [1.0f32, 0.0, 0.0, 1.0]; // hq = 2 query heads share the kv head
                let out = attend(&view, &q, pos, hq, 1.0 / (dh as f32).sqrt())?;
                if pos == 0 {
                    // One visible key: attention returns its value for both heads.
                    assert_eq!(out, [0.0, 1.0, 0.0, 1.0]);
                }
            }
        }
        let seen: Vec<u32> = cache.view(7, step2)?.positions();
        assert_eq!(seen, step2_keys, "{}", policy.name());
        assert_eq!(cache.tokens_stored(), entries);
        assert_eq!(cache.bytes_stored(), entries * 2 * hkv * dh * 4);
        println!(
            "{:>17}: step-2 keys {:?}, {} entries, {} bytes stored, {} of {} blocks in use",
            policy.name(),
            seen,
            cache.tokens_stored(),
            cache.bytes_stored(),
            cache.total_blocks() - cache.free_blocks(),
            cache.total_blocks()
        );
        cache.end(7)?;
        assert_eq!(cache.free_blocks(), cache.total_blocks());
    }

    // Back-pressure: a pool of one block of 4 tokens holds 4 entries; the fifth append fails
    // with `Exhausted` and changes nothing, and ending the request frees the block.
    let small = DecodeCacheSpec {
        max_blocks: 1,
        ..spec
    };
    let mut cache = RecursionWise::new(2)?.new_decode_cache(&small)?;
    cache.start(1)?;
    for pos in 0..4 {
        cache.append(1, 0, pos, &[0.0; 2], &[0.0; 2])?;
    }
    assert_eq!(cache.blocks_needed(1, &[0])?, 1);
    match cache.append(1, 0, 4, &[0.0; 2], &[0.0; 2]) {
        Err(Error::Exhausted {
            needed: 1,
            free: 0,
            total: 1,
        }) => {}
        other => return Err(format!("expected Exhausted, got {other:?}").into()),
    }
    assert_eq!(cache.tokens_stored(), 4);
    cache.end(1)?;
    assert_eq!(cache.free_blocks(), 1);
    println!("back-pressure: the fifth token waits until a request ends");
    Ok(())
}
