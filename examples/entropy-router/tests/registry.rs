//! The example plugins are found by name once this crate is linked, build through the
//! registries like the built-ins, and resolve inside a full run config.

use candle_core::{DType, Device, Tensor};
use mor_core::registry::{self, Family};
use mor_example_entropy_router as _;
use std::sync::Arc;

fn table(s: &str) -> toml::Table {
    s.parse().expect("test TOML parses")
}

fn backend() -> Arc<dyn mor_kernels::Backend> {
    mor_kernels::build_backend(
        "reference",
        &toml::Table::new(),
        &mor_kernels::BackendCtx::new(Device::Cpu),
    )
    .unwrap()
}

#[test]
fn found_by_name_next_to_the_builtins() {
    for (family, name, builtins) in [
        (
            Family::Router,
            "entropy_router",
            &["expert_choice", "token_choice"][..],
        ),
        (
            Family::KvPolicy,
            "strided_kv",
            &["recursion_wise", "recursive_sharing", "hybrid"][..],
        ),
    ] {
        let info = registry::find(family, name).unwrap();
        assert_eq!(info.crate_name, "mor-example-entropy-router");
        assert!(
            info.module.starts_with("mor_example_entropy_router::"),
            "{info:?}"
        );
        let names = registry::names(family);
        for n in builtins.iter().chain([&name]) {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
    }
    assert!(registry::duplicates().is_empty());
}

#[test]
fn parameters_are_validated_like_a_builtins() {
    let info = registry::find(Family::Router, "entropy_router").unwrap();
    let filled = (info.validate)(&table("num_codes = 3")).unwrap();
    assert_eq!(filled["num_codes"].as_integer(), Some(3));
    assert_eq!(filled["capacity"].as_str(), Some("auto"));
    assert_eq!(filled["threshold"].as_float(), Some(0.5));
    let msg = (info.validate)(&table("num_code = 3")).unwrap_err();
    assert!(
        msg.contains("unknown field `num_code`") && msg.contains("num_codes"),
        "{msg}"
    );
    let ctx = registry::CheckCtx {
        num_recursions: 3,
        ..Default::default()
    };
    let problems = (info.check)(&table("capacity = [1.0, 0.5]"), &ctx);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "capacity");
    let hints = (info.accounting)(&table(""), &ctx);
    assert_eq!(hints.capacities, Some(vec![1.0, 2.0 / 3.0, 1.0 / 3.0]));

    let kv = registry::find(Family::KvPolicy, "strided_kv").unwrap();
    assert_eq!(
        (kv.validate)(&table("")).unwrap()["stride"].as_integer(),
        Some(4)
    );
    assert!((kv.validate)(&table("stride = -1")).is_err());
    assert!((kv.accounting)(&table("stride = 1"), &ctx).kv_sharing);
}

#[test]
fn builds_through_the_registries() {
    let mut ctx = mor_router::RouterCtx::new(4, 2, 6, Device::Cpu, backend());
    ctx.dtype = DType::F64;
    let router = mor_router::build_router("entropy_router", &table("num_codes = 3"), &ctx).unwrap();
    assert_eq!(router.name(), "entropy_router");
    let names: Vec<String> = router.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["router.1.codes", "router.2.codes"]);
    let h = Tensor::ones((1, 6, 4), DType::F64, &Device::Cpu).unwrap();
    let mut st = router.begin(&h, mor_router::RouteMode::Train).unwrap();
    let all = vec![(0..6).collect::<Vec<u32>>()];
    let s1 = router
        .route(1, &h, &all, &mut st, mor_router::RouteMode::Train)
        .unwrap();
    let s2 = router
        .route(2, &h, &s1.selected, &mut st, mor_router::RouteMode::Train)
        .unwrap();
    // Equal hidden states tie everywhere: the lowest positions win.
    assert_eq!(s2.selected, vec![vec![0, 1, 2]]);
    let err = mor_router::build_router("entropy_router", &table("alpha = 0"), &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`alpha` = 0"), "{err}");

    let kv_ctx = mor_kvcache::KvCtx {
        num_recursions: 3,
        backend: backend(),
    };
    let kv = mor_kvcache::build_kv_policy("strided_kv", &table("stride = 2"), &kv_ctx).unwrap();
    assert_eq!(kv.name(), "strided_kv");
    assert!(kv.keeps_first_step() && kv.projects_kv(3));
}

/// A whole run config selects both plugins by name and resolves, with the router's
/// capacities in its FLOPs accounting.
#[test]
fn a_run_config_selects_them_by_name() {
    let text = r#"
        [model]
        preset = "tiny"
        [recursion]
        num_recursions = 3
        sharing = { kind = "middle_cycle" }
        [router]
        kind = "entropy_router"
        num_codes = 8
        [kv]
        kind = "strided_kv"
        stride = 2
    "#;
    let cfg = mor_core::config::Config::from_toml_str(text).unwrap();
    let router = cfg.router.as_ref().unwrap();
    assert_eq!(router.kind, "entropy_router");
    assert_eq!(router.params["num_codes"].as_integer(), Some(8));
    assert_eq!(cfg.kv.kind, "strided_kv");

    let err =
        mor_core::config::Config::from_toml_str(&text.replace("num_codes = 8", "num_codes = 1"))
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("`router.num_codes` = 1: an integer >= 2"),
        "{err}"
    );
}
