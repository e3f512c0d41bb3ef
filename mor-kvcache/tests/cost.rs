//! The cost table of spec §4 in closed form, and the accounting hints.

use mor_core::registry::{find, CheckCtx, Family};
use mor_kvcache::policies::{auto_capacity, cost_capacities};
use mor_kvcache::{Hybrid, KvPolicy, RecursionWise, RecursiveSharing};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

fn auto(n: usize) -> Vec<f64> {
    (1..=n).map(|r| auto_capacity(n, r)).collect()
}

#[test]
fn auto_schedule_matches_spec() {
    assert_eq!(auto(2), vec![1.0, 0.5]);
    assert!(auto(3)
        .iter()
        .zip([1.0, 2.0 / 3.0, 1.0 / 3.0])
        .all(|(a, b)| close(*a, b)));
    assert_eq!(auto(4), vec![1.0, 0.75, 0.5, 0.25]);
    // Missing capacities fall back to the auto schedule; bad values are clamped.
    assert_eq!(cost_capacities(3, &[1.0]), vec![1.0, 2.0 / 3.0, 1.0 / 3.0]);
    assert_eq!(cost_capacities(2, &[1.5, f64::NAN]), vec![1.0, 0.0]);
}

#[test]
fn recursion_wise_memory_is_n_plus_one_over_two_n() {
    for n in [2usize, 3, 4] {
        let p = RecursionWise::new(n).unwrap();
        let want = (n as f64 + 1.0) / (2.0 * n as f64);
        for caps in [auto(n), Vec::new()] {
            let c = p.cost(n, &caps);
            assert!(
                close(c.memory_ratio, want),
                "N_r={n}: {} vs {want}",
                c.memory_ratio
            );
            assert!(close(c.io_ratio, want));
            assert_eq!(c.attn_flops_ratio.len(), n);
            for (r, a) in c.attn_flops_ratio.iter().enumerate() {
                let cap = (n - r) as f64 / n as f64;
                assert!(close(*a, cap * cap), "N_r={n} step {}: {a}", r + 1);
            }
        }
    }
    // Explicit capacities: memory is their mean.
    let c = RecursionWise::new(3).unwrap().cost(3, &[1.0, 0.5, 0.25]);
    assert!(close(c.memory_ratio, 1.75 / 3.0));
    assert_eq!(c.attn_flops_ratio, vec![1.0, 0.25, 0.0625]);
}

#[test]
fn sharing_memory_is_one_over_n() {
    for n in [2usize, 3, 4] {
        let c = RecursiveSharing::new(n).unwrap().cost(n, &auto(n));
        assert!(close(c.memory_ratio, 1.0 / n as f64));
        assert_eq!(c.io_ratio, 1.0);
        for (r, a) in c.attn_flops_ratio.iter().enumerate() {
            assert!(
                close(*a, (n - r) as f64 / n as f64),
                "N_r={n} step {}: {a}",
                r + 1
            );
        }
    }
}

#[test]
fn hybrid_memory_is_recursion_wise_with_sharing_io_and_attention() {
    for n in [2usize, 3, 4] {
        let c = Hybrid::new(n).unwrap().cost(n, &auto(n));
        assert!(close(c.memory_ratio, (n as f64 + 1.0) / (2.0 * n as f64)));
        assert_eq!(c.io_ratio, 1.0);
        for (r, a) in c.attn_flops_ratio.iter().enumerate() {
            assert!(close(*a, (n - r) as f64 / n as f64));
        }
    }
}

fn ctx(router: Option<&str>) -> CheckCtx {
    CheckCtx {
        num_recursions: 3,
        seq_len: 64,
        hidden_size: 32,
        router: router.map(str::to_string),
        sharing: "middle_cycle".to_string(),
    }
}

#[test]
fn accounting_hints_mark_only_recursive_sharing() {
    let t = toml::Table::new();
    // (policy, reuses step-1 K/V, queries of steps >= 2 read the full context)
    for (name, sharing, full) in [
        ("recursion_wise", false, false),
        ("recursive_sharing", true, true),
        ("hybrid", false, true),
    ] {
        let info = find(Family::KvPolicy, name).unwrap();
        let h = (info.accounting)(&t, &ctx(Some("expert_choice")));
        assert_eq!(h.kv_sharing, sharing, "{name}");
        assert_eq!(h.kv_full_context, full, "{name}");
        assert_eq!(h.capacities, None);
    }
}

#[test]
fn hybrid_with_token_choice_is_a_problem() {
    let t = toml::Table::new();
    let hybrid = find(Family::KvPolicy, "hybrid").unwrap();
    let problems = (hybrid.check)(&t, &ctx(Some("token_choice")));
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "kind");
    assert!(
        problems[0].allowed.contains("expert-choice"),
        "{}",
        problems[0].allowed
    );
    assert!((hybrid.check)(&t, &ctx(Some("expert_choice"))).is_empty());
    assert!((hybrid.check)(&t, &ctx(None)).is_empty());
    for other in ["recursion_wise", "recursive_sharing"] {
        let info = find(Family::KvPolicy, other).unwrap();
        assert!(
            (info.check)(&t, &ctx(Some("token_choice"))).is_empty(),
            "{other}"
        );
    }
}
