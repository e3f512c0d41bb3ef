//! Decode-time caches: what each slot stores and sees, decode attention against a naive
//! softmax, exact block accounting, memory ratios and back-pressure.

use crate::common::{plan, uniform_f32};
use mor_core::plan::{RecursionPlan, Segment};
use mor_core::rng::Rng;
use mor_kvcache::{
    attend, DecodeCache, DecodeCacheSpec, DecodeMode, Error, Hybrid, KvCost, KvPolicy, PagedCache,
    RecursionWise, RecursiveSharing, StepKv,
};
use std::collections::HashMap;

/// One stored entry: position, K row, V row.
pub type Entry = (u32, Vec<f32>, Vec<f32>);

/// What a naive engine wrote, per (request, slot).
#[derive(Debug, Default, Clone)]
pub struct Naive {
    /// Entries in append order.
    pub pages: HashMap<(u64, usize), Vec<Entry>>,
}

/// The slot of step 1, layer `layer` in `plan`.
fn step_one_slot(plan: &RecursionPlan, layer: usize) -> Option<usize> {
    plan.slots
        .iter()
        .position(|s| s.segment == Segment::Recursion { step: 1, layer })
}

/// Whether a token reaching `slot` stores there, written from the spec's table (spec §4).
pub fn naive_writes(mode: DecodeMode, plan: &RecursionPlan, slot: usize) -> bool {
    match (mode, plan.slots[slot].segment) {
        (DecodeMode::Sharing, Segment::Recursion { step, .. }) => step == 1,
        _ => true,
    }
}

/// The entries a query at `slot` must see, written directly from spec §4.
pub fn expected_view(
    mode: DecodeMode,
    plan: &RecursionPlan,
    naive: &Naive,
    req: u64,
    slot: usize,
) -> Vec<Entry> {
    let own = naive.pages.get(&(req, slot)).cloned().unwrap_or_default();
    let (step, layer) = match plan.slots[slot].segment {
        Segment::Recursion { step, layer } if step >= 2 => (step, layer),
        _ => return own,
    };
    let _ = step;
    match mode {
        DecodeMode::RecursionWise => own,
        DecodeMode::Sharing | DecodeMode::Hybrid => {
            let s1 = step_one_slot(plan, layer).unwrap();
            let base = naive.pages.get(&(req, s1)).cloned().unwrap_or_default();
            if mode == DecodeMode::Sharing {
                return base;
            }
            base.into_iter()
                .map(|e| own.iter().find(|o| o.0 == e.0).cloned().unwrap_or(e))
                .collect()
        }
    }
}

/// Whether a token of depth `depth` runs `slot`.
pub fn reaches(plan: &RecursionPlan, slot: usize, depth: usize) -> bool {
    match plan.slots[slot].segment {
        Segment::Recursion { step, .. } => step <= depth,
        _ => true,
    }
}

/// Runs one token of `req` at `pos` with recursion depth `depth` through every slot it
/// reaches, appending where the cache stores, mirrored in `naive`.
pub fn run_token(
    cache: &mut dyn DecodeCache,
    plan: &RecursionPlan,
    naive: &mut Naive,
    rng: &mut Rng,
    req: u64,
    pos: u32,
    depth: usize,
    row: usize,
) {
    for slot in 0..plan.slots.len() {
        if !reaches(plan, slot, depth) || !cache.writes(slot) {
            continue;
        }
        let k = uniform_f32(rng, row);
        let v = uniform_f32(rng, row);
        cache.append(req, slot, pos, &k, &v).unwrap();
        naive
            .pages
            .entry((req, slot))
            .or_default()
            .push((pos, k, v));
    }
}

fn got_view(cache: &dyn DecodeCache, req: u64, slot: usize) -> Vec<Entry> {
    cache
        .view(req, slot)
        .unwrap()
        .iter()
        .map(|t| (t.pos, t.k.to_vec(), t.v.to_vec()))
        .collect()
}

