//! Decode attention on every instruction-set tier this CPU supports, called directly
//! through `attend_into_tier`: each tier against the naive f64 softmax attention, the
//! portable and AVX2 loops bit for bit, every tier batch-invariant (a request's output does
//! not depend on the other requests sharing the pool), and bad tiers or shapes refused.

use super::{expected_view, naive_attend, policy, run_token, spec, Naive, MODES};
use crate::common::{plan, uniform_f32};
use mor_core::rng::Rng;
use mor_kernels::cpu::isa::{detected, Tier};
use mor_kvcache::decode::{attend_into_tier, KvPrecision};
use mor_kvcache::{DecodeCache, DecodeMode, Error};

/// The tiers this CPU can run.
fn tiers() -> Vec<Tier> {
    Tier::ALL.into_iter().filter(|&t| t <= detected()).collect()
}

/// A cache of `mode` holding request 1 (depths drawn from `seed`), and, when `other`,
/// request 2's tokens interleaved with it (drawn from a separate stream, so request 1's
/// rows are the same either way).
fn filled(
    mode: DecodeMode,
    hkv: usize,
    dh: usize,
    bt: usize,
    tokens: u32,
    seed: u64,
    other: bool,
) -> (Box<dyn DecodeCache>, Naive) {
    filled_in(mode, hkv, dh, bt, tokens, seed, other, KvPrecision::F32)
}

/// [`filled`] with K/V stored in `precision`.
#[allow(clippy::too_many_arguments)]
fn filled_in(
    mode: DecodeMode,
    hkv: usize,
    dh: usize,
    bt: usize,
    tokens: u32,
    seed: u64,
    other: bool,
    precision: KvPrecision,
) -> (Box<dyn DecodeCache>, Naive) {
    let p = plan(false, 2, 1, false); // (1,0), (2,0)
    let mut c = policy(mode, 2)
        .new_decode_cache(&spec(p.clone(), hkv, dh, bt, 256))
        .unwrap();
    c.set_kv_precision(precision).unwrap();
    assert_eq!(c.kv_precision(), precision);
    let (mut rng, mut rng2) = (Rng::new(seed), Rng::new(seed + 1000));
    let (mut naive, mut naive2) = (Naive::default(), Naive::default());
    c.start(1).unwrap();
    is_invalid_r(c.set_kv_precision(KvPrecision::Bf16));
    if other {
        c.start(2).unwrap();
    }
    for pos in 0..tokens {
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
        if other {
            let d2 = 1 + rng2.below(2);
            run_token(c.as_mut(), &p, &mut naive2, &mut rng2, 2, pos, d2, hkv * dh);
        }
    }
    (c, naive)
}

#[test]
fn every_tier_matches_naive_attention_and_is_batch_invariant() {
    let p = plan(false, 2, 1, false);
    // dh multiple of 16 (AVX-512 kernel, one and three vectors) and not (fallback loop);
    // blocks shorter and longer than one 16-lane score vector.
    for (hkv, hq, dh, bt, tokens) in [
        (2, 4, 16, 4, 23),
        (2, 4, 48, 20, 45),
        (1, 3, 32, 17, 40),
        (2, 6, 5, 4, 23),
    ] {
        for mode in MODES {
            let seed = 40 + mode as u64 + dh as u64;
            let (alone, naive) = filled(mode, hkv, dh, bt, tokens, seed, false);
            let (shared, _) = filled(mode, hkv, dh, bt, tokens, seed, true);
            let scale = 1.0 / (dh as f32).sqrt();
            let mut rng = Rng::new(seed + 7);
            for slot in 0..2 {
                let want_entries = expected_view(mode, &p, &naive, 1, slot);
                let (va, vb) = (alone.view(1, slot).unwrap(), shared.view(1, slot).unwrap());
                for q_pos in [0u32, 8, 9, 30, 2 * tokens - 1, 1000] {
                    let q: Vec<f32> = uniform_f32(&mut rng, hq * dh)
                        .into_iter()
                        .map(|x| x * 3.0)
                        .collect();
                    let want = naive_attend(&want_entries, &q, q_pos, hq, hkv, dh, scale);
                    let mut by_tier = Vec::new();
                    for t in tiers() {
                        let mut got = vec![f32::NAN; hq * dh];
                        attend_into_tier(&va, &q, q_pos, hq, scale, &mut got, t).unwrap();
                        for (a, b) in got.iter().zip(&want) {
                            assert!(
                                (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "{t} {mode} dh {dh} slot {slot} q_pos {q_pos}: {a} vs {b}"
                            );
                        }
                        if q_pos == 0 {
                            assert!(got.iter().all(|&x| x == 0.0), "{t}: no visible key");
                        }
                        let mut other = vec![f32::NAN; hq * dh];
                        attend_into_tier(&vb, &q, q_pos, hq, scale, &mut other, t).unwrap();
                        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got),
                            bits(&other),
                            "{t} {mode} dh {dh}: another request in the pool changed the output"
                        );
                        by_tier.push((t, got));
                    }
                    // The portable and AVX2 versions run the same loop: identical bits.
                    let lower: Vec<&Vec<f32>> = by_tier
                        .iter()
                        .filter(|(t, _)| *t <= Tier::Avx2)
                        .map(|(_, o)| o)
                        .collect();
                    for o in &lower[1..] {
                        assert_eq!(*o, lower[0], "portable vs avx2, {mode} dh {dh}");
                    }
                }
            }
        }
    }
}

