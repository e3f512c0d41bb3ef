//! Tests of the built-in sharing strategies against closed-form layer counts (spec §2) and a
//! separately written naive mapping.

// The naive mapping spells out its arithmetic on purpose, independently of the implementation.
#![allow(clippy::manual_div_ceil)]

use super::*;
use crate::plan::{DepthFix, PlanRequest, Segment};
use crate::sharing;
use proptest::prelude::*;

const STRATEGIES: [&str; 4] = ["cycle", "sequence", "middle_cycle", "middle_sequence"];

fn plan(
    name: &str,
    num_layers: usize,
    num_recursions: usize,
    depth_fix: DepthFix,
) -> Result<RecursionPlan, String> {
    let s = sharing::build(name, &toml::Table::new()).map_err(|e| e.to_string())?;
    s.plan(&PlanRequest {
        num_layers,
        num_recursions,
        depth_fix,
    })
}

/// The spec §2 table, written out independently of the implementation: the block of every
/// unrolled slot, the number of unique blocks and `B_d`.
fn naive(name: &str, l: usize, n_r: usize, fix: DepthFix) -> (Vec<usize>, usize, usize) {
    let middle = name.starts_with("middle_");
    let l_base = if middle { l - 2 } else { l };
    let b_d = match fix {
        DepthFix::AddLayers => (l_base + n_r - 1) / n_r,
        DepthFix::Subsample => l_base / n_r,
    };
    let l_eff = b_d * n_r + if middle { 2 } else { 0 };
    let mut blocks = Vec::new();
    for ell in 0..l_eff {
        let j = match name {
            "cycle" => ell % b_d,
            "sequence" => ell / n_r,
            "middle_cycle" if ell == 0 => 0,
            "middle_cycle" if ell == l_eff - 1 => b_d + 1,
            "middle_cycle" => ((ell - 1) % b_d) + 1,
            "middle_sequence" if ell == 0 => 0,
            "middle_sequence" if ell == l_eff - 1 => b_d + 1,
            "middle_sequence" => (ell - 1) / n_r + 1,
            other => panic!("no naive mapping for {other}"),
        };
        blocks.push(j);
    }
    (blocks, if middle { b_d + 2 } else { b_d }, b_d)
}

#[test]
fn paper_layer_counts() {
    // Spec §2, "Non-divisible depth" and "Configs used".
    let cases = [
        // (name, layers, N_r, fix, L_eff, unique blocks)
        ("middle_cycle", 32, 4, DepthFix::AddLayers, 34, 10), // 360m: 1+8×4+1
        ("middle_cycle", 30, 3, DepthFix::AddLayers, 32, 12), // 135m: 1+10×3+1
        ("middle_cycle", 30, 3, DepthFix::Subsample, 29, 11), // 135m: 1+9×3+1
        ("middle_cycle", 24, 3, DepthFix::AddLayers, 26, 10), // 1.7b: 1+8×3+1
        ("middle_cycle", 24, 2, DepthFix::AddLayers, 24, 13), // 1.7b: 1+11×2+1
        ("middle_cycle", 32, 2, DepthFix::AddLayers, 32, 17), // 360m: 1+15×2+1
        ("middle_cycle", 32, 3, DepthFix::AddLayers, 32, 12), // 360m: 1+10×3+1
        ("middle_cycle", 26, 3, DepthFix::AddLayers, 26, 10), // 730m: 1+8×3+1
        ("cycle", 9, 3, DepthFix::AddLayers, 9, 3),
        ("sequence", 9, 3, DepthFix::Subsample, 9, 3),
        ("cycle", 32, 3, DepthFix::Subsample, 30, 10),
        ("cycle", 32, 3, DepthFix::AddLayers, 33, 11),
    ];
    for (name, l, n_r, fix, l_eff, blocks) in cases {
        let p = plan(name, l, n_r, fix).unwrap();
        assert_eq!(p.num_slots(), l_eff, "{name} L={l} N_r={n_r} {fix:?}");
        assert_eq!(p.num_blocks, blocks, "{name} L={l} N_r={n_r} {fix:?}");
        assert_eq!(p.requested_layers, l);
    }
}

