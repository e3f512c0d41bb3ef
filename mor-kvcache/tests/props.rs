//! Property test: random sequences of start / token / end / misuse operations against a
//! naive Vec-based model of the cache, with a small pool so exhaustion happens often.

use crate::common::{plan, uniform_f32};
use crate::decode::{expected_view, naive_attend, naive_writes, reaches, Entry, Naive};
use mor_core::plan::Segment;
use mor_core::rng::Rng;
use mor_kvcache::{
    attend, DecodeCacheSpec, DecodeMode, Error, Hybrid, KvPolicy, RecursionWise, RecursiveSharing,
};
use proptest::prelude::*;
use std::collections::HashMap;

#[derive(Debug, Clone)]
enum Op {
    Start(u64),
    End(u64),
    /// One token of the request through every slot its depth reaches.
    Token(u64, usize),
    /// A misuse: 0 slot out of range, 1 wrong row length, 2 repeated position, 3 a slot
    /// that does not store.
    Bad(u64, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..3u64).prop_map(Op::Start),
        1 => (0..3u64).prop_map(Op::End),
        8 => (0..3u64, 1..=3usize).prop_map(|(r, d)| Op::Token(r, d)),
        1 => (0..3u64, 0..4u8).prop_map(|(r, k)| Op::Bad(r, k)),
    ]
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Invalid,
    Exhausted,
}

