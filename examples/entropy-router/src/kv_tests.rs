//! Contract tests of `strided_kv`: the key sets against a naive reference, the two
//! extremes against the built-in policies, gradients, the "never read an unwritten step"
//! rule, closed-form costs, and the decode cache against the training semantics.

use super::*;
use candle_core::{Device, Var};
use mor_core::plan::{RecursionPlan, Slot};
use mor_core::rng::Rng;
use proptest::prelude::*;

/// Random `[b, hkv, n, dh]` K and V at the given positions (`PAD_POS` allowed).
fn step_kv(pos: &[Vec<u32>], hkv: usize, dh: usize, rng: &mut Rng) -> StepKv {
    let (b, n) = (pos.len(), pos[0].len());
    let mut t = || {
        let v: Vec<f64> = (0..b * hkv * n * dh).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, (b, hkv, n, dh), &Device::Cpu).unwrap()
    };
    let (k, v) = (t(), t());
    let flat: Vec<u32> = pos.iter().flatten().copied().collect();
    StepKv {
        k,
        v,
        pos: Tensor::from_vec(flat, (b, n), &Device::Cpu).unwrap(),
    }
}

/// Ascending random subsets of `0..l`, padded with `PAD_POS` to a common length (at least
/// one entry per row).
fn selection(b: usize, l: usize, keep: f64, rng: &mut Rng) -> Vec<Vec<u32>> {
    let mut rows: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..l as u32).filter(|_| rng.uniform() < keep).collect())
        .collect();
    let m = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    for r in &mut rows {
        r.resize(m, PAD_POS);
    }
    rows
}

