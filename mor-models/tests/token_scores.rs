//! Per-token validation scores and the statistics built from them: the standard error of an
//! NLL, quintiles of a reference run's NLL, depth-NLL correlations and the `token_scores.bin`
//! file.

use mor_models::eval::{load_token_scores, save_token_scores, stderr_of_mean, TOKEN_SCORES_FILE};
use mor_models::report::{
    average_ranks, depth_by_reference_nll, pearson, quintiles, spearman, targets_hash,
    DifficultyMeasure, RuleScores, TokenScores, TraceRule,
};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// A deterministic pseudo-random sequence (SplitMix64) for test data.
fn splitmix(seed: u64, n: usize) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
        .collect()
}

#[test]
fn stderr_is_the_sample_sd_of_the_row_means_over_sqrt_rows() {
    // Row means 4.0, 4.2, 3.9, 4.3: mean 4.1, squared deviations 0.01 + 0.01 + 0.04 + 0.04 =
    // 0.10, sample variance 0.10 / 3, SE = sqrt(0.10 / 3 / 4) = 0.0912870929...
    let se = stderr_of_mean(&[4.0, 4.2, 3.9, 4.3]).unwrap();
    assert!(close(se, 0.091_287_092_917_527_68, 1e-12), "{se}");
    assert_eq!(stderr_of_mean(&[2.0, 2.0, 2.0]), Some(0.0));
    assert_eq!(stderr_of_mean(&[3.0]), None);
    assert_eq!(stderr_of_mean(&[]), None);
}

#[test]
fn quintiles_by_rank_match_a_naive_assignment() {
    // Ten values: two per quintile, ties broken by position.
    let v = [0.5f32, 3.0, 1.0, 3.0, 9.0, 0.1, 7.0, 2.0, 3.0, 8.0];
    // Sorted: 0.1(5) 0.5(0) 1.0(2) 2.0(7) 3.0(1) 3.0(3) 3.0(8) 7.0(6) 8.0(9) 9.0(4).
    assert_eq!(quintiles(&v), [0, 2, 1, 2, 4, 0, 3, 1, 3, 4]);
    // Against the definition on many sizes with heavy ties.
    for n in [5usize, 6, 7, 11, 37, 100] {
        let v: Vec<f32> = splitmix(n as u64, n)
            .iter()
            .map(|&x| (x % 7) as f32)
            .collect();
        let q = quintiles(&v);
        for i in 0..n {
            let rank = (0..n)
                .filter(|&j| v[j] < v[i] || (v[j] == v[i] && j < i))
                .count();
            assert_eq!(q[i] as usize, rank * 5 / n, "n {n} i {i}");
        }
        // Every quintile holds n/5 tokens up to one.
        for k in 0..5u8 {
            let c = q.iter().filter(|&&x| x == k).count();
            assert!(c == n / 5 || c == n / 5 + 1, "n {n} quintile {k}: {c}");
        }
    }
}

#[test]
fn correlations_match_hand_values() {
    // x = 1..5, y = 2, 4, 5, 4, 5: Sxy = 6, Sxx = 10, Syy = 6, r = 6 / sqrt(60).
    let x = [1.0, 2.0, 3.0, 4.0, 5.0];
    let y = [2.0, 4.0, 5.0, 4.0, 5.0];
    assert!(close(pearson(&x, &y).unwrap(), 6.0 / 60f64.sqrt(), 1e-12));
    // Ranks of y with ties at their mean: 1, 2.5, 4.5, 2.5, 4.5; Sxy = 7, Sxx = 10, Syy = 9.
    assert_eq!(average_ranks(&y), [1.0, 2.5, 4.5, 2.5, 4.5]);
    assert!(close(spearman(&x, &y).unwrap(), 7.0 / 90f64.sqrt(), 1e-12));
    // A monotone but non-linear relation has Spearman 1 and Pearson below 1.
    let cube: Vec<f64> = x.iter().map(|v| v * v * v).collect();
    assert!(close(spearman(&x, &cube).unwrap(), 1.0, 1e-12));
    assert!(pearson(&x, &cube).unwrap() < 0.99);
    // Constant series have no correlation.
    assert_eq!(pearson(&x, &[3.0; 5]), None);
    assert_eq!(spearman(&[1.0; 5], &y), None);
    assert_eq!(pearson(&[1.0], &[2.0]), None);
}