fn outcome(r: mor_kvcache::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(Error::Invalid { .. }) => Outcome::Invalid,
        Err(Error::Exhausted { .. }) => Outcome::Exhausted,
        Err(e) => panic!("unexpected error {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn cache_matches_a_naive_model(
        mode_i in 0..3usize, n_r in 1..=3usize, bd in 1..=2usize, prelude: bool, coda: bool,
        hkv in 1..=2usize, dh in 1..=3usize, bt in 1..=3usize, max_blocks in 0..12usize,
        seed: u64, ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mode = [DecodeMode::RecursionWise, DecodeMode::Sharing, DecodeMode::Hybrid][mode_i];
        let policy: Box<dyn KvPolicy> = match mode {
            DecodeMode::RecursionWise => Box::new(RecursionWise::new(n_r).unwrap()),
            DecodeMode::Sharing => Box::new(RecursiveSharing::new(n_r).unwrap()),
            DecodeMode::Hybrid => Box::new(Hybrid::new(n_r).unwrap()),
        };
        let p = plan(prelude, n_r, bd, coda);
        let spec = DecodeCacheSpec { plan: p.clone(), num_kv_heads: hkv, head_dim: dh, block_tokens: bt, max_blocks };
        let mut c = policy.new_decode_cache(&spec).unwrap();
        let row = hkv * dh;
        let slots = p.slots.len();
        let block_bytes = bt * 2 * row * 4;
        let mut rng = Rng::new(seed);
        let mut naive = Naive::default();
        let mut next_pos: HashMap<u64, u32> = HashMap::new();
        let used = |naive: &Naive| -> usize { naive.pages.values().map(|v| v.len().div_ceil(bt)).sum() };
        let own = |naive: &Naive, r: u64, s: usize| -> Vec<Entry> { naive.pages.get(&(r, s)).cloned().unwrap_or_default() };

        for op in ops {
            match op {
                Op::Start(r) => {
                    let want = if next_pos.contains_key(&r) { Outcome::Invalid } else { Outcome::Ok };
                    prop_assert_eq!(outcome(c.start(r)), want);
                    next_pos.entry(r).or_insert(0);
                }
                Op::End(r) => {
                    let want = if next_pos.remove(&r).is_some() { Outcome::Ok } else { Outcome::Invalid };
                    prop_assert_eq!(outcome(c.end(r)), want);
                    naive.pages.retain(|(q, _), _| *q != r);
                }
                Op::Token(r, depth) => {
                    let depth = depth.min(n_r);
                    let pos = next_pos.get(&r).copied().unwrap_or(0);
                    let reached: Vec<usize> = (0..slots).filter(|&s| reaches(&p, s, depth)).collect();
                    if next_pos.contains_key(&r) {
                        let want: usize = reached.iter()
                            .filter(|&&s| naive_writes(mode, &p, s) && own(&naive, r, s).len() % bt == 0)
                            .count();
                        prop_assert_eq!(c.blocks_needed(r, &reached).unwrap(), want);
                    }
                    for s in reached {
                        prop_assert_eq!(c.writes(s), naive_writes(mode, &p, s));
                        if !naive_writes(mode, &p, s) {
                            continue;
                        }
                        let k = uniform_f32(&mut rng, row);
                        let v = uniform_f32(&mut rng, row);
                        // Under hybrid a step-r entry needs the step-1 entry of its position.
                        let overlays_nothing = matches!(p.slots[s].segment, Segment::Recursion { step, .. } if step >= 2)
                            && mode == DecodeMode::Hybrid
                            && !expected_view(DecodeMode::Sharing, &p, &naive, r, s).iter().any(|e| e.0 == pos);
                        let want = if !next_pos.contains_key(&r) || overlays_nothing {
                            Outcome::Invalid
                        } else if own(&naive, r, s).len() % bt == 0 && used(&naive) == max_blocks {
                            Outcome::Exhausted
                        } else {
                            Outcome::Ok
                        };
                        let got = outcome(c.append(r, s, pos, &k, &v));
                        prop_assert_eq!(&got, &want, "slot {} pos {}", s, pos);
                        if got == Outcome::Ok {
                            naive.pages.entry((r, s)).or_default().push((pos, k, v));
                        }
                    }
                    if let Some(np) = next_pos.get_mut(&r) {
                        *np += 1;
                    }
                }
                Op::Bad(r, kind) => {
                    let writing: Vec<usize> = (0..slots).filter(|&s| naive_writes(mode, &p, s)).collect();
                    let silent: Vec<usize> = (0..slots).filter(|&s| !naive_writes(mode, &p, s)).collect();
                    let (slot, pos, len) = match kind {
                        0 => (slots + (r as usize), 0, row),
                        1 => (writing[0], u32::MAX - 1, row + 1),
                        2 => {
                            let last = writing.iter().find_map(|&s| own(&naive, r, s).last().map(|e| (s, e.0)));
                            match last {
                                Some((s, q)) => (s, q, row),
                                None => continue,
                            }
                        }
                        _ => match silent.first() {
                            Some(&s) => (s, u32::MAX - 1, row),
                            None => continue,
                        },
                    };
                    let before = (c.tokens_stored(), c.bytes_used());
                    prop_assert_eq!(outcome(c.append(r, slot, pos, &vec![0.5; len], &vec![0.5; len])), Outcome::Invalid);
                    prop_assert_eq!((c.tokens_stored(), c.bytes_used()), before);
                }
            }
            let tokens: usize = naive.pages.values().map(Vec::len).sum();
            prop_assert_eq!(c.tokens_stored(), tokens);
            prop_assert_eq!(c.bytes_stored(), tokens * 2 * row * 4);
            prop_assert_eq!(c.bytes_used(), used(&naive) * block_bytes);
            prop_assert_eq!(c.free_blocks(), max_blocks - used(&naive));
        }

        let hq = hkv * 2;
        for &r in next_pos.keys() {
            for s in 0..slots {
                let want = expected_view(mode, &p, &naive, r, s);
                let view = c.view(r, s).unwrap();
                let got: Vec<Entry> = view.iter().map(|t| (t.pos, t.k.to_vec(), t.v.to_vec())).collect();
                prop_assert_eq!(&got, &want, "req {} slot {}", r, s);
                let q = uniform_f32(&mut rng, hq * dh);
                let q_pos = want.last().map_or(0, |e| e.0);
                let a = attend(&view, &q, q_pos, hq, 0.7).unwrap();
                let b = naive_attend(&want, &q, q_pos, hq, hkv, dh, 0.7);
                for (x, y) in a.iter().zip(&b) {
                    prop_assert!((*x as f64 - y).abs() <= 1e-5 * (1.0 + y.abs()), "{} vs {}", x, y);
                }
            }
        }
        c.release_all();
        prop_assert_eq!((c.tokens_stored(), c.bytes_used(), c.free_blocks()), (0, 0, max_blocks));
    }
}