#[test]
fn tier_entry_point_refuses_bad_shapes() {
    let (c, _) = filled(DecodeMode::RecursionWise, 2, 16, 4, 5, 3, false);
    let view = c.view(1, 0).unwrap();
    let mut out = vec![0f32; 64];
    for t in tiers() {
        let r = attend_into_tier(&view, &[0.0; 80], 5, 5, 1.0, &mut out, t);
        assert!(matches!(r, Err(Error::Invalid { .. })), "{t}: {r:?}");
        let r = attend_into_tier(&view, &[0.0; 64], 5, 4, 1.0, &mut out[..60], t);
        assert!(matches!(r, Err(Error::Invalid { .. })), "{t}: {r:?}");
    }
    if detected() < Tier::Avx512Bf16 {
        let r = attend_into_tier(&view, &[0.0; 64], 5, 4, 1.0, &mut out, Tier::Avx512Bf16);
        let msg = format!("{r:?}");
        assert!(
            matches!(r, Err(Error::Invalid { .. })) && msg.contains("avx512bf16"),
            "{msg}"
        );
    }
}

fn is_invalid_r<T: std::fmt::Debug>(r: mor_kvcache::Result<T>) {
    // Changing the precision of a cache that holds a request is refused, whatever the
    // target (F32 on an f32 cache is a no-op and accepted).
    if let Err(e) = &r {
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains("active"), "{e}");
    }
}

#[test]
fn bf16_kv_rounds_on_write_matches_f32_and_is_batch_invariant() {
    let p = plan(false, 2, 1, false);
    for (hkv, hq, dh, bt, tokens) in [(2, 4, 32, 16, 37), (2, 6, 5, 4, 23)] {
        for mode in MODES {
            let seed = 90 + mode as u64 + dh as u64;
            let (f32c, naive) = filled(mode, hkv, dh, bt, tokens, seed, false);
            let (alone, _) = filled_in(mode, hkv, dh, bt, tokens, seed, false, KvPrecision::Bf16);
            let (shared, _) = filled_in(mode, hkv, dh, bt, tokens, seed, true, KvPrecision::Bf16);
            // Half the bytes of the f32 pool, counted exactly.
            assert_eq!(alone.block_bytes() * 2, f32c.block_bytes(), "{mode}");
            assert_eq!(
                alone.bytes_stored(),
                alone.tokens_stored() * 2 * hkv * dh * 2
            );
            assert_eq!(alone.tokens_stored(), f32c.tokens_stored());
            let scale = 1.0 / (dh as f32).sqrt();
            let mut rng = Rng::new(seed + 3);
            for slot in 0..2 {
                let exact = expected_view(mode, &p, &naive, 1, slot);
                let view = alone.view(1, slot).unwrap();
                // Each stored element is its f32 value rounded to bf16: 8 significant bits
                // (low 16 bits zero), within half a bf16 ulp (2^-8 relative).
                let stored: Vec<_> = view
                    .iter()
                    .map(|t| (t.pos, t.k.to_vec(), t.v.to_vec()))
                    .collect();
                assert_eq!(stored.len(), exact.len());
                for (s, e) in stored.iter().zip(&exact) {
                    assert_eq!(s.0, e.0);
                    for (a, b) in s.1.iter().chain(&s.2).zip(e.1.iter().chain(&e.2)) {
                        assert_eq!(a.to_bits() & 0xFFFF, 0, "{a} is not a bf16 value");
                        assert!((a - b).abs() <= b.abs() * 2f32.powi(-8), "{a} vs {b}");
                    }
                }
                let vb = shared.view(1, slot).unwrap();
                let vf = f32c.view(1, slot).unwrap();
                for q_pos in [0u32, 9, 40, 2 * tokens - 1] {
                    let q: Vec<f32> = uniform_f32(&mut rng, hq * dh)
                        .into_iter()
                        .map(|x| x * 3.0)
                        .collect();
                    let want_b = naive_attend(&stored, &q, q_pos, hq, hkv, dh, scale);
                    let want_f = naive_attend(&exact, &q, q_pos, hq, hkv, dh, scale);
                    for t in tiers() {
                        let mut got = vec![f32::NAN; hq * dh];
                        attend_into_tier(&view, &q, q_pos, hq, scale, &mut got, t).unwrap();
                        let mut f = vec![f32::NAN; hq * dh];
                        attend_into_tier(&vf, &q, q_pos, hq, scale, &mut f, t).unwrap();
                        for ((a, b), (c, d)) in got.iter().zip(&want_b).zip(f.iter().zip(&want_f)) {
                            // Exact attention over the stored (rounded) values ...
                            assert!(
                                (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "{t} {mode} dh {dh} slot {slot} q_pos {q_pos}: {a} vs {b}"
                            );
                            // ... and the f32 cache's output at bf16 tolerance.
                            assert!(
                                (a - c).abs() <= 2e-2 * (1.0 + c.abs()),
                                "{t} {mode} bf16 {a} vs f32 {c}"
                            );
                            assert!((*c as f64 - d).abs() <= 1e-5 * (1.0 + d.abs()));
                        }
                        let mut other = vec![f32::NAN; hq * dh];
                        attend_into_tier(&vb, &q, q_pos, hq, scale, &mut other, t).unwrap();
                        assert_eq!(
                            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            other.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            "{t} {mode} dh {dh}: another request changed a bf16 output"
                        );
                    }
                }
            }
        }
    }
}
