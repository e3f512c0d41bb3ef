//! The `reverse_cycle` strategy is found by name once this crate is linked, plans through
//! the registry, and its parameters are validated like a built-in's.

use mor_core::plan::{DepthFix, PlanRequest, Segment};
use mor_core::registry::{self, Family};
use mor_example_custom_sharing as _;

fn request(num_layers: usize, num_recursions: usize) -> PlanRequest {
    PlanRequest {
        num_layers,
        num_recursions,
        depth_fix: DepthFix::AddLayers,
    }
}

#[test]
fn found_by_name_next_to_the_builtins() {
    let info = registry::find(Family::SharingStrategy, "reverse_cycle").unwrap();
    assert_eq!(info.crate_name, "mor-example-custom-sharing");
    let names = registry::names(Family::SharingStrategy);
    for n in ["cycle", "middle_cycle", "reverse_cycle"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let err = registry::find(Family::SharingStrategy, "reverse_cycel")
        .unwrap_err()
        .to_string();
    assert!(err.contains("reverse_cycle"), "{err}");
}

#[test]
fn plans_reversed_cycles() {
    let plan =
        mor_core::sharing::plan("reverse_cycle", &toml::Table::new(), &request(9, 3)).unwrap();
    let blocks: Vec<usize> = plan.slots.iter().map(|s| s.block).collect();
    assert_eq!(blocks, vec![2, 1, 0, 2, 1, 0, 2, 1, 0]);
    assert_eq!(plan.block_uses(), vec![3, 3, 3]);
    assert!(
        plan.is_cyclic(),
        "steps still run as contiguous runs in step order"
    );
    assert_eq!(
        plan.slots[4].segment,
        Segment::Recursion { step: 2, layer: 1 }
    );

    let params: toml::Table = "forward_first = true".parse().unwrap();
    let plan = mor_core::sharing::plan("reverse_cycle", &params, &request(6, 2)).unwrap();
    let blocks: Vec<usize> = plan.slots.iter().map(|s| s.block).collect();
    assert_eq!(blocks, vec![0, 1, 2, 2, 1, 0]);
}

#[test]
fn bad_requests_and_parameters_are_errors() {
    let err = mor_core::sharing::plan("reverse_cycle", &toml::Table::new(), &request(2, 3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("allowed: 1..=2"), "{err}");
    let info = registry::find(Family::SharingStrategy, "reverse_cycle").unwrap();
    let bad: toml::Table = "forward_frist = true".parse().unwrap();
    let msg = (info.validate)(&bad).unwrap_err();
    assert!(
        msg.contains("unknown field `forward_frist`") && msg.contains("forward_first"),
        "{msg}"
    );
}