/// `[b, n]` u32 positions.
fn pos_tensor(rows: &[Vec<u32>]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

/// Host rows `(position, k entries, v entries)` of a StepKv, padding dropped.
fn entries(kv: &StepKv) -> Vec<Vec<(u32, Vec<f64>, Vec<f64>)>> {
    let pos = kv.pos.to_vec2::<u32>().unwrap();
    let k = kv.k.transpose(1, 2).unwrap().contiguous().unwrap();
    let v = kv.v.transpose(1, 2).unwrap().contiguous().unwrap();
    let (b, n) = (pos.len(), pos[0].len());
    let k = k.reshape((b, n, ())).unwrap().to_vec3::<f64>().unwrap();
    let v = v.reshape((b, n, ())).unwrap().to_vec3::<f64>().unwrap();
    (0..b)
        .map(|bi| {
            (0..n)
                .filter(|&i| pos[bi][i] != PAD_POS)
                .map(|i| (pos[bi][i], k[bi][i].clone(), v[bi][i].clone()))
                .collect()
        })
        .collect()
}

fn full_positions(b: usize, l: usize) -> Vec<Vec<u32>> {
    vec![(0..l as u32).collect(); b]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Steps >= 2 see the step-1 entries of the landmarks and the fresh entries of the other
    /// selected tokens, in position order, padding last.
    #[test]
    fn later_steps_see_landmarks_and_fresh_tokens(
        b in 1usize..4, l in 1usize..20, hkv in 1usize..3, dh in 1usize..4,
        stride in 2usize..6, keep in 0.0f64..1.0, seed in 0u64..1000,
    ) {
        let mut rng = Rng::new(seed);
        let policy = StridedKv::new(3, stride).unwrap();
        let first = step_kv(&full_positions(b, l), hkv, dh, &mut rng);
        let sel = selection(b, l, keep, &mut rng);
        let fresh = step_kv(&sel, hkv, dh, &mut rng);
        let out = policy.training_kv(2, Some(&fresh), Some(&first), &pos_tensor(&sel)).unwrap();
        let got = entries(&out);
        let (fe, se) = (entries(&first), entries(&fresh));
        let n = out.pos.dim(1).unwrap();
        for bi in 0..b {
            let mut want: Vec<_> = fe[bi].iter().filter(|e| on_stride(e.0, stride)).cloned().collect();
            want.extend(se[bi].iter().filter(|e| !on_stride(e.0, stride)).cloned());
            want.sort_by_key(|e| e.0);
            prop_assert_eq!(&got[bi], &want);
            // Padding only at the end.
            let pos = out.pos.to_vec2::<u32>().unwrap();
            prop_assert!(pos[bi][want.len()..].iter().all(|&p| p == PAD_POS));
            prop_assert!(n >= want.len());
        }
    }

    /// `stride = 1` is recursive sharing and `stride = 0` recursion-wise caching, at every
    /// step, in the decode mode and in the cost table.
    #[test]
    fn extremes_are_the_builtin_policies(
        b in 1usize..3, l in 1usize..12, nr in 1usize..5, keep in 0.0f64..1.0, seed in 0u64..1000,
    ) {
        let mut rng = Rng::new(seed);
        let share = RecursiveSharing::new(nr).unwrap();
        let wise = RecursionWise::new(nr).unwrap();
        let s1 = StridedKv::new(nr, 1).unwrap();
        let s0 = StridedKv::new(nr, 0).unwrap();
        let all = full_positions(b, l);
        let first = step_kv(&all, 2, 3, &mut rng);
        let caps = [1.0, 0.7, 0.4, 0.2];
        for (mine, theirs) in [(&s1 as &dyn KvPolicy, &share as &dyn KvPolicy), (&s0, &wise)] {
            prop_assert_eq!(mine.keeps_first_step(), theirs.keeps_first_step());
            prop_assert_eq!(mine.cost(nr, &caps), theirs.cost(nr, &caps));
            for step in 1..=nr {
                prop_assert_eq!(mine.projects_kv(step), theirs.projects_kv(step));
                let sel = if step == 1 { all.clone() } else { selection(b, l, keep, &mut rng) };
                let fresh = mine.projects_kv(step).then(|| step_kv(&sel, 2, 3, &mut rng));
                let first = (mine.keeps_first_step() && step >= 2).then_some(&first);
                let a = mine.training_kv(step, fresh.as_ref(), first, &pos_tensor(&sel)).unwrap();
                let t = theirs.training_kv(step, fresh.as_ref(), first, &pos_tensor(&sel)).unwrap();
                prop_assert_eq!(entries(&a), entries(&t));
            }
        }
    }
}

/// `d(Σ c·k)/d first` is `c` at the landmark rows and 0 elsewhere; `d/d fresh` is `c` at
/// the non-landmark selected rows.
#[test]
fn gradients_reach_first_at_landmarks_and_fresh_elsewhere() -> candle_core::Result<()> {
    let (l, dh) = (6, 2);
    let mut rng = Rng::new(3);
    let policy = StridedKv::new(2, 3).unwrap();
    let first = step_kv(&full_positions(1, l), 1, dh, &mut rng);
    let sel = vec![vec![1u32, 3, 4, PAD_POS]];
    let fresh = step_kv(&sel, 1, dh, &mut rng);
    let fk = Var::from_tensor(&first.k)?;
    let sk = Var::from_tensor(&fresh.k)?;
    let first = StepKv {
        k: fk.as_tensor().clone(),
        ..first
    };
    let fresh = StepKv {
        k: sk.as_tensor().clone(),
        ..fresh
    };
    let out = policy
        .training_kv(2, Some(&fresh), Some(&first), &pos_tensor(&sel))
        .unwrap();
    // Landmarks 0 and 3 (step-1 K/V) and tokens 1 and 4 (fresh K/V); no padding.
    assert_eq!(out.pos.to_vec2::<u32>()?, vec![vec![0, 1, 3, 4]]);
    let c = Tensor::arange(1f64, 1.0 + (4 * dh) as f64, &Device::Cpu)?.reshape((1, 1, 4, dh))?;
    let grads = (out.k * &c)?.sum_all()?.backward()?;
    let gf = grads
        .get(fk.as_tensor())
        .expect("grad of first")
        .squeeze(0)?
        .to_vec3::<f64>()?;
    let gs = grads
        .get(sk.as_tensor())
        .expect("grad of fresh")
        .squeeze(0)?
        .to_vec3::<f64>()?;
    let c = c.flatten_all()?.to_vec1::<f64>()?;
    let row = |i: usize| c[i * dh..(i + 1) * dh].to_vec();
    let zero = vec![0.0; dh];
    assert_eq!(
        gf[0],
        [
            row(0),
            zero.clone(),
            zero.clone(),
            row(2),
            zero.clone(),
            zero.clone()
        ]
    );
    // Token 3 is a landmark: its fresh K/V is not used.
    assert_eq!(gs[0], [row(1), zero.clone(), row(3), zero]);
    Ok(())
}

#[test]
fn never_reads_a_step_that_was_not_written() {
    let mut rng = Rng::new(0);
    let p = StridedKv::new(3, 2).unwrap();
    let all = full_positions(1, 4);
    let first = step_kv(&all, 1, 2, &mut rng);
    let sel = vec![vec![1u32, 2]];
    let fresh = step_kv(&sel, 1, 2, &mut rng);
    let s = pos_tensor(&sel);
    let msg = |r: Result<StepKv>| r.unwrap_err().to_string();
    assert!(
        msg(p.training_kv(1, Some(&first), Some(&first), &pos_tensor(&all)))
            .contains("never written")
    );
    assert!(msg(p.training_kv(2, Some(&fresh), None, &s)).contains("missing"));
    assert!(msg(p.training_kv(2, None, Some(&first), &s)).contains("fresh K/V missing"));
    assert!(msg(p.training_kv(0, Some(&fresh), None, &s)).contains("out of range"));
    assert!(msg(p.training_kv(4, Some(&fresh), Some(&first), &s)).contains("out of range"));
    // Fresh K/V of other tokens than the queries.
    let other = pos_tensor(&[vec![1u32, 3]]);
    assert!(msg(p.training_kv(2, Some(&fresh), Some(&first), &other)).contains("differs"));
    let bad = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(msg(p.training_kv(2, Some(&fresh), Some(&first), &bad)).contains("u32"));
    assert!(StridedKv::new(0, 2).is_err());
}

/// Stride 2 with the auto capacities of N_r = 3 (`[1, 2/3, 1/3]`, spec §3.1): `κ_2 = 5/6`,
/// `κ_3 = 2/3`, memory `(1 + 5/6 + 2/3)/3 = 5/6`, attention `[1, 5/9, 2/9]`.
#[test]
fn cost_has_the_documented_closed_form() {
    let c = StridedKv::new(3, 2).unwrap().cost(3, &[]);
    assert!((c.memory_ratio - 5.0 / 6.0).abs() < 1e-12);
    assert!((c.io_ratio - 5.0 / 6.0).abs() < 1e-12);
    let want = [1.0, 5.0 / 9.0, 2.0 / 9.0];
    for (a, b) in c.attn_flops_ratio.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{:?}", c.attn_flops_ratio);
    }
    let ctx = CheckCtx::default();
    assert!(StridedKv::accounting(&StridedKvParams { stride: 1 }, &ctx).kv_sharing);
    assert!(!StridedKv::accounting(&StridedKvParams { stride: 4 }, &ctx).kv_sharing);
}

