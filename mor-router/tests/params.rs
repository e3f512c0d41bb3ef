//! Parameters: parsing, defaults, checks, accounting, and lookup through the registry.

use crate::common::*;
use mor_core::registry::{self, CheckCtx, Family, Plugin};
use mor_router::expert_choice::Capacity;
use mor_router::{ExpertChoiceParams, ExpertChoiceRouter, TokenChoiceParams, TokenChoiceRouter};

fn check_ctx(nr: usize) -> CheckCtx {
    CheckCtx {
        num_recursions: nr,
        seq_len: 16,
        hidden_size: 4,
        router: Some("expert_choice".into()),
        ..Default::default()
    }
}

#[test]
fn unknown_fields_are_rejected_by_name() {
    let c = ctx(4, 3, 16, 0.02, 0);
    let e = mor_router::build_router("expert_choice", &table("alphaa = 0.1"), &c)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expert_choice") && e.contains("unknown field `alphaa`"),
        "{e}"
    );
    assert!(e.contains("alpha"), "lists the known fields: {e}");
    let e = mor_router::build_router("token_choice", &table("bal_coef = 0.1"), &c)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("token_choice") && e.contains("unknown field `bal_coef`"),
        "{e}"
    );
    let e =
        registry::parse_params::<ExpertChoiceParams>(&table("capacity = \"half\"")).unwrap_err();
    assert!(e.contains("\"auto\""), "{e}");
}

#[test]
fn defaults_are_the_final_recipes() {
    let info = registry::find(Family::Router, "expert_choice").unwrap();
    let t = (info.validate)(&toml::Table::new()).unwrap();
    let want = table(
        "router_arch = \"linear\"\nwide_mult = 2\nrouter_func = \"sigmoid\"\nalpha = 0.1\ntemperature = 1.0\n\
         capacity = \"auto\"\ncap_warmup_steps = 0\nsampling = \"aux_loss\"\naux_coeff = 0.001\n\
         aux_router_lr_mult = 10.0\naux_bce_scale = 1.0\nz_loss = false\nz_coeff = 0.001\n\
         gating = \"weighted\"\nrand_router = false\ninfer_rule = \"threshold\"\nthreshold = 0.5",
    );
    assert_eq!(t, want);
    let info = registry::find(Family::Router, "token_choice").unwrap();
    let t = (info.validate)(&toml::Table::new()).unwrap();
    let want = table(
        "router_arch = \"linear\"\nwide_mult = 2\nrouter_func = \"softmax\"\nalpha = 1.0\ntemperature = 1.0\n\
         balancing = \"loss\"\nbal_coeff = 0.1\nbias_update_u = 0.001\nbal_warmup_steps = 0\nz_loss = true\n\
         z_coeff = 0.001\ngate_intermediate = false\nrand_router = false",
    );
    assert_eq!(t, want);
    // An explicit capacity list round-trips.
    let t = (registry::find(Family::Router, "expert_choice")
        .unwrap()
        .validate)(&table("capacity = [1, 0.5]"))
    .unwrap();
    assert_eq!(
        t["capacity"],
        toml::Value::Array(vec![1.0.into(), 0.5.into()])
    );
    let p: ExpertChoiceParams = registry::parse_params(&t).unwrap();
    assert_eq!(p.capacity, Capacity::List(vec![1.0, 0.5]));
}

#[test]
fn capacity_problems_name_the_field_the_value_and_the_allowed_form() {
    let parse = |s: &str| registry::parse_params::<ExpertChoiceParams>(&table(s)).unwrap();
    let probs = ExpertChoiceRouter::check(&parse("capacity = [1.0, 0.5]"), &check_ctx(3));
    assert_eq!(probs.len(), 1, "{probs:?}");
    assert_eq!(probs[0].field, "capacity");
    assert!(
        probs[0].value.contains("[1.0, 0.5]") && probs[0].value.contains("2 entries"),
        "{:?}",
        probs[0]
    );
    assert!(
        probs[0].allowed.contains("\"auto\"") && probs[0].allowed.contains("list of 3 fractions"),
        "{:?}",
        probs[0]
    );
    assert!(probs[0].allowed.contains("descending") && probs[0].allowed.contains("(0, 1]"));

    let p = ExpertChoiceRouter::check(&parse("capacity = [0.5, 1.0, 0.2]"), &check_ctx(3));
    assert!(
        p.len() == 1 && p[0].value.contains("not descending"),
        "{p:?}"
    );
    let p = ExpertChoiceRouter::check(&parse("capacity = [1.0, 1.5, 0.0]"), &check_ctx(3));
    assert!(
        p.len() == 1
            && p[0].value.contains("outside (0, 1]")
            && p[0].value.contains("not descending"),
        "{p:?}"
    );
    assert!(
        ExpertChoiceRouter::check(&parse("capacity = [1.0, 0.5, 0.5]"), &check_ctx(3)).is_empty()
    );
    assert!(ExpertChoiceRouter::check(&parse(""), &check_ctx(3)).is_empty());

    // The same check reached through the registry, as config resolution does.
    let info = registry::find(Family::Router, "expert_choice").unwrap();
    let p = (info.check)(&table("capacity = [1.0]"), &check_ctx(2));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].field, "capacity");
    // And building refuses it with the same words.
    let e = mor_router::build_router(
        "expert_choice",
        &table("capacity = [1.0]"),
        &ctx(4, 2, 16, 0.02, 0),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`capacity` = [1.0]") && e.contains("list of 2 fractions"),
        "{e}"
    );
}