/// Scores of `n` tokens: reference NLL, and a routed run's depths under both rules.
fn fixture(n: usize) -> (TokenScores, TokenScores) {
    let r = splitmix(7, 3 * n);
    let nll: Vec<f32> = (0..n).map(|i| (r[i] % 1000) as f32 / 100.0).collect();
    // Depth grows with the NLL plus noise, 1..=3.
    let depth = |k: usize| -> Vec<u8> {
        (0..n)
            .map(|i| (1 + (nll[i] as u64 / 4 + r[k * n + i] % 2).min(2)) as u8)
            .collect()
    };
    let targets: Vec<u32> = (0..n as u32).collect();
    let reference = TokenScores {
        row_len: 8,
        targets_hash: targets_hash(&targets),
        full_sequence: Some(RuleScores {
            nll: nll.clone(),
            depth: None,
        }),
        causal: None,
    };
    let routed = TokenScores {
        row_len: 8,
        targets_hash: targets_hash(&targets),
        full_sequence: Some(RuleScores {
            nll: nll.iter().map(|x| x * 0.9).collect(),
            depth: Some(depth(1)),
        }),
        causal: Some(RuleScores {
            nll: nll.iter().map(|x| x * 0.95).collect(),
            depth: Some(depth(2)),
        }),
    };
    (reference, routed)
}

/// Pearson by the one-pass sums formula, as an independent reference.
fn naive_pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (sx, sy) = (x.iter().sum::<f64>(), y.iter().sum::<f64>());
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
    let sxx: f64 = x.iter().map(|a| a * a).sum();
    let syy: f64 = y.iter().map(|b| b * b).sum();
    (n * sxy - sx * sy) / ((n * sxx - sx * sx).sqrt() * (n * syy - sy * sy).sqrt())
}

#[test]
fn depth_by_reference_nll_matches_a_naive_computation() {
    let n = 203;
    let (reference, routed) = fixture(n);
    let d = depth_by_reference_nll("vanilla", &reference, "mor", &routed).unwrap();
    assert_eq!(d.run, "mor");
    let ref_nll = reference.full_sequence.as_ref().unwrap().nll.clone();
    let full_depth = routed
        .full_sequence
        .as_ref()
        .unwrap()
        .depth
        .clone()
        .unwrap();
    let causal_depth = routed.causal.as_ref().unwrap().depth.clone().unwrap();

    // Quintile means of the full-sequence depths, from a sort done here.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| ref_nll[a].partial_cmp(&ref_nll[b]).unwrap().then(a.cmp(&b)));
    let mut sums = [(0u64, 0f64); 5];
    for (rank, &i) in order.iter().enumerate() {
        let q = rank * 5 / n;
        sums[q].0 += 1;
        sums[q].1 += f64::from(full_depth[i]);
    }
    assert_eq!(d.by_label.len(), 5);
    for (q, s) in d.by_label.iter().enumerate() {
        assert_eq!(s.difficulty as usize, q);
        assert_eq!(s.count, sums[q].0);
        assert!(close(s.mean_depth, sums[q].1 / sums[q].0 as f64, 1e-12));
    }
    // Harder tokens get more depth in this fixture.
    assert!(d.by_label[4].mean_depth > d.by_label[0].mean_depth);
    match &d.measure {
        DifficultyMeasure::ReferenceNll {
            reference,
            rule,
            edges,
        } => {
            assert_eq!(reference, "vanilla");
            assert_eq!(*rule, TraceRule::FullSequence);
            let sorted: Vec<f64> = order.iter().map(|&i| f64::from(ref_nll[i])).collect();
            // Quintile q starts at rank ceil(q n / 5); the last edge is the maximum.
            let want: Vec<f64> = (0..5)
                .map(|q| sorted[(q * n).div_ceil(5)])
                .chain([sorted[n - 1]])
                .collect();
            assert_eq!(edges, &want);
        }
        other => panic!("{other:?}"),
    }

    // Correlations per rule against the sums formula and ranks computed here.
    let nll: Vec<f64> = ref_nll.iter().map(|&x| f64::from(x)).collect();
    assert_eq!(d.correlations.len(), 2);
    for (c, depth, rule) in [
        (&d.correlations[0], &full_depth, TraceRule::FullSequence),
        (&d.correlations[1], &causal_depth, TraceRule::Causal),
    ] {
        let x: Vec<f64> = depth.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(c.rule, rule);
        assert_eq!(c.tokens, n as u64);
        assert!(close(c.pearson.unwrap(), naive_pearson(&x, &nll), 1e-9));
        // Ranks with ties at their mean, counted directly.
        let rank = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .map(|a| {
                    let below = v.iter().filter(|b| *b < a).count() as f64;
                    let equal = v.iter().filter(|b| *b == a).count() as f64;
                    below + (equal + 1.0) / 2.0
                })
                .collect()
        };
        assert!(close(
            c.spearman.unwrap(),
            naive_pearson(&rank(&x), &rank(&nll)),
            1e-9
        ));
        assert!(c.pearson.unwrap() > 0.3, "{c:?}");
    }
}