/// A cycle plan of `layers` block layers run `nr` times.
fn plan(layers: usize, nr: usize) -> RecursionPlan {
    let slots = (1..=nr)
        .flat_map(|step| {
            (0..layers).map(move |layer| Slot {
                block: layer,
                segment: Segment::Recursion { step, layer },
            })
        })
        .collect();
    RecursionPlan {
        strategy: "cycle".into(),
        num_recursions: nr,
        base_depth: layers,
        num_blocks: layers,
        requested_layers: layers * nr,
        depth_fix: Default::default(),
        slots,
    }
}

fn spec(
    layers: usize,
    nr: usize,
    hkv: usize,
    dh: usize,
    bt: usize,
    blocks: usize,
) -> DecodeCacheSpec {
    DecodeCacheSpec {
        plan: plan(layers, nr),
        num_kv_heads: hkv,
        head_dim: dh,
        block_tokens: bt,
        max_blocks: blocks,
    }
}

/// Host `(pos, k, v)` entries of a decode view, as f64.
fn view_entries(view: &KvView<'_>) -> Vec<(u32, Vec<f64>, Vec<f64>)> {
    let dense = view.to_dense();
    let (h, n, dh) = (dense.num_kv_heads, dense.pos.len(), dense.head_dim);
    (0..n)
        .map(|i| {
            let row = |x: &[f32]| -> Vec<f64> {
                (0..h)
                    .flat_map(|g| {
                        x[(g * n + i) * dh..(g * n + i + 1) * dh]
                            .iter()
                            .map(|&f| f as f64)
                    })
                    .collect()
            };
            (dense.pos[i], row(&dense.k), row(&dense.v))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Decoding token by token, the keys a query of token t sees at step r and layer j are
    /// exactly the training keys of that step restricted to positions `<= t`; prefilling step
    /// by step gives the same views. The stored entry count is the naive count.
    #[test]
    fn decode_views_equal_the_training_keys(
        l in 1usize..14, layers in 1usize..3, nr in 2usize..4, stride in 2usize..5,
        hkv in 1usize..3, dh in 1usize..3, seed in 0u64..1000,
    ) {
        let mut rng = Rng::new(seed);
        let depth: Vec<usize> = (0..l).map(|_| 1 + rng.below(nr)).collect();
        let policy = StridedKv::new(nr, stride).unwrap();
        // K/V per (step, layer): a StepKv over the tokens that reach the step.
        let sel = |r: usize| -> Vec<u32> { (0..l as u32).filter(|&t| depth[t as usize] >= r).collect() };
        let mut kv = Vec::new();
        for r in 1..=nr {
            let s = sel(r);
            let rows = vec![if s.is_empty() { vec![PAD_POS] } else { s.clone() }];
            kv.push((0..layers).map(|_| step_kv(&rows, hkv, dh, &mut rng)).collect::<Vec<_>>());
        }
        let f32_round = |e: Vec<(u32, Vec<f64>, Vec<f64>)>| -> Vec<(u32, Vec<f64>, Vec<f64>)> {
            e.into_iter()
                .map(|(p, k, v)| (p, k.iter().map(|&x| x as f32 as f64).collect(), v.iter().map(|&x| x as f32 as f64).collect()))
                .collect()
        };
        // Training keys of (step r, layer j), rounded to f32 like the cache.
        let training = |r: usize, j: usize| -> Vec<(u32, Vec<f64>, Vec<f64>)> {
            let s = sel(r);
            if s.is_empty() {
                return Vec::new();
            }
            let first = (r >= 2).then_some(&kv[0][j]);
            let out = policy.training_kv(r, Some(&kv[r - 1][j]), first, &pos_tensor(&[s])).unwrap();
            f32_round(entries(&out).remove(0))
        };
        let sp = spec(layers, nr, hkv, dh, 3, 4 * nr * layers * l.div_ceil(3) + 8);
        let host = |r: usize, j: usize, t: u32| -> (Vec<f32>, Vec<f32>) {
            let e = entries(&kv[r - 1][j]).remove(0);
            let (_, k, v) = e.into_iter().find(|e| e.0 == t).unwrap();
            (k.iter().map(|&x| x as f32).collect(), v.iter().map(|&x| x as f32).collect())
        };
        let slot = |r: usize, j: usize| (r - 1) * layers + j;

        // Token by token, in execution order.
        let mut cache = policy.new_decode_cache(&sp).unwrap();
        cache.start(1).unwrap();
        for t in 0..l as u32 {
            for r in 1..=depth[t as usize] {
                for j in 0..layers {
                    prop_assert!(cache.writes(slot(r, j)));
                    let (k, v) = host(r, j, t);
                    cache.append(1, slot(r, j), t, &k, &v).unwrap();
                    let got = view_entries(&cache.view(1, slot(r, j)).unwrap());
                    let want: Vec<_> = training(r, j).into_iter().filter(|e| e.0 <= t).collect();
                    prop_assert_eq!(got, want, "token {} step {} layer {}", t, r, j);
                }
            }
        }
        // Entries: every (token, slot) reached, minus landmarks at later steps (their copy
        // is their entry), plus the landmark copies below each later step's last token.
        let mut naive = 0usize;
        for r in 1..=nr {
            let s = sel(r);
            let last = s.last().copied();
            for _ in 0..layers {
                naive += s.iter().filter(|&&t| r == 1 || !on_stride(t, stride)).count();
                if r >= 2 {
                    naive += (0..l as u32).filter(|&p| on_stride(p, stride) && last.is_some_and(|m| p <= m)).count();
                }
            }
        }
        prop_assert_eq!(cache.tokens_stored(), naive);
        prop_assert_eq!(cache.bytes_stored(), naive * 2 * hkv * dh * 4);

        // Step by step (prefill order): the final views are the same.
        let mut pre = policy.new_decode_cache(&sp).unwrap();
        pre.start(2).unwrap();
        for r in 1..=nr {
            for j in 0..layers {
                for t in sel(r) {
                    let (k, v) = host(r, j, t);
                    pre.append(2, slot(r, j), t, &k, &v).unwrap();
                }
            }
        }
        for r in 1..=nr {
            for j in 0..layers {
                prop_assert_eq!(
                    view_entries(&pre.view(2, slot(r, j)).unwrap()),
                    view_entries(&cache.view(1, slot(r, j)).unwrap())
                );
            }
        }
        cache.end(1).unwrap();
        pre.end(2).unwrap();
        prop_assert_eq!(cache.free_blocks(), cache.total_blocks());
        prop_assert_eq!(cache.tokens_stored(), 0);
    }
}

#[test]
fn decode_cache_rejects_bad_use_and_back_pressures() {
    let policy = StridedKv::new(2, 2).unwrap();
    // One block layer, 2 steps, blocks of 2 tokens, 3 blocks.
    let mut c = policy.new_decode_cache(&spec(1, 2, 1, 1, 2, 3)).unwrap();
    assert_eq!(c.mode(), DecodeMode::Hybrid);
    assert_eq!(c.source_slot(1), Some(1));
    assert_eq!(c.source_slot(2), None);
    assert!(!c.writes(2));
    let one = [1.0f32];
    assert!(c.append(0, 0, 0, &one, &one).is_err(), "unknown request");
    c.start(0).unwrap();
    assert!(c.start(0).is_err());
    assert!(c.append(0, 2, 0, &one, &one).is_err(), "slot out of range");
    assert!(c.append(0, 0, 0, &[1.0, 2.0], &one).is_err(), "row length");
    assert!(
        c.append(0, 0, PAD_POS, &one, &one).is_err(),
        "padding position"
    );
    // Landmark 0 at step 2 before step 1.
    let e = c.append(0, 1, 0, &one, &one).unwrap_err().to_string();
    assert!(e.contains("landmark position 0"), "{e}");
    c.append(0, 0, 0, &one, &one).unwrap();
    c.append(0, 0, 1, &one, &one).unwrap();
    assert!(
        c.append(0, 0, 1, &one, &one).is_err(),
        "position not after the last"
    );
    c.append(0, 0, 2, &one, &one).unwrap();
    c.append(0, 0, 3, &one, &one).unwrap();
    // Step 1 holds 4 entries in 2 blocks; step 2 of token 3 copies landmarks 0 and 2 and
    // stores token 3: 3 entries, 2 blocks, but only 1 block is free.
    assert_eq!(c.blocks_needed(0, &[1]).unwrap(), 2);
    let before = c.tokens_stored();
    match c.append(0, 1, 3, &one, &one) {
        Err(Error::Exhausted {
            needed: 2,
            free: 1,
            total: 3,
        }) => {}
        other => panic!("expected Exhausted, got {other:?}"),
    }
    assert_eq!(c.tokens_stored(), before, "a failed append changes nothing");
    assert_eq!(c.view(0, 1).unwrap().len(), 0);
    c.end(0).unwrap();
    assert!(c.end(0).is_err());
    assert_eq!(c.free_blocks(), 3);
    assert!(c.view(0, 0).is_err());

    // Plans the cache cannot serve.
    let mut bad = spec(1, 2, 1, 1, 2, 3);
    bad.plan.slots[0].segment = Segment::Recursion { step: 2, layer: 5 };
    assert!(policy.new_decode_cache(&bad).is_err());
    assert!(StridedCache::new(1, &spec(1, 2, 1, 1, 2, 3)).is_err());
    assert!(policy.new_decode_cache(&spec(1, 2, 0, 1, 2, 3)).is_err());
}