#[test]
fn spec_example_l9_nr3() {
    // Spec §2: "Cycle gives (0,1,2)(0,1,2)(0,1,2); Sequence gives (0,0,0)(1,1,1)(2,2,2)".
    let blocks = |name| {
        plan(name, 9, 3, DepthFix::AddLayers)
            .unwrap()
            .slots
            .iter()
            .map(|s| s.block)
            .collect::<Vec<_>>()
    };
    assert_eq!(blocks("cycle"), vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    assert_eq!(blocks("sequence"), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
}

#[test]
fn segments_of_each_strategy() {
    let mc = plan("middle_cycle", 8, 3, DepthFix::AddLayers).unwrap();
    assert_eq!(mc.base_depth, 2);
    assert_eq!(mc.slots[0].segment, Segment::Prelude);
    assert_eq!(mc.slots[7].segment, Segment::Coda);
    assert_eq!(
        mc.slots[3].segment,
        Segment::Recursion { step: 2, layer: 0 }
    );
    assert_eq!(mc.step_blocks(3), vec![1, 2]);
    assert_eq!(mc.prelude(), vec![0]);
    assert_eq!(mc.coda(), vec![3]);
    assert!(mc.is_cyclic());

    let seq = plan("sequence", 6, 3, DepthFix::AddLayers).unwrap();
    let segs: Vec<Segment> = seq.slots.iter().map(|s| s.segment).collect();
    assert_eq!(segs[0], Segment::Recursion { step: 1, layer: 0 });
    assert_eq!(segs[2], Segment::Recursion { step: 3, layer: 0 });
    assert_eq!(segs[4], Segment::Recursion { step: 2, layer: 1 });
    assert!(!seq.is_cyclic());

    let ms = plan("middle_sequence", 8, 3, DepthFix::AddLayers).unwrap();
    assert_eq!(
        ms.slots[1].segment,
        Segment::Recursion { step: 1, layer: 0 }
    );
    assert_eq!(
        ms.slots[4].segment,
        Segment::Recursion { step: 1, layer: 1 }
    );
    assert!(!ms.is_cyclic());

    let van = plan("none", 5, 1, DepthFix::AddLayers).unwrap();
    assert_eq!(van.num_blocks, 5);
    assert_eq!(van.base_depth, 5);
    assert_eq!(
        van.slots[4].segment,
        Segment::Recursion { step: 1, layer: 4 }
    );
    assert!(van.is_cyclic());
}

#[test]
fn bad_requests_are_errors() {
    let err = |name, l, n_r| plan(name, l, n_r, DepthFix::AddLayers).unwrap_err();
    assert!(err("cycle", 6, 0).contains("at least 1"));
    assert!(
        err("cycle", 3, 4).contains("allowed: 1..=3"),
        "{}",
        err("cycle", 3, 4)
    );
    assert!(err("middle_cycle", 6, 5).contains("allowed: 1..=4"));
    assert!(err("middle_cycle", 2, 1).contains("at least 3 layers"));
    assert!(err("middle_sequence", 0, 1).contains("at least 3 layers"));
    assert!(err("none", 6, 2).contains("num_recursions = 1"));
    assert!(err("none", 0, 1).contains("at least 1"));
    assert!(err("cycle", 0, 1).contains("no layers"));
    // Unknown parameters are refused by every built-in strategy.
    let mut t = toml::Table::new();
    t.insert("period".into(), toml::Value::Integer(2));
    let e = crate::registry::find(crate::registry::Family::SharingStrategy, "cycle").unwrap();
    let msg = (e.validate)(&t).unwrap_err();
    assert!(msg.contains("unknown field `period`"), "{msg}");
}

#[test]
fn every_builtin_is_registered() {
    let names = crate::registry::names(crate::registry::Family::SharingStrategy);
    for n in [
        "none",
        "cycle",
        "sequence",
        "middle_cycle",
        "middle_sequence",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    assert!(crate::registry::duplicates().is_empty());
}

fn case() -> impl Strategy<Value = (usize, usize, usize, bool)> {
    (0usize..4, 1usize..40, 1usize..9, any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn strategies_match_naive_mapping((which, l, n_r, add) in case()) {
        let name = STRATEGIES[which];
        let fix = if add { DepthFix::AddLayers } else { DepthFix::Subsample };
        let middle = name.starts_with("middle_");
        let l_base = if middle { l.saturating_sub(2) } else { l };
        let result = plan(name, l, n_r, fix);
        if (middle && l < 3) || n_r > l_base {
            prop_assert!(result.is_err(), "{name} L={l} N_r={n_r} should fail");
            return Ok(());
        }
        let p = result.unwrap();
        let (blocks, num_blocks, b_d) = naive(name, l, n_r, fix);
        prop_assert_eq!(p.slots.iter().map(|s| s.block).collect::<Vec<_>>(), blocks);
        prop_assert_eq!(p.num_blocks, num_blocks);
        prop_assert_eq!(p.base_depth, b_d);
        prop_assert_eq!(p.num_recursions, n_r);
        prop_assert!(p.validate().is_ok());

        // Every block is used the expected number of times.
        let uses = p.block_uses();
        for (j, &u) in uses.iter().enumerate() {
            let expected = if middle && (j == 0 || j == num_blocks - 1) { 1 } else { n_r };
            prop_assert_eq!(u, expected, "block {} of {}", j, name);
        }
        if middle {
            // First and last stay unique and sit in the prelude and coda.
            prop_assert_eq!(p.slots[0].segment, Segment::Prelude);
            prop_assert_eq!(p.slots.last().unwrap().segment, Segment::Coda);
            prop_assert_eq!(p.prelude(), vec![0]);
            prop_assert_eq!(p.coda(), vec![num_blocks - 1]);
        }
        // Every recursion step holds B_d slots, and a block keeps its layer index.
        for r in 1..=n_r {
            prop_assert_eq!(p.step_blocks(r).len(), b_d);
        }
        for s in &p.slots {
            if let Segment::Recursion { layer, .. } = s.segment {
                prop_assert_eq!(s.block, layer + usize::from(middle));
            }
        }
        let cyclic = name.ends_with("cycle") || b_d == 1 || n_r == 1;
        prop_assert_eq!(p.is_cyclic(), cyclic);
    }
}