#[test]
fn depth_by_reference_nll_refuses_mismatched_or_unusable_scores() {
    let (reference, routed) = fixture(50);
    // Different tokens.
    let mut other = routed.clone();
    other.targets_hash ^= 1;
    let e = depth_by_reference_nll("vanilla", &reference, "mor", &other).unwrap_err();
    assert!(e.contains("different validation tokens"), "{e}");
    // A run without depths.
    let e = depth_by_reference_nll("vanilla", &reference, "vanilla2", &reference).unwrap_err();
    assert!(e.contains("vanilla2: no per-token depths"), "{e}");
    // A non-finite reference NLL.
    let mut bad = reference.clone();
    bad.full_sequence.as_mut().unwrap().nll[3] = f32::NAN;
    let e = depth_by_reference_nll("vanilla", &bad, "mor", &routed).unwrap_err();
    assert!(e.contains("validation token 3 is NaN"), "{e}");
    // Too few tokens for quintiles.
    let (r4, m4) = fixture(4);
    let e = depth_by_reference_nll("vanilla", &r4, "mor", &m4).unwrap_err();
    assert!(e.contains("too few"), "{e}");
    // Vectors of different lengths.
    let mut short = routed.clone();
    short.causal.as_mut().unwrap().depth.as_mut().unwrap().pop();
    let e = depth_by_reference_nll("vanilla", &reference, "mor", &short).unwrap_err();
    assert!(
        e.contains("mor: causal depth has 49 entries, expected 50"),
        "{e}"
    );
}

#[test]
fn token_scores_round_trip_and_damage_is_detected() {
    let (reference, routed) = fixture(37);
    for s in [&reference, &routed] {
        assert_eq!(&TokenScores::from_bytes(&s.to_bytes()).unwrap(), s);
    }
    let bytes = routed.to_bytes();
    // 8 magic + 3 u64 + flags + 2 × 37 × (4 + 1) + 8 checksum.
    assert_eq!(bytes.len(), 8 + 24 + 1 + 2 * 37 * 5 + 8);
    let mut flipped = bytes.clone();
    flipped[40] ^= 0x10;
    assert!(TokenScores::from_bytes(&flipped)
        .unwrap_err()
        .contains("checksum"));
    assert!(TokenScores::from_bytes(&bytes[..20])
        .unwrap_err()
        .contains("too short"));

    let dir = std::env::temp_dir().join(format!("mor-token-scores-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    save_token_scores(&dir, &routed).unwrap();
    assert_eq!(load_token_scores(&dir).unwrap(), routed);
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [TOKEN_SCORES_FILE]);
    std::fs::write(dir.join(TOKEN_SCORES_FILE), &flipped).unwrap();
    let e = load_token_scores(&dir).unwrap_err().to_string();
    assert!(
        e.contains(TOKEN_SCORES_FILE) && e.contains("checksum"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let e = load_token_scores(&dir).unwrap_err().to_string();
    assert!(e.contains(TOKEN_SCORES_FILE), "{e}");
}
