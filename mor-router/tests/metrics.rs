//! Router metrics: closed-form values and merging.

use mor_router::metrics::max_vio_of;
use mor_router::RouterStats;

#[test]
fn max_vio_entropy_and_dead_ratio_closed_forms() {
    let s = RouterStats {
        tokens_per_depth: vec![6, 3, 3],
        prob_sum: vec![1.0, 1.0, 2.0],
        prob_tokens: 4,
        last_step_selected_per_position: vec![2, 0, 1, 0],
        sequences: 2,
        sampling_correct: vec![3, 1],
        sampling_total: vec![4, 4],
        gate_sum: vec![0.5, 0.3],
        gate_count: vec![5, 2],
        ..Default::default()
    };
    assert_eq!(s.loads(), vec![0.5, 0.25, 0.25]);
    // (0.5 − 1/3) / (1/3) = 0.5.
    assert!((s.max_vio().unwrap() - 0.5).abs() < 1e-12);
    // p̄ = [1/4, 1/4, 1/2]: H = 1.5·ln 2.
    assert!((s.entropy().unwrap() - 1.5 * 2f64.ln()).abs() < 1e-12);
    assert_eq!(s.dead_token_ratio(), Some(0.5));
    assert_eq!(s.sampling_accuracy(), Some(0.5));
    assert_eq!(s.sampling_accuracy_at(1), Some(0.75));
    assert_eq!(s.sampling_accuracy_at(3), None);
    assert_eq!(s.mean_gate(1), Some(0.1));
    assert_eq!(s.mean_gate(0), None);
    assert_eq!(max_vio_of(&[0.25; 4]), Some(0.0));
    assert_eq!(max_vio_of(&[]), None);
    let empty = RouterStats::default();
    assert_eq!(
        (
            empty.max_vio(),
            empty.entropy(),
            empty.dead_token_ratio(),
            empty.sampling_accuracy()
        ),
        (None, None, None, None)
    );
}

#[test]
fn merge_adds_counts_and_extends_lengths() {
    let a = RouterStats {
        tokens_per_depth: vec![1, 2],
        last_step_selected_per_position: vec![1, 0],
        sequences: 1,
        gate_sum: vec![0.25],
        gate_count: vec![1],
        ..Default::default()
    };
    let b = RouterStats {
        tokens_per_depth: vec![3, 0, 5],
        tokens_depth_zero: 2,
        last_step_selected_per_position: vec![0, 0, 1],
        sequences: 1,
        gate_sum: vec![0.5, 1.0],
        gate_count: vec![1, 4],
        ..Default::default()
    };
    let m = RouterStats::merged([&a, &b]);
    assert_eq!(m.tokens_per_depth, vec![4, 2, 5]);
    assert_eq!(m.tokens_depth_zero, 2);
    assert_eq!(m.last_step_selected_per_position, vec![1, 0, 1]);
    assert_eq!(m.sequences, 2);
    assert_eq!(m.gate_sum, vec![0.75, 1.0]);
    assert_eq!(m.mean_gate(1), Some(0.375));
    assert_eq!(m.dead_token_ratio(), Some(1.0 / 3.0));
    let mut c = a.clone();
    c.merge(&RouterStats::default());
    assert_eq!(c, a, "merging empty stats changes nothing");
}