/// Naive single-query attention in f64: scores, max, exp, normalise, weighted sum.
pub fn naive_attend(
    entries: &[Entry],
    q: &[f32],
    q_pos: u32,
    hq: usize,
    hkv: usize,
    dh: usize,
    scale: f32,
) -> Vec<f64> {
    let group = hq / hkv;
    let mut out = vec![0f64; hq * dh];
    let vis: Vec<&Entry> = entries.iter().filter(|e| e.0 <= q_pos).collect();
    if vis.is_empty() {
        return out;
    }
    for i in 0..hq {
        let g = i / group;
        let scores: Vec<f64> = vis
            .iter()
            .map(|e| {
                (0..dh)
                    .map(|d| q[i * dh + d] as f64 * e.1[g * dh + d] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for (e, wi) in vis.iter().zip(&w) {
            for d in 0..dh {
                out[i * dh + d] += wi / z * e.2[g * dh + d] as f64;
            }
        }
    }
    out
}

fn spec(plan: RecursionPlan, hkv: usize, dh: usize, bt: usize, blocks: usize) -> DecodeCacheSpec {
    DecodeCacheSpec {
        plan,
        num_kv_heads: hkv,
        head_dim: dh,
        block_tokens: bt,
        max_blocks: blocks,
    }
}

fn policy(mode: DecodeMode, n: usize) -> Box<dyn KvPolicy> {
    match mode {
        DecodeMode::RecursionWise => Box::new(RecursionWise::new(n).unwrap()),
        DecodeMode::Sharing => Box::new(RecursiveSharing::new(n).unwrap()),
        DecodeMode::Hybrid => Box::new(Hybrid::new(n).unwrap()),
    }
}

const MODES: [DecodeMode; 3] = [
    DecodeMode::RecursionWise,
    DecodeMode::Sharing,
    DecodeMode::Hybrid,
];

fn is_invalid<T: std::fmt::Debug>(r: mor_kvcache::Result<T>) {
    assert!(
        matches!(r, Err(Error::Invalid { .. })),
        "expected Error::Invalid, got {r:?}"
    );
}

#[test]
fn writes_follow_the_policy() {
    let p = plan(true, 3, 2, true); // prelude, (1,0) (1,1) (2,0) (2,1) (3,0) (3,1), coda
    let want = [
        ("recursion_wise", [true; 8]),
        (
            "recursive_sharing",
            [true, true, true, false, false, false, false, true],
        ),
        ("hybrid", [true; 8]),
    ];
    for (mode, (name, w)) in MODES.into_iter().zip(want) {
        let c = policy(mode, 3)
            .new_decode_cache(&spec(p.clone(), 1, 2, 4, 8))
            .unwrap();
        assert_eq!(c.policy(), name);
        assert_eq!(c.mode(), mode);
        assert_eq!(
            (0..8).map(|s| c.writes(s)).collect::<Vec<_>>(),
            w.to_vec(),
            "{name}"
        );
        assert!(!c.writes(8));
        let src: Vec<_> = (0..8).map(|s| c.source_slot(s).unwrap()).collect();
        let shared_src = vec![0, 1, 2, 1, 2, 1, 2, 7];
        let own: Vec<_> = (0..8).collect();
        assert_eq!(
            src,
            if mode == DecodeMode::RecursionWise {
                own
            } else {
                shared_src
            },
            "{name}"
        );
    }
}

#[test]
fn views_hold_exactly_what_each_slot_must_see() {
    let (hkv, dh, bt) = (2, 3, 3);
    let p = plan(true, 3, 2, true);
    for mode in MODES {
        let mut rng = Rng::new(10 + mode as u64);
        let mut c = policy(mode, 3)
            .new_decode_cache(&spec(p.clone(), hkv, dh, bt, 200))
            .unwrap();
        let mut naive = Naive::default();
        for req in [7u64, 9] {
            c.start(req).unwrap();
        }
        for pos in 0..20u32 {
            for req in [7u64, 9] {
                let depth = 1 + rng.below(3);
                run_token(
                    c.as_mut(),
                    &p,
                    &mut naive,
                    &mut rng,
                    req,
                    pos,
                    depth,
                    hkv * dh,
                );
                // The token's own entry is visible at every slot it reached (it attends to itself).
                for slot in 0..p.slots.len() {
                    if reaches(&p, slot, depth) {
                        assert_eq!(
                            c.view(req, slot).unwrap().iter().last().unwrap().pos,
                            pos,
                            "{mode} slot {slot}"
                        );
                    }
                }
            }
        }
        for req in [7u64, 9] {
            for slot in 0..p.slots.len() {
                let want = expected_view(mode, &p, &naive, req, slot);
                assert_eq!(
                    got_view(c.as_ref(), req, slot),
                    want,
                    "{mode} req {req} slot {slot}"
                );
                let view = c.view(req, slot).unwrap();
                assert_eq!(view.len(), want.len());
                let dense = view.to_dense();
                let n = want.len();
                for (i, e) in want.iter().enumerate() {
                    assert_eq!(dense.pos[i], e.0);
                    for g in 0..hkv {
                        assert_eq!(&dense.k[(g * n + i) * dh..][..dh], &e.1[g * dh..][..dh]);
                        assert_eq!(&dense.v[(g * n + i) * dh..][..dh], &e.2[g * dh..][..dh]);
                    }
                }
                let kv: StepKv = view.to_step_kv(&candle_core::Device::Cpu).unwrap();
                assert_eq!(kv.k.dims(), &[1, hkv, n, dh]);
                assert_eq!(
                    kv.k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    dense.k
                );
            }
        }
    }
}

#[test]
fn attend_matches_naive_softmax_attention() {
    let (hkv, dh, hq, bt) = (2, 5, 6, 4);
    let p = plan(false, 2, 1, false); // (1,0), (2,0)
    for mode in MODES {
        let mut rng = Rng::new(20 + mode as u64);
        let mut c = policy(mode, 2)
            .new_decode_cache(&spec(p.clone(), hkv, dh, bt, 64))
            .unwrap();
        let mut naive = Naive::default();
        c.start(1).unwrap();
        for pos in 0..23u32 {
            let depth = 1 + rng.below(2);
            run_token(
                c.as_mut(),
                &p,
                &mut naive,
                &mut rng,
                1,
                pos * 2 + 1,
                depth,
                hkv * dh,
            );
        }
        let scale = 1.0 / (dh as f32).sqrt();
        for slot in 0..2 {
            let want_entries = expected_view(mode, &p, &naive, 1, slot);
            let view = c.view(1, slot).unwrap();
            // Causal cut-offs: before the first key, between keys, on a key, after the last.
            for q_pos in [0u32, 8, 9, 30, 45, 100] {
                let q: Vec<f32> = uniform_f32(&mut rng, hq * dh)
                    .into_iter()
                    .map(|x| x * 3.0)
                    .collect();
                let got = attend(&view, &q, q_pos, hq, scale).unwrap();
                let want = naive_attend(&want_entries, &q, q_pos, hq, hkv, dh, scale);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{mode} slot {slot} q_pos {q_pos}: {a} vs {b}"
                    );
                }
                if q_pos == 0 {
                    assert!(got.iter().all(|&x| x == 0.0), "no visible key gives zeros");
                }
            }
        }
        let view = c.view(1, 0).unwrap();
        is_invalid(attend(&view, &[0.0; 25], 5, 5, 1.0)); // 5 heads over 2 kv heads
        is_invalid(attend(&view, &[0.0; 7], 5, 6, 1.0)); // wrong length
        is_invalid(attend(&view, &[], 5, 0, 1.0));
    }
}

/// Query heads sharing a kv head (GQA groups of 1, 2, 3, 4 and 8 query heads; heads of
/// two, three and four 16-lane vectors; K/V in f32 and bf16): every tier against the naive
/// f64 attention, and each head's output, bit for bit, the one it gets as the only query
/// head of its kv head (the kernels read each K/V row once per group; that must not change
/// any head's arithmetic). The view also says how many entries a query sees.
#[test]
fn grouped_query_heads_match_naive_and_each_head_alone() {
    use mor_kernels::cpu::isa::{detected, Tier};
    use mor_kvcache::decode::{attend_into_tier, KvPrecision};
    let tiers: Vec<Tier> = Tier::ALL.into_iter().filter(|&t| t <= detected()).collect();
    let bt = 16;
    let tokens = 37u32;
    for precision in [KvPrecision::F32, KvPrecision::Bf16] {
        for (hkv, group, dh) in [
            (2, 1, 64),
            (2, 2, 64),
            (2, 2, 48),
            (1, 3, 32),
            (1, 4, 48),
            (2, 4, 64),
            (1, 8, 32),
        ] {
            let hq = hkv * group;
            let row = hkv * dh;
            let mut rng = Rng::new(60 + (hkv * 100 + group * 10) as u64 + dh as u64);
            let mut c = RecursionWise::new(1)
                .unwrap()
                .new_decode_cache(&DecodeCacheSpec::vanilla(1, hkv, dh, bt, 8))
                .unwrap();
            c.set_kv_precision(precision).unwrap();
            c.start(0).unwrap();
            // Positions 0, 2, 4, ...: three blocks, the last one partly filled.
            for t in 0..tokens {
                let k = uniform_f32(&mut rng, row);
                let v = uniform_f32(&mut rng, row);
                c.append(0, 0, 2 * t, &k, &v).unwrap();
            }
            // The stored (for bf16, rounded) rows.
            let entries = got_view(c.as_ref(), 0, 0);
            let view = c.view(0, 0).unwrap();
            let scale = 1.0 / (dh as f32).sqrt();
            for q_pos in [0u32, 9, 30, 32, 72, 500] {
                let visible = entries.iter().filter(|e| e.0 <= q_pos).count();
                assert_eq!(view.visible_len(q_pos), visible, "q_pos {q_pos}");
                view.prefetch(q_pos);
                let q: Vec<f32> = uniform_f32(&mut rng, hq * dh)
                    .into_iter()
                    .map(|x| x * 4.0)
                    .collect();
                let want = naive_attend(&entries, &q, q_pos, hq, hkv, dh, scale);
                for &tier in &tiers {
                    let mut got = vec![f32::NAN; hq * dh];
                    attend_into_tier(&view, &q, q_pos, hq, scale, &mut got, tier).unwrap();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{precision} hkv {hkv} group {group} dh {dh} {tier} q_pos {q_pos} \
                             [{i}]: {a} vs {b}"
                        );
                    }
                    for j in 0..group {
                        // Query head j of every group, alone over its kv head.
                        let qa: Vec<f32> = (0..hkv)
                            .flat_map(|g| {
                                q[(g * group + j) * dh..(g * group + j + 1) * dh].to_vec()
                            })
                            .collect();
                        let mut alone = vec![f32::NAN; hkv * dh];
                        attend_into_tier(&view, &qa, q_pos, hkv, scale, &mut alone, tier).unwrap();
                        for g in 0..hkv {
                            let h = g * group + j;
                            let (x, y) = (&got[h * dh..(h + 1) * dh], &alone[g * dh..(g + 1) * dh]);
                            assert!(
                                x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{precision} group {group} dh {dh} {tier} head {h}: grouped \
                                 {x:?} vs alone {y:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Σ over pages of ceil(len / bt).
fn naive_blocks(naive: &Naive, bt: usize) -> usize {
    naive.pages.values().map(|v| v.len().div_ceil(bt)).sum()
}

#[test]
fn block_accounting_is_exact_and_end_frees_blocks() {
    let (hkv, dh, bt) = (2, 4, 3);
    let p = plan(true, 3, 2, true);
    for mode in MODES {
        let mut rng = Rng::new(30);
        let mut c = policy(mode, 3)
            .new_decode_cache(&spec(p.clone(), hkv, dh, bt, 300))
            .unwrap();
        let block_bytes = bt * 2 * hkv * dh * 4;
        assert_eq!(c.block_bytes(), block_bytes);
        assert_eq!(c.bytes_reserved(), 300 * block_bytes);
        let mut naive = Naive::default();
        for req in 0..3u64 {
            c.start(req).unwrap();
        }
        for pos in 0..17u32 {
            for req in 0..3u64 {
                let depth = 1 + rng.below(3);
                run_token(
                    c.as_mut(),
                    &p,
                    &mut naive,
                    &mut rng,
                    req,
                    pos,
                    depth,
                    hkv * dh,
                );
                let blocks = naive_blocks(&naive, bt);
                let tokens: usize = naive.pages.values().map(Vec::len).sum();
                assert_eq!(c.bytes_used(), blocks * block_bytes);
                assert_eq!(c.free_blocks(), 300 - blocks);
                assert_eq!(c.tokens_stored(), tokens);
                assert_eq!(c.bytes_stored(), tokens * 2 * hkv * dh * 4);
            }
        }
        let before = c.free_blocks();
        let mine: usize = naive
            .pages
            .iter()
            .filter(|((r, _), _)| *r == 1)
            .map(|(_, v)| v.len().div_ceil(bt))
            .sum();
        let my_tokens: usize = naive
            .pages
            .iter()
            .filter(|((r, _), _)| *r == 1)
            .map(|(_, v)| v.len())
            .sum();
        let tokens_before = c.tokens_stored();
        c.end(1).unwrap();
        assert_eq!(c.free_blocks(), before + mine);
        assert_eq!(c.tokens_stored(), tokens_before - my_tokens);
        is_invalid(c.view(1, 0));
        // The other requests are intact.
        naive.pages.retain(|(r, _), _| *r != 1);
        for req in [0u64, 2] {
            for slot in 0..p.slots.len() {
                assert_eq!(
                    got_view(c.as_ref(), req, slot),
                    expected_view(mode, &p, &naive, req, slot)
                );
            }
        }
        c.release_all();
        assert_eq!(
            (c.bytes_used(), c.tokens_stored(), c.free_blocks()),
            (0, 0, 300)
        );
        assert!(!c.is_active(0));
    }
}

/// Token depths from expert-choice routing on random scores: step r keeps the top
/// `max(1, floor(cap_r · L))` of the tokens kept at step r−1 (spec §3.1).
fn expert_choice_depths(rng: &mut Rng, l: usize, caps: &[f64]) -> (Vec<usize>, Vec<usize>) {
    let mut depth = vec![0usize; l];
    let mut active: Vec<usize> = (0..l).collect();
    let mut ks = Vec::new();
    for (r, cap) in caps.iter().enumerate() {
        let k = ((cap * l as f64).floor() as usize).max(1);
        let scores: Vec<f64> = (0..l).map(|_| rng.uniform()).collect();
        active.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
        active.truncate(k);
        for &t in &active {
            depth[t] = r + 1;
        }
        ks.push(k);
    }
    (depth, ks)
}

#[test]
fn stored_bytes_match_the_cost_table() {
    let (hkv, dh, bt, l, bd) = (1, 2, 8, 2048, 2);
    for n in [2usize, 3, 4] {
        let caps: Vec<f64> = (1..=n).map(|r| (n - r + 1) as f64 / n as f64).collect();
        let mut rng = Rng::new(40 + n as u64);
        let (depth, ks) = expert_choice_depths(&mut rng, l, &caps);
        if n == 3 {
            assert_eq!(ks, vec![2048, 1365, 682], "spec §3.1's k_r for L = 2048");
        }
        let p = plan(false, n, bd, false);
        let mut vanilla = PagedCache::vanilla(n * bd, hkv, dh, bt, 4096).unwrap();
        vanilla.start(0).unwrap();
        for (t, _) in depth.iter().enumerate() {
            for s in 0..n * bd {
                vanilla
                    .append(0, s, t as u32, &[0.5; 2], &[0.25; 2])
                    .unwrap();
            }
        }
        assert_eq!(vanilla.bytes_stored(), l * n * bd * 2 * hkv * dh * 4);
        for mode in MODES {
            let pol = policy(mode, n);
            let mut c = pol
                .new_decode_cache(&spec(p.clone(), hkv, dh, bt, 4096))
                .unwrap();
            c.start(0).unwrap();
            let mut naive = Naive::default();
            for (t, &d) in depth.iter().enumerate() {
                run_token(
                    c.as_mut(),
                    &p,
                    &mut naive,
                    &mut rng,
                    0,
                    t as u32,
                    d,
                    hkv * dh,
                );
            }
            let ratio = c.bytes_stored() as f64 / vanilla.bytes_stored() as f64;
            // Exact for this routing: Σ_r k_r / (N_r · L) (sharing: only step 1 stores).
            let exact = match mode {
                DecodeMode::Sharing => 1.0 / n as f64,
                _ => ks.iter().sum::<usize>() as f64 / (n * l) as f64,
            };
            assert!(
                (ratio - exact).abs() < 1e-12,
                "{mode} N_r={n}: {ratio} vs {exact}"
            );
            let KvCost { memory_ratio, .. } = pol.cost(n, &caps);
            let closed = match mode {
                DecodeMode::Sharing => 1.0 / n as f64,
                _ => (n as f64 + 1.0) / (2.0 * n as f64),
            };
            assert!((memory_ratio - closed).abs() < 1e-12);
            assert!(
                (ratio - closed).abs() / closed < 0.01,
                "{mode} N_r={n}: measured {ratio}, closed form {closed}"
            );
        }
    }
}

#[test]
fn exhaustion_is_back_pressure_and_leaves_the_cache_unchanged() {
    let mut c = PagedCache::vanilla(1, 1, 2, 2, 3).unwrap();
    c.start(1).unwrap();
    c.start(2).unwrap();
    for pos in 0..4u32 {
        c.append(1, 0, pos, &[pos as f32, 1.0], &[2.0, pos as f32])
            .unwrap();
    }
    for pos in 0..2u32 {
        c.append(2, 0, pos, &[10.0 + pos as f32, 0.0], &[0.0, 10.0])
            .unwrap();
    }
    assert_eq!(c.free_blocks(), 0);
    assert_eq!(c.blocks_needed(2, &[0]).unwrap(), 1);
    let snapshot = |c: &PagedCache| {
        (
            got_view(c, 1, 0),
            got_view(c, 2, 0),
            c.tokens_stored(),
            c.bytes_used(),
        )
    };
    let before = snapshot(&c);
    match c.append(2, 0, 2, &[0.0; 2], &[0.0; 2]) {
        Err(Error::Exhausted {
            needed: 1,
            free: 0,
            total: 3,
        }) => {}
        other => panic!("expected Exhausted, got {other:?}"),
    }
    assert!(matches!(
        c.append(1, 0, 4, &[0.0; 2], &[0.0; 2]),
        Err(Error::Exhausted { .. })
    ));
    assert_eq!(snapshot(&c), before);
    c.end(1).unwrap();
    assert_eq!(c.free_blocks(), 2);
    c.append(2, 0, 2, &[5.0, 6.0], &[7.0, 8.0]).unwrap();
    let v = got_view(&c, 2, 0);
    assert_eq!(v.len(), 3);
    assert_eq!(&v[..2], &before.1[..]);
    assert_eq!(v[2], (2, vec![5.0, 6.0], vec![7.0, 8.0]));
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let p = plan(true, 2, 1, true); // prelude, (1,0), (2,0), coda
    let mut sharing = RecursiveSharing::new(2)
        .unwrap()
        .new_decode_cache(&spec(p.clone(), 1, 2, 2, 8))
        .unwrap();
    is_invalid(sharing.append(5, 0, 0, &[0.0; 2], &[0.0; 2])); // unknown request
    is_invalid(sharing.view(5, 0));
    is_invalid(sharing.end(5));
    sharing.start(5).unwrap();
    is_invalid(sharing.start(5));
    is_invalid(sharing.append(5, 4, 0, &[0.0; 2], &[0.0; 2])); // slot out of range
    is_invalid(sharing.view(5, 4));
    is_invalid(sharing.blocks_needed(5, &[4]));
    is_invalid(sharing.append(5, 0, 0, &[0.0; 3], &[0.0; 2])); // wrong length
    is_invalid(sharing.append(5, 2, 0, &[0.0; 2], &[0.0; 2])); // step 2 stores nothing under sharing
    sharing.append(5, 1, 3, &[0.0; 2], &[0.0; 2]).unwrap();
    is_invalid(sharing.append(5, 1, 3, &[0.0; 2], &[0.0; 2])); // position not increasing
    is_invalid(sharing.append(5, 1, 2, &[0.0; 2], &[0.0; 2]));
    is_invalid(sharing.append(5, 1, mor_kernels::PAD_POS, &[0.0; 2], &[0.0; 2]));
    assert_eq!(sharing.view(5, 2).unwrap().positions(), vec![3]); // step 2 reads step 1
    assert_eq!(sharing.tokens_stored(), 1);

    let mut hybrid = Hybrid::new(2)
        .unwrap()
        .new_decode_cache(&spec(p.clone(), 1, 2, 2, 8))
        .unwrap();
    hybrid.start(0).unwrap();
    // Step 2 before step 1 would overlay a position step 1 never stored.
    is_invalid(hybrid.append(0, 2, 0, &[0.0; 2], &[0.0; 2]));
    hybrid.append(0, 1, 0, &[1.0; 2], &[1.0; 2]).unwrap();
    hybrid.append(0, 2, 0, &[2.0; 2], &[2.0; 2]).unwrap();
    assert_eq!(
        got_view(hybrid.as_ref(), 0, 2),
        vec![(0, vec![2.0; 2], vec![2.0; 2])]
    );
    assert_eq!(
        got_view(hybrid.as_ref(), 0, 1),
        vec![(0, vec![1.0; 2], vec![1.0; 2])]
    );

    // Bad specs.
    let bad = |s: DecodeCacheSpec| {
        RecursionWise::new(2)
            .unwrap()
            .new_decode_cache(&s)
            .map(|_| ())
    };
    is_invalid(bad(spec(p.clone(), 0, 2, 2, 8)));
    is_invalid(bad(spec(p.clone(), 1, 0, 2, 8)));
    is_invalid(bad(spec(p.clone(), 1, 2, 0, 8)));
    is_invalid(bad(spec(p.clone(), 1, 2, 1 << 40, 1 << 40)));
    // Sharing needs a step-1 slot for every later layer.
    let mut no_first = p.clone();
    no_first.slots.remove(1);
    is_invalid(
        RecursiveSharing::new(2)
            .unwrap()
            .new_decode_cache(&spec(no_first.clone(), 1, 2, 2, 8))
            .map(|_| ()),
    );
    assert!(RecursionWise::new(2)
        .unwrap()
        .new_decode_cache(&spec(no_first, 1, 2, 2, 8))
        .is_ok());
}

/// A policy outside the built-ins that keeps nothing and projects only at step 1: no
/// built-in decode cache fits it.
#[derive(Debug)]
struct StepOneOnly;

impl KvPolicy for StepOneOnly {
    fn name(&self) -> &'static str {
        "step_one_only"
    }
    fn projects_kv(&self, step: usize) -> bool {
        step == 1
    }
    fn keeps_first_step(&self) -> bool {
        false
    }
    fn training_kv(
        &self,
        _: usize,
        fresh: Option<&StepKv>,
        _: Option<&StepKv>,
        _: &candle_core::Tensor,
    ) -> mor_kvcache::Result<StepKv> {
        fresh.cloned().ok_or(Error::Invalid {
            policy: "step_one_only",
            msg: "no fresh".into(),
        })
    }
    fn cost(&self, _: usize, _: &[f64]) -> KvCost {
        KvCost {
            memory_ratio: 1.0,
            io_ratio: 1.0,
            attn_flops_ratio: vec![],
        }
    }
}

#[test]
fn decode_mode_is_inferred_from_training_behaviour() {
    for mode in MODES {
        assert_eq!(
            DecodeMode::infer(policy(mode, 3).as_ref(), 3).unwrap(),
            mode
        );
    }
    // With one step the three behaviours coincide.
    assert_eq!(
        DecodeMode::infer(&StepOneOnly, 1).unwrap(),
        DecodeMode::RecursionWise
    );
    is_invalid(DecodeMode::infer(&StepOneOnly, 3));
    is_invalid(
        StepOneOnly
            .new_decode_cache(&spec(plan(false, 3, 1, false), 1, 1, 1, 1))
            .map(|_| ()),
    );
}

#[test]
fn vanilla_is_a_plain_per_layer_cache() {
    let mut c = PagedCache::vanilla(3, 1, 1, 2, 16).unwrap();
    assert_eq!(c.num_slots(), 3);
    c.start(0).unwrap();
    for pos in 0..5u32 {
        for s in 0..3 {
            c.append(0, s, pos, &[(pos * 10 + s as u32) as f32], &[0.0])
                .unwrap();
        }
    }
    for s in 0..3 {
        let ks: Vec<f32> = c.view(0, s).unwrap().iter().map(|t| t.k[0]).collect();
        assert_eq!(ks, (0..5).map(|p| (p * 10 + s) as f32).collect::<Vec<_>>());
    }
    assert_eq!(c.tokens_stored(), 15);
    assert_eq!(c.bytes_used(), 3 * 3 * c.block_bytes());
}

#[path = "decode_tiers.rs"]
mod tiers;