#[test]
fn other_problems_are_reported_together() {
    let p: ExpertChoiceParams = registry::parse_params(&table(
        "alpha = 0.0\ntemperature = -1.0\nthreshold = 1.5\ninfer_rule = \"aux_router\"\nwide_mult = 0",
    ))
    .unwrap();
    let fields: Vec<String> = ExpertChoiceRouter::check(&p, &check_ctx(3))
        .into_iter()
        .map(|p| p.field)
        .collect();
    assert_eq!(
        fields,
        [
            "wide_mult",
            "alpha",
            "temperature",
            "threshold",
            "infer_rule"
        ]
    );
    let p: TokenChoiceParams =
        registry::parse_params(&table("bal_coeff = -0.1\nalpha = nan")).unwrap();
    let fields: Vec<String> = TokenChoiceRouter::check(&p, &check_ctx(3))
        .into_iter()
        .map(|p| p.field)
        .collect();
    assert_eq!(fields, ["alpha", "bal_coeff"]);
}

#[test]
fn accounting_reports_capacities() {
    let p = ExpertChoiceParams::default();
    let a = ExpertChoiceRouter::accounting(&p, &check_ctx(3))
        .capacities
        .unwrap();
    assert_eq!(a, vec![1.0, 2.0 / 3.0, 1.0 / 3.0]);
    let a = ExpertChoiceRouter::accounting(&p, &check_ctx(4))
        .capacities
        .unwrap();
    assert_eq!(a, vec![1.0, 0.75, 0.5, 0.25]);
    let p = ExpertChoiceParams {
        capacity: Capacity::List(vec![1.0, 0.3]),
        ..Default::default()
    };
    assert_eq!(
        ExpertChoiceRouter::accounting(&p, &check_ctx(2))
            .capacities
            .unwrap(),
        vec![1.0, 0.3]
    );
    let t = TokenChoiceRouter::accounting(&TokenChoiceParams::default(), &check_ctx(2));
    assert_eq!(
        t.capacities.unwrap(),
        vec![1.0, 0.5],
        "token-choice FLOPs assume perfect balance"
    );
}

#[test]
fn registry_builds_both_and_lists_them_on_a_miss() {
    let c = ctx(4, 3, 16, 0.02, 0);
    let e = mor_router::build_router("expert_choice", &toml::Table::new(), &c).unwrap();
    assert_eq!(
        (e.name(), e.kind()),
        ("expert_choice", mor_router::RoutingKind::ExpertChoice)
    );
    let names: Vec<String> = e
        .vars()
        .into_iter()
        .map(|(n, v)| format!("{n}{:?}", v.dims()))
        .collect();
    assert_eq!(
        names,
        [
            "router.1.w1[4, 1]",
            "router.2.w1[4, 1]",
            "router.3.w1[4, 1]"
        ]
    );
    let t = mor_router::build_router("token_choice", &toml::Table::new(), &c).unwrap();
    assert_eq!(
        (t.name(), t.kind()),
        ("token_choice", mor_router::RoutingKind::TokenChoice)
    );
    let names: Vec<String> = t
        .vars()
        .into_iter()
        .map(|(n, v)| format!("{n}{:?}", v.dims()))
        .collect();
    assert_eq!(names, ["router.w1[4, 3]"]);
    let e = mor_router::build_router("expert_choise", &toml::Table::new(), &c)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expert_choise") && e.contains("expert_choice") && e.contains("token_choice"),
        "{e}"
    );
    let names = registry::names(Family::Router);
    assert!(
        names.contains(&"expert_choice".to_string()) && names.contains(&"token_choice".to_string())
    );
    assert_eq!(ExpertChoiceRouter::NAME, "expert_choice");
    assert_eq!(TokenChoiceRouter::NAME, "token_choice");
}

#[test]
fn initialisation_is_seeded_and_scaled() {
    let a = build("token_choice", "", &ctx(64, 4, 16, 0.02, 9));
    let b = build("token_choice", "", &ctx(64, 4, 16, 0.02, 9));
    let c = build("token_choice", "", &ctx(64, 4, 16, 0.02, 10));
    let w = |r: &dyn mor_router::Router| host2(&var(r, "router.w1")).concat();
    assert_eq!(w(a.as_ref()), w(b.as_ref()));
    assert_ne!(w(a.as_ref()), w(c.as_ref()));
    let v = w(a.as_ref());
    let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    assert!(
        (std - 0.02).abs() < 0.004,
        "std {std} of 256 draws from N(0, 0.02²)"
    );
}

#[test]
fn bad_contexts_are_errors() {
    let mut c = ctx(4, 0, 16, 0.02, 0);
    let e = mor_router::build_router("expert_choice", &toml::Table::new(), &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_recursions"), "{e}");
    c.num_recursions = 2;
    c.hidden_size = 0;
    assert!(mor_router::build_router("token_choice", &toml::Table::new(), &c).is_err());
    c.hidden_size = 4;
    c.dtype = candle_core::DType::U32;
    assert!(mor_router::build_router("token_choice", &toml::Table::new(), &c).is_err());
}
