//! Config resolution seen from outside `mor-core`, with stand-in plugins registered by this
//! test crate for the families that live in other crates (a router with a capacity list,
//! two KV policies and a backend).

use mor_core::config::{
    apply_override, parse_override, Budget, Config, DataSource, ModelDims, ResolvedConfig,
    Schedule, TokenizerSpec, Warmup,
};
use mor_core::registry::{AccountingHints, CheckCtx, Family, ParamProblem, Plugin};
use mor_core::{Error, PluginInfo};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// A stand-in for the expert-choice router: a capacity list checked against `N_r`.
#[derive(Debug)]
struct FakeRouter;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FakeRouterParams {
    capacity: Option<Vec<f64>>,
    alpha: Option<f64>,
}

impl Plugin for FakeRouter {
    const FAMILY: Family = Family::Router;
    const NAME: &'static str = "expert_choice";
    const DESCRIPTION: &'static str = "test stand-in";
    type Params = FakeRouterParams;

    fn check(params: &Self::Params, ctx: &CheckCtx) -> Vec<ParamProblem> {
        match &params.capacity {
            Some(c) if c.len() != ctx.num_recursions => vec![ParamProblem {
                field: "capacity".into(),
                value: format!("{c:?}"),
                allowed: format!(
                    "one capacity per recursion step ({} values)",
                    ctx.num_recursions
                ),
            }],
            _ => vec![],
        }
    }

    fn accounting(params: &Self::Params, ctx: &CheckCtx) -> AccountingHints {
        let n = ctx.num_recursions;
        let caps = params
            .capacity
            .clone()
            .unwrap_or_else(|| (1..=n).map(|r| (n - r + 1) as f64 / n as f64).collect());
        AccountingHints {
            capacities: Some(caps),
            kv_sharing: false,
            kv_full_context: false,
        }
    }
}

#[derive(Debug)]
struct FakeKv;
#[derive(Debug)]
struct FakeKvShare;
#[derive(Debug)]
struct FakeCpu;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

impl Plugin for FakeKv {
    const FAMILY: Family = Family::KvPolicy;
    const NAME: &'static str = "recursion_wise";
    const DESCRIPTION: &'static str = "test stand-in";
    type Params = Empty;
}

impl Plugin for FakeKvShare {
    const FAMILY: Family = Family::KvPolicy;
    const NAME: &'static str = "recursive_sharing";
    const DESCRIPTION: &'static str = "test stand-in";
    type Params = Empty;

    fn accounting(_: &Empty, _: &CheckCtx) -> AccountingHints {
        AccountingHints {
            capacities: None,
            kv_sharing: true,
            kv_full_context: false,
        }
    }
}

impl Plugin for FakeCpu {
    const FAMILY: Family = Family::Backend;
    const NAME: &'static str = "cpu";
    const DESCRIPTION: &'static str = "test stand-in";
    type Params = Empty;
}

mor_core::__private::inventory::submit! { PluginInfo::of::<FakeRouter>("config-tests", module_path!()) }
mor_core::__private::inventory::submit! { PluginInfo::of::<FakeKv>("config-tests", module_path!()) }
mor_core::__private::inventory::submit! { PluginInfo::of::<FakeKvShare>("config-tests", module_path!()) }
mor_core::__private::inventory::submit! { PluginInfo::of::<FakeCpu>("config-tests", module_path!()) }

const TINY: &str = include_str!("../../configs/tiny.toml");

fn problems(text: &str) -> Vec<mor_core::error::ConfigProblem> {
    match Config::from_toml_str(text) {
        Err(Error::Config(p)) => p,
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected a config error for:\n{text}"),
    }
}

/// Asserts exactly one problem, at `field`, whose message contains every `needle`.
#[track_caller]
fn check_one(text: &str, field: &str, needles: &[&str]) {
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0].field, field, "{p:#?}");
    let msg = p[0].to_string();
    for n in needles {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
}

fn tiny_with(extra: &[(&str, toml::Value)]) -> String {
    let mut t = Config::parse_table(TINY).unwrap();
    for (k, v) in extra {
        apply_override(&mut t, k, v.clone()).unwrap();
    }
    toml::to_string(&t).unwrap()
}

#[test]
fn tiny_config_resolves_with_defaults() {
    let c = Config::from_toml_str(TINY).unwrap();
    assert_eq!(c.model, ModelDims::tiny());
    assert_eq!(c.recursion.num_recursions, 3);
    assert_eq!(c.recursion.sharing.kind, "middle_cycle");
    assert_eq!(c.plan.num_slots(), 8); // 1 + 2×3 + 1
    assert_eq!(c.plan.num_blocks, 4);
    assert_eq!(c.router.as_ref().unwrap().kind, "expert_choice");
    assert_eq!(c.kv.kind, "recursion_wise");
    assert_eq!(c.backend.kind, "cpu");
    assert_eq!(c.budget_steps(), 20);
    assert_eq!(c.train.warmup, Warmup::Auto);
    assert_eq!(c.train.warmup_steps, 1); // round(0.05 · 20)
    assert_eq!(c.train.decay_steps(), 4);
    assert_eq!(c.train.grad_accum(), 1);
    assert_eq!(c.tokens_per_step(), 8 * 128);
    assert_eq!(c.data.source, DataSource::Builtin);
    assert_eq!(c.data.tokenizer, TokenizerSpec::Auto);
    assert_eq!(c.infer.max_depth, 3);
    assert_eq!(c.eval.router_metrics.len(), 4);
    assert_eq!(c.threads, 0);
    let ctx = c.check_ctx();
    assert_eq!(
        (ctx.num_recursions, ctx.seq_len, ctx.hidden_size),
        (3, 128, 128)
    );
    assert_eq!(ctx.router.as_deref(), Some("expert_choice"));
}

#[test]
fn minimal_configs_default_to_vanilla_and_middle_cycle() {
    let c = Config::from_toml_str("[model]\npreset = \"micro\"").unwrap();
    assert_eq!(c.recursion.sharing.kind, "none");
    assert_eq!(c.plan.num_blocks, 4);
    assert!(c.router.is_none());
    assert_eq!(c.train.budget, Budget::Steps(1000));
    let c = Config::from_toml_str("[model]\npreset = \"micro\"\n[recursion]\nnum_recursions = 2")
        .unwrap();
    assert_eq!(c.recursion.sharing.kind, "middle_cycle");
    // `kind = "none"` in [router] means no routing, and a string is shorthand for a slot.
    let c = Config::from_toml_str(&tiny_with(&[("router.kind", "none".into())])).unwrap();
    assert!(c.router.is_none());
    let c = Config::from_toml_str(&tiny_with(&[("recursion.sharing", "cycle".into())])).unwrap();
    assert_eq!(c.recursion.sharing.kind, "cycle");
}

#[test]
fn paper_360m_vanilla_budget_and_schedule() {
    let text = r#"
        [model]
        preset = "360m"
        [recursion]
        sharing = { kind = "none" }
        [train]
        budget = { flops = 16.5e18 }
        batch_seqs = 1024
        micro_batch_seqs = 16
        warmup_ref_flops = 2e18
    "#;
    let c = Config::from_toml_str(text).unwrap();
    // Spec §1.3: 9438 steps, warmup 57, cooldown 1888, accumulation 64 on one process.
    assert_eq!(c.budget_steps(), 9438);
    assert_eq!(c.train.warmup_steps, 57);
    assert_eq!(c.train.decay_steps(), 1888);
    assert_eq!(c.train.grad_accum(), 64);
    let r = mor_core::accounting::report(&c).unwrap();
    assert_eq!(r.flops_per_token, 833_679_360.0);
    assert_eq!(r.tokens, 9438 * 2_097_152);
    assert_eq!(r.embedding_params, 47_185_920);
    assert_eq!((r.non_embedding_params as f64 / 1e6).round(), 315.0);
    // MoR-E N_r = 3 with the stand-in router's default capacities, and KV sharing.
    let mor = text.replace(
        "{ kind = \"none\" }",
        "{ kind = \"middle_cycle\" }\nnum_recursions = 3",
    ) + "[router]\nkind = \"expert_choice\"\n";
    let c = Config::from_toml_str(&mor).unwrap();
    assert_eq!(c.budget_steps(), 14163); // released: 14161 (spec §1.4 residual)
    assert_eq!(c.train.warmup_steps, 86);
    let r = mor_core::accounting::report(&c).unwrap();
    assert_eq!(r.active_tokens, vec![2048, 1365, 682]);
    assert_eq!(r.router_params, 3 * 960);
    let c = Config::from_toml_str(&(mor + "[kv]\nkind = \"recursive_sharing\"\n")).unwrap();
    assert_eq!(c.budget_steps(), 14674); // released: 14672
}

#[test]
fn lr_schedules() {
    let mut c = Config::from_toml_str(&tiny_with(&[("train.warmup_steps", 4.into())]))
        .unwrap()
        .train;
    // Trapezoid: warmup 4, stable until 20 − 4 = 16, then linear to 0.
    assert_eq!(c.lr_at(0), 0.0);
    assert!((c.lr_at(2) - 1.5e-3).abs() < 1e-15);
    assert_eq!(c.lr_at(4), 3e-3);
    assert_eq!(c.lr_at(15), 3e-3);
    assert!((c.lr_at(18) - 1.5e-3).abs() < 1e-15);
    assert_eq!(c.lr_at(20), 0.0);
    c.schedule = Schedule::Cosine;
    assert_eq!(c.lr_at(4), 3e-3);
    assert!((c.lr_at(12) - 3e-3 * (0.1 + 0.9 * 0.5)).abs() < 1e-15);
    assert!((c.lr_at(20) - 3e-4).abs() < 1e-15);
    c.schedule = Schedule::Constant;
    assert_eq!(c.lr_at(19), 3e-3);
}

#[test]
fn misspelled_fields_name_their_path_and_the_expected_ones() {
    check_one(
        &(TINY.to_string() + "\n[extra]\nx = 1\n"),
        "extra",
        &["unknown section", "`train`"],
    );
    let text = TINY.replace("preset = \"tiny\"", "preset = \"tiny\"\nhiden_size = 4");
    check_one(
        &text,
        "model.hiden_size",
        &[
            "unknown field `hiden_size`",
            "expected one of",
            "`hidden_size`",
        ],
    );
    let text = TINY.replace("schedule = \"trapezoid\"", "schedule = \"linear\"");
    check_one(
        &text,
        "train.schedule",
        &[
            "unknown variant `linear`",
            "`trapezoid`",
            "`cosine`",
            "`constant`",
        ],
    );
    let text = TINY.replace("preset = \"tiny\"", "preset = \"huge\"");
    check_one(&text, "model.preset", &["\"huge\"", "`micro`", "`1.7b`"]);
    check_one(
        &tiny_with(&[("train.batch_seqs", (-8).into())]),
        "train.batch_seqs",
        &["-8", "usize"],
    );
    check_one(
        &tiny_with(&[("train.precision", "fp8".into())]),
        "train.precision",
        &["\"fp8\"", "`f32`", "`bf16`"],
    );
    let c = Config::from_toml_str(&tiny_with(&[("train.precision", "bf16".into())])).unwrap();
    assert_eq!(c.train.precision, mor_core::config::Precision::Bf16);
    check_one(
        &tiny_with(&[(
            "eval.router_metrics",
            toml::Value::Array(vec!["nll".into()]),
        )]),
        "eval.router_metrics",
        &["unknown variant `nll`", "dead_token_ratio"],
    );
    check_one(
        &tiny_with(&[("data.tokenizer", "btye".into())]),
        "data.tokenizer",
        &["`byte`", "`bpe`"],
    );
}

#[test]
fn plugin_slots_are_resolved_through_the_registry() {
    check_one(
        &tiny_with(&[("router.kind", "expert_choise".into())]),
        "router.kind",
        &[
            "unknown router `expert_choise`",
            "expert_choice",
            "use <plugin_crate> as _",
        ],
    );
    check_one(
        &tiny_with(&[("router.capcity", toml::Value::Array(vec![1.0.into()]))]),
        "router.capcity",
        &[
            "router `expert_choice`",
            "unknown field `capcity`",
            "`capacity`",
        ],
    );
    let caps = toml::Value::Array(vec![1.0.into(), 0.5.into()]);
    check_one(
        &tiny_with(&[("router.capacity", caps)]),
        "router.capacity",
        &["3 values"],
    );
    check_one(
        &tiny_with(&[("kv.kind", "paged".into())]),
        "kv.kind",
        &["unknown kv_policy `paged`", "recursion_wise"],
    );
    check_one(
        &tiny_with(&[("recursion.sharing.period", 2.into())]),
        "recursion.sharing.period",
        &["unknown field `period`"],
    );
    check_one(
        &tiny_with(&[("runtime.backend", toml::Value::Integer(3))]),
        "runtime.backend",
        &["a plugin name"],
    );
    let text = TINY.replace(
        "[router]\nkind = \"expert_choice\"",
        "[router]\nalpha = 0.1",
    );
    check_one(&text, "router.kind", &["needs `kind"]);
}

#[test]
fn cross_field_checks() {
    check_one(
        &tiny_with(&[("recursion.num_recursions", 5.into())]),
        "recursion.num_recursions",
        &["does not fit 4 recursive layers", "allowed: 1..=4"],
    );
    check_one(
        &tiny_with(&[("recursion.sharing.kind", "sequence".into())]),
        "recursion.sharing",
        &["cyclic", "`cycle` or `middle_cycle`"],
    );
    let text = tiny_with(&[
        ("recursion.num_recursions", 1.into()),
        ("recursion.sharing.kind", "cycle".into()),
    ]);
    check_one(&text, "recursion.num_recursions", &["num_recursions >= 2"]);
    check_one(
        &tiny_with(&[("model.num_kv_heads", 3.into())]),
        "model.num_kv_heads",
        &["divisor of num_heads = 4"],
    );
    check_one(
        &tiny_with(&[("train.micro_batch_seqs", 3.into())]),
        "train.micro_batch_seqs",
        &["divisor of batch_seqs = 8"],
    );
    check_one(
        &tiny_with(&[("infer.max_depth", 4.into())]),
        "infer.max_depth",
        &["1..=3"],
    );
    check_one(
        &tiny_with(&[("model.num_layers", 2.into())]),
        "model.num_layers",
        &["at least 3 layers"],
    );
    check_one(
        &tiny_with(&[("train.warmup_steps", 30.into())]),
        "train.warmup_steps",
        &["at most the 20 steps"],
    );
    let mut t = Config::parse_table(TINY).unwrap();
    t["train"].as_table_mut().unwrap()["budget"] = toml::Value::Table(
        [
            ("steps".to_string(), toml::Value::Integer(3)),
            ("tokens".to_string(), toml::Value::Float(1e9)),
        ]
        .into_iter()
        .collect(),
    );
    check_one(
        &toml::to_string(&t).unwrap(),
        "train.budget",
        &["exactly one of"],
    );
    check_one(
        &tiny_with(&[(
            "train.budget",
            toml::Value::Table([("flops".to_string(), (-1.0).into())].into_iter().collect()),
        )]),
        "train.budget.flops",
        &["positive"],
    );
}

#[test]
fn every_problem_is_reported_together() {
    let text = r#"
        [model]
        preset = "tiny"
        hidden = 3
        [train]
        lr = -1.0
        schedule = "cosin"
        [infer]
        top_p = 2.0
    "#;
    let p = problems(text);
    let fields: Vec<&str> = p.iter().map(|q| q.field.as_str()).collect();
    assert_eq!(
        fields,
        vec!["model.hidden", "train.schedule", "train.lr", "infer.top_p"],
        "{p:#?}"
    );
    let msg = Error::Config(p).to_string();
    assert!(msg.starts_with("invalid config (4 problems)"), "{msg}");
}

#[test]
fn explicit_dims_without_preset() {
    let p = problems("[model]\nhidden_size = 64\nnum_layers = 4");
    let fields: Vec<&str> = p.iter().map(|q| q.field.as_str()).collect();
    assert!(
        fields.contains(&"model.vocab_size") && fields.contains(&"model.seq_len"),
        "{fields:?}"
    );
    let text = "[model]\nvocab_size = 100\nhidden_size = 32\nnum_layers = 3\nnum_heads = 2\nnum_kv_heads = 1\n\
                head_dim = 16\nintermediate_size = 64\nseq_len = 16\ntie_embeddings = false";
    let c = Config::from_toml_str(text).unwrap();
    assert!(!c.model.tie_embeddings);
    assert_eq!(c.model.rope_theta, 10_000.0);
}

#[test]
fn overrides() {
    let mut t = Config::parse_table(TINY).unwrap();
    apply_override(&mut t, "router.kind", "none".into()).unwrap();
    apply_override(&mut t, "recursion.sharing", "cycle".into()).unwrap();
    apply_override(&mut t, "recursion.sharing.kind", "middle_cycle".into()).unwrap();
    assert_eq!(
        t["recursion"]["sharing"]["kind"].as_str(),
        Some("middle_cycle")
    );
    apply_override(&mut t, "eval.causal", false.into()).unwrap();
    let c = Config::from_table(t.clone()).unwrap();
    assert!(c.router.is_none() && !c.eval.causal);
    let e = apply_override(&mut t, "train.lr.x", 1.into())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`train.lr` is not a table"), "{e}");
    assert!(apply_override(&mut t, "a..b", 1.into()).is_err());
    let (k, v) = parse_override("train.budget={ tokens = 1e6 }").unwrap();
    apply_override(&mut t, &k, v).unwrap();
    assert_eq!(
        Config::from_table(t).unwrap().train.budget,
        Budget::Tokens(1e6)
    );
    assert_eq!(
        parse_override("infer.max_depth=2").unwrap().1,
        toml::Value::Integer(2)
    );
    assert!(parse_override("nothing").is_err());
}

#[test]
fn saved_configs_round_trip() {
    let c = Config::from_toml_str(TINY).unwrap();
    let again = Config::from_toml_str(&c.to_toml_string()).unwrap();
    assert_eq!(c, again);
    let json = c.to_json().unwrap();
    let back: ResolvedConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.plan, c.plan);
    assert_eq!(back.train, c.train);
}

#[test]
fn file_errors() {
    let e = Config::from_path(std::path::Path::new("/nonexistent/run.toml")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    let p = problems("[model\npreset = 1");
    assert_eq!(p[0].field, "(toml syntax)");
}

/// Known keys and a spread of values, to build random but plausible tables.
const KEYS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "preset",
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "seq_len",
            "rope_theta",
            "rms_eps",
            "init_std",
            "tie_embeddings",
            "bogus",
        ],
    ),
    (
        "recursion",
        &["num_recursions", "sharing", "ln_share", "depth_fix"],
    ),
    ("router", &["kind", "capacity", "alpha"]),
    ("kv", &["kind"]),
    ("runtime", &["backend", "threads", "seed"]),
    (
        "train",
        &[
            "budget",
            "batch_seqs",
            "micro_batch_seqs",
            "lr",
            "betas",
            "schedule",
            "warmup_steps",
            "warmup_ref_flops",
            "decay_frac",
            "precision",
            "spike_window",
        ],
    ),
    (
        "data",
        &["source", "tokenizer", "val_fraction", "builtin_docs"],
    ),
    ("infer", &["batch_size", "max_depth", "threshold", "top_p"]),
    ("eval", &["tasks", "max_batches", "router_metrics"]),
    ("bogus", &["x"]),
];

fn value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        prop::sample::select(vec![
            -1i64,
            0,
            1,
            2,
            3,
            4,
            7,
            64,
            1 << 40,
            i64::MAX,
            i64::MIN
        ])
        .prop_map(toml::Value::Integer),
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.5,
            1.0,
            2.0,
            1e-300,
            1e300,
            f64::NAN,
            f64::INFINITY,
            16.5e18
        ])
        .prop_map(toml::Value::Float),
        prop::sample::select(vec![
            "tiny",
            "micro",
            "360m",
            "none",
            "cycle",
            "sequence",
            "middle_cycle",
            "expert_choice",
            "recursion_wise",
            "cpu",
            "auto",
            "n_r",
            "bf16",
            "",
            "add_layers",
            "subsample",
            "trapezoid",
            "entropy",
        ])
        .prop_map(|s| toml::Value::String(s.to_string())),
        any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["kind", "steps", "tokens", "flops", "x"]),
                    inner
                ),
                0..3
            )
            .prop_map(|kv| toml::Value::Table(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

fn table() -> impl Strategy<Value = toml::Table> {
    let entry = (0..KEYS.len(), 0usize..16, value());
    prop::collection::vec(entry, 0..14).prop_map(|entries| {
        let mut t = Config::parse_table(TINY).unwrap();
        for (s, k, v) in entries {
            let (section, keys) = KEYS[s];
            let key = format!("{section}.{}", keys[k % keys.len()]);
            let _ = apply_override(&mut t, &key, v);
        }
        t
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn resolution_never_panics_on_random_tables(t in table()) {
        match Config::from_table(t) {
            Ok(c) => prop_assert!(c.plan.validate().is_ok()),
            Err(Error::Config(p)) => prop_assert!(!p.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
        }
    }

    #[test]
    fn resolution_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
        let _ = Config::from_toml_str(&s);
    }

    #[test]
    fn resolution_never_panics_on_tomlish_text(s in "(\\[(model|train|router)\\]\n)?([a-z_]{1,12} = (\"[a-z_]{0,8}\"|-?[0-9]{1,3}|\\{ ?kind = \"[a-z_]{1,14}\" ?\\})\n){0,6}") {
        let _ = Config::from_toml_str(&s);
    }
}

/// `runtime.threads` is bounded by the machine's parallelism when a run starts
/// (`check_threads`): 100000 threads would oversubscribe any machine (and once hung, then
/// aborted); the error names the field, the value and the allowed range. Resolution itself
/// accepts any count, so a run trained on a larger machine still resolves on this one.
#[test]
fn threads_are_bounded_by_the_available_parallelism() {
    let cores = mor_core::config::available_cores();
    assert_eq!(
        cores,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for ok in [0, 1, cores] {
        mor_core::config::check_threads(ok).unwrap();
    }
    for n in [0, 1, cores, cores + 1, 100_000] {
        let c =
            Config::from_toml_str(&tiny_with(&[("runtime.threads", (n as i64).into())])).unwrap();
        assert_eq!(c.threads, n);
    }
    for bad in [cores + 1, 100_000] {
        let err = mor_core::config::check_threads(bad)
            .unwrap_err()
            .to_string();
        for want in ["runtime.threads", &bad.to_string(), &format!("0..={cores}")] {
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        assert!(!err.contains("  threads"), "stray spaces in {err:?}");
    }
}

/// The training memory estimate against its closed form (module docs of
/// `mor_core::accounting::memory`) for a model small enough to count by hand.
#[test]
fn memory_estimate_closed_form_and_refusal() {
    use mor_core::accounting::{check_fits, memory_estimate, parse_meminfo, MemoryEstimate};
    let c = Config::from_toml_str(
        "[model]\nvocab_size = 10\nhidden_size = 4\nnum_layers = 2\nnum_heads = 2\n\
         num_kv_heads = 1\nhead_dim = 2\nintermediate_size = 6\nseq_len = 3\n\
         [train]\nbatch_seqs = 2\nmicro_batch_seqs = 1\nbudget = { steps = 1 }\n",
    )
    .unwrap();
    // Per block: q, o 2·4·4 + k, v 2·4·2 + MLP 3·4·6 + two norms 2·4 = 128; two blocks,
    // the final norm (4) and the tied embedding (10·4): 300 parameters of 4 bytes.
    // Per slot (k = c = L = 3): 3·(6·4 + 2·4 + 2·2 + 4·6 + 2·3) = 198 values; two slots plus
    // embedding and final norm outputs 2·3·4: 420 per sequence, micro-batch 1.
    // Logits and their gradient: 2·1·3·10 = 60. Accumulation 2 keeps two gradient copies.
    let want = MemoryEstimate {
        parameters: 1200,
        gradients: 2400,
        optimizer: 2400,
        activations: 1680,
        logits: 240,
        total: 7920,
    };
    assert_eq!(memory_estimate(&c), want);
    assert!(check_fits(&c, 7920).is_ok());
    let e = check_fits(&c, 7919).unwrap_err();
    assert!(e.contains("7920 bytes") && e.contains("7919 bytes"), "{e}");

    // The example of a model far too large: refused with the model's size, the estimate and
    // the memory available.
    let big = Config::from_toml_str(&tiny_with(&[
        ("model.hidden_size", 100_000.into()),
        ("model.num_layers", 200.into()),
    ]))
    .unwrap();
    let est = memory_estimate(&big);
    // Parameters as counted by the plan, and the three d → 1 routers: 4 bytes each.
    let n = mor_core::accounting::param_counts(&big.model, &big.plan, true);
    assert_eq!(
        est.parameters,
        4 * (n.non_embedding + n.embedding + 3 * 100_000)
    );
    assert_eq!(est.optimizer, 2 * est.parameters);
    let sixteen_gib = 16u64 << 30;
    assert!(est.total > 16 * sixteen_gib, "{est:?}");
    let e = check_fits(&big, sixteen_gib).unwrap_err();
    for needle in [
        "hidden_size 100000",
        "num_layers 200",
        &format!("{} bytes", est.total),
        &format!("{sixteen_gib} bytes"),
        "16.0 GiB",
    ] {
        assert!(e.contains(needle), "`{needle}` not in: {e}");
    }

    let text = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   16000000 kB\n";
    assert_eq!(parse_meminfo(text), Some(16_000_000 * 1024));
    assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    assert_eq!(parse_meminfo("MemAvailable: lots kB\n"), None);
    if cfg!(target_os = "linux") {
        assert!(mor_core::accounting::available_memory().is_some_and(|b| b > 0));
    }
}

/// A micro model of `layers` layers with sharing `sharing` and `N_r = nr` (+ `extra` TOML).
fn uptrain_cfg(
    layers: usize,
    sharing: &str,
    nr: usize,
    extra: &str,
) -> mor_core::Result<mor_core::config::ResolvedConfig> {
    Config::from_toml_str(&format!(
        "[model]\npreset = \"micro\"\nnum_layers = {layers}\n[recursion]\nnum_recursions = {nr}\nsharing = \"{sharing}\"\n{extra}"
    ))
}

fn sources(
    layers: usize,
    sharing: &str,
    nr: usize,
    pretrained: usize,
    m: mor_core::config::InitMethod,
) -> Result<Vec<Vec<usize>>, String> {
    let c = uptrain_cfg(layers, sharing, nr, "").unwrap();
    mor_core::config::init_sources(&c.plan, pretrained, m, 7)
}

#[test]
fn uptraining_maps_pretrained_layers_per_method_and_sharing() {
    use mor_core::config::InitMethod::*;
    let v = |x: &[&[usize]]| x.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
    // 6 pretrained layers -> Cycle N_r = 2 (3 shared blocks, slots (0,1,2)(0,1,2)):
    // stepwise = round(linspace(0, 5, 3)) = round(0, 2.5, 5) = 0, 2, 5 (half to even).
    assert_eq!(
        sources(6, "cycle", 2, 6, Stepwise).unwrap(),
        v(&[&[0], &[2], &[5]])
    );
    assert_eq!(
        sources(6, "cycle", 2, 6, Lower).unwrap(),
        v(&[&[0], &[1], &[2]])
    );
    assert_eq!(
        sources(6, "cycle", 2, 6, Upper).unwrap(),
        v(&[&[3], &[4], &[5]])
    );
    assert_eq!(
        sources(6, "cycle", 2, 6, Average).unwrap(),
        v(&[&[0, 3], &[1, 4], &[2, 5]])
    );
    // Sequence N_r = 2 (slots (0,0)(1,1)(2,2)): averages neighbours.
    assert_eq!(
        sources(6, "sequence", 2, 6, Average).unwrap(),
        v(&[&[0, 1], &[2, 3], &[4, 5]])
    );
    assert_eq!(
        sources(6, "sequence", 2, 6, Stepwise).unwrap(),
        v(&[&[0], &[2], &[5]])
    );
    assert_eq!(
        sources(6, "sequence", 2, 6, Upper).unwrap(),
        v(&[&[3], &[4], &[5]])
    );
    // Middle-Cycle N_r = 2 (blocks: first, 2 shared, last): first and last layers stay,
    // the shared range is layers 1..=4: stepwise linspace(1, 4, 2) = 1, 4.
    assert_eq!(
        sources(6, "middle_cycle", 2, 6, Stepwise).unwrap(),
        v(&[&[0], &[1], &[4], &[5]])
    );
    assert_eq!(
        sources(6, "middle_cycle", 2, 6, Lower).unwrap(),
        v(&[&[0], &[1], &[2], &[5]])
    );
    assert_eq!(
        sources(6, "middle_cycle", 2, 6, Upper).unwrap(),
        v(&[&[0], &[3], &[4], &[5]])
    );
    assert_eq!(
        sources(6, "middle_cycle", 2, 6, Average).unwrap(),
        v(&[&[0], &[1, 3], &[2, 4], &[5]])
    );
    assert_eq!(
        sources(6, "middle_sequence", 2, 6, Average).unwrap(),
        v(&[&[0], &[1, 2], &[3, 4], &[5]])
    );
    assert_eq!(
        sources(6, "middle_sequence", 2, 6, Stepwise).unwrap(),
        v(&[&[0], &[1], &[4], &[5]])
    );
    // A deeper pretrained model: 12 layers -> Middle-Cycle with 2 shared blocks:
    // linspace(1, 10, 2) = 1, 10; the last block takes layer 11.
    assert_eq!(
        sources(6, "middle_cycle", 2, 12, Stepwise).unwrap(),
        v(&[&[0], &[1], &[10], &[11]])
    );
    // linspace(0, 4, 5) = 0..4; linspace(0, 5, 4) = 0, 1.67, 3.33, 5 -> 0, 2, 3, 5.
    assert_eq!(
        sources(8, "cycle", 2, 6, Stepwise).unwrap(),
        v(&[&[0], &[2], &[3], &[5]])
    );
    // N_r = 3 Cycle on 9 layers from 9: average of {0,3,6}, {1,4,7}, {2,5,8}.
    assert_eq!(
        sources(9, "cycle", 3, 9, Average).unwrap(),
        v(&[&[0, 3, 6], &[1, 4, 7], &[2, 5, 8]])
    );

    // random: a sorted subset of the shared range, fixed by the seed.
    for sharing in ["cycle", "sequence", "middle_cycle", "middle_sequence"] {
        let c = uptrain_cfg(6, sharing, 2, "").unwrap();
        let a = mor_core::config::init_sources(&c.plan, 10, Random, 3).unwrap();
        assert_eq!(
            a,
            mor_core::config::init_sources(&c.plan, 10, Random, 3).unwrap()
        );
        let middle = sharing.starts_with("middle");
        let shared: Vec<usize> = a[usize::from(middle)..a.len() - usize::from(middle)]
            .iter()
            .map(|s| {
                assert_eq!(s.len(), 1);
                s[0]
            })
            .collect();
        assert!(
            shared.windows(2).all(|w| w[0] < w[1]),
            "{sharing}: {shared:?}"
        );
        let (lo, hi) = if middle { (1, 8) } else { (0, 9) };
        assert!(
            shared.iter().all(|&l| (lo..=hi).contains(&l)),
            "{sharing}: {shared:?}"
        );
        let seeds: std::collections::BTreeSet<_> = (0..20)
            .map(|s| mor_core::config::init_sources(&c.plan, 10, Random, s).unwrap())
            .collect();
        assert!(seeds.len() > 1, "{sharing}: random ignores the seed");
    }
}

#[test]
fn uptraining_refuses_mappings_that_do_not_fit() {
    use mor_core::config::InitMethod::*;
    // average needs exactly one pretrained layer per recursion slot.
    let e = sources(6, "middle_cycle", 2, 12, Average).unwrap_err();
    assert!(
        e.contains("4 recursion slots") && e.contains("10 layers"),
        "{e}"
    );
    // Too few pretrained layers for the shared blocks.
    let e = sources(6, "cycle", 2, 2, Lower).unwrap_err();
    assert!(e.contains("2 layers") && e.contains("at least 3"), "{e}");
    // A vanilla target has one layer per block: `average` is a config error naming the field.
    let e = uptrain_cfg(
        4,
        "none",
        1,
        "[init]\nfrom = \"pre\"\nmethod = \"average\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("init.method") && e.contains("at least two tied layers"),
        "{e}"
    );
    let e = uptrain_cfg(6, "cycle", 2, "[init]\nmethod = \"upper\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("init.from") && e.contains("(missing)"), "{e}");
    let e = uptrain_cfg(
        6,
        "cycle",
        2,
        "[init]\nfrom = \"pre\"\nmethod = \"middle\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("init.method") && e.contains("stepwise"), "{e}");
    let e = uptrain_cfg(6, "cycle", 2, "[init]\nfrom = \"pre\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("init.method") && e.contains("(missing)"), "{e}");
    let e = uptrain_cfg(
        6,
        "cycle",
        2,
        "[init]\nfrom = \"pre\"\nmethod = \"lower\"\nlayers = 3\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("init.layers"), "{e}");
    // A fitting [init] resolves; without one nothing changes.
    let c = uptrain_cfg(
        6,
        "cycle",
        2,
        "[init]\nfrom = \"pre\"\nmethod = \"average\"\n",
    )
    .unwrap();
    let i = c.init.unwrap();
    assert_eq!((i.from.to_str(), i.method), (Some("pre"), Average));
    let c = uptrain_cfg(6, "cycle", 2, "").unwrap();
    assert!(c.init.is_none());
    assert!(
        !c.to_json().unwrap().contains("\"init\""),
        "config.json of a config without [init] changed"
    );
}

fn relax(value: &str) -> String {
    let t: toml::Table = toml::from_str(&format!("v = {value}")).unwrap();
    tiny_with(&[("recursion.relaxation", t["v"].clone())])
}

#[test]
fn relaxation_resolves_with_its_defaults() {
    use mor_core::config::Relaxation;
    let c = Config::from_toml_str(&relax("{ kind = \"lora\" }")).unwrap();
    assert_eq!(
        c.recursion.relaxation,
        Some(Relaxation::Lora {
            rank: 64,
            alpha: 64.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        })
    );
    let c = Config::from_toml_str(&relax(
        "{ kind = \"lora\", rank = 4, alpha = 8.0, targets = [\"o_proj\", \"k_proj\"] }",
    ))
    .unwrap();
    assert_eq!(
        c.recursion.relaxation,
        Some(Relaxation::Lora {
            rank: 4,
            alpha: 8.0,
            targets: vec!["o_proj".into(), "k_proj".into()],
        })
    );
    // The JSON round-trips the relaxation.
    let back: ResolvedConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
    assert_eq!(back.recursion.relaxation, c.recursion.relaxation);
    let c = Config::from_toml_str(&relax("{ kind = \"recursion_encoding\" }")).unwrap();
    assert_eq!(c.recursion.relaxation, Some(Relaxation::RecursionEncoding));
    let c = Config::from_toml_str(&relax("{ kind = \"dora\", rank = 2 }")).unwrap();
    assert_eq!(
        c.recursion.relaxation,
        Some(Relaxation::Dora {
            rank: 2,
            alpha: 2.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        })
    );
    let back: ResolvedConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
    assert_eq!(back.recursion.relaxation, c.recursion.relaxation);
    let c =
        Config::from_toml_str(&relax("{ kind = \"adaption_prompt\", prompt_len = 5 }")).unwrap();
    assert_eq!(
        c.recursion.relaxation,
        Some(Relaxation::AdaptionPrompt { prompt_len: 5 })
    );
    let back: ResolvedConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
    assert_eq!(back.recursion.relaxation, c.recursion.relaxation);
    // `none` is the config without a relaxation, JSON included (no new key).
    let plain = Config::from_toml_str(TINY).unwrap();
    let none = Config::from_toml_str(&relax("{ kind = \"none\" }")).unwrap();
    assert_eq!(none.recursion.relaxation, None);
    assert_eq!(none.recursion, plain.recursion);
    assert_eq!(none.plan, plain.plan);
    assert!(!plain.to_json().unwrap().contains("relaxation"));
}

#[test]
fn bad_relaxations_name_the_field() {
    check_one(
        &relax("{ kind = \"lorra\" }"),
        "recursion.relaxation.kind",
        &["lorra", "recursion_encoding"],
    );
    check_one(
        &relax("{ kind = \"lorra\" }"),
        "recursion.relaxation.kind",
        &["dora", "adaption_prompt"],
    );
    check_one(
        &relax("{ kind = \"dora\", rank = 0 }"),
        "recursion.relaxation.rank",
        &["0", "1..="],
    );
    check_one(
        &relax("{ kind = \"dora\", alpha = 0.0 }"),
        "recursion.relaxation.alpha",
        &["0", "> 0"],
    );
    check_one(
        &relax("{ kind = \"dora\", targets = [\"down_proj\"] }"),
        "recursion.relaxation.targets",
        &["down_proj", "q_proj"],
    );
    check_one(
        &relax("{ kind = \"dora\", prompt_len = 4 }"),
        "recursion.relaxation.prompt_len",
        &["dora"],
    );
    check_one(
        &relax("{ kind = \"adaption_prompt\" }"),
        "recursion.relaxation.prompt_len",
        &["(absent)", "1..="],
    );
    check_one(
        &relax("{ kind = \"adaption_prompt\", prompt_len = 0 }"),
        "recursion.relaxation.prompt_len",
        &["0", "1..="],
    );
    check_one(
        &relax("{ kind = \"adaption_prompt\", prompt_len = 4, rank = 2 }"),
        "recursion.relaxation.rank",
        &["adaption_prompt"],
    );
    check_one(
        &relax("{ kind = \"adaption_prompt\", prompt_len = 4, targets = [\"q_proj\"] }"),
        "recursion.relaxation.targets",
        &["adaption_prompt"],
    );
    check_one(
        &relax("{ kind = \"lora\", rank = 0 }"),
        "recursion.relaxation.rank",
        &["0", "1..="],
    );
    check_one(
        &relax("{ kind = \"lora\", alpha = -1.0 }"),
        "recursion.relaxation.alpha",
        &["-1", "> 0"],
    );
    check_one(
        &relax("{ kind = \"lora\", targets = [\"q_proj\", \"up_proj\"] }"),
        "recursion.relaxation.targets",
        &["up_proj", "q_proj"],
    );
    check_one(
        &relax("{ kind = \"lora\", targets = [\"q_proj\", \"q_proj\"] }"),
        "recursion.relaxation.targets",
        &["q_proj", "at most once"],
    );
    check_one(
        &relax("{ kind = \"lora\", targets = [] }"),
        "recursion.relaxation.targets",
        &["non-empty"],
    );
    check_one(
        &relax("{ kind = \"recursion_encoding\", rank = 4 }"),
        "recursion.relaxation.rank",
        &["recursion_encoding"],
    );
    check_one(
        &relax("{ kind = \"lora\", prompt_len = 8 }"),
        "recursion.relaxation.prompt_len",
        &["lora"],
    );
    // A vanilla model shares no weights to relax.
    let t = Config::parse_table(&relax("{ kind = \"lora\" }")).unwrap();
    let mut t = t;
    apply_override(&mut t, "recursion.num_recursions", toml::Value::Integer(1)).unwrap();
    apply_override(
        &mut t,
        "recursion.sharing",
        toml::Value::String("none".into()),
    )
    .unwrap();
    t.remove("router");
    check_one(
        &toml::to_string(&t).unwrap(),
        "recursion.relaxation.kind",
        &["vanilla", "num_recursions = 1"],
    );
    // Unknown keys are refused by name.
    let p = problems(&relax("{ kind = \"lora\", rnk = 4 }"));
    assert!(p.iter().any(|p| p.to_string().contains("rnk")), "{p:#?}");
}

/// The memory estimate counts the relaxation's parameters like every other parameter:
/// weights, gradients and the two AdamW moments, 4 bytes each.
#[test]
fn memory_estimate_counts_the_relaxation() {
    use mor_core::accounting::{memory_estimate, relaxation_params};
    let base = Config::from_toml_str(&relax("{ kind = \"none\" }")).unwrap();
    let lora = Config::from_toml_str(&relax("{ kind = \"lora\", rank = 4 }")).unwrap();
    let n = relaxation_params(
        &lora.model,
        &lora.plan,
        lora.recursion.relaxation.as_ref(),
        false,
    );
    assert!(n > 0);
    let (a, b) = (memory_estimate(&base), memory_estimate(&lora));
    assert_eq!(b.parameters - a.parameters, 4 * n);
    assert_eq!(b.optimizer - a.optimizer, 8 * n);
    assert_eq!(
        b.gradients - a.gradients,
        (a.gradients / a.parameters) * 4 * n
    );
}

/// `train.update_path` selects where AdamW updates: `auto` by default (and then not
/// written out, so a resolved config without the key is unchanged), `host` or `device`;
/// any other value is one problem naming the field, the value and the three allowed ones.
#[test]
fn update_path_parses_and_a_bad_value_names_the_allowed_ones() {
    use mor_core::config::UpdatePath;
    let c = Config::from_toml_str(TINY).unwrap();
    assert_eq!(c.train.update_path, UpdatePath::Auto);
    let saved = toml::to_string(&c.train).unwrap();
    assert!(!saved.contains("update_path"), "{saved}");
    for (name, want) in [
        ("auto", UpdatePath::Auto),
        ("host", UpdatePath::Host),
        ("device", UpdatePath::Device),
    ] {
        let c = Config::from_toml_str(&tiny_with(&[("train.update_path", name.into())])).unwrap();
        assert_eq!(c.train.update_path, want);
        assert_eq!(want.as_str(), name);
        // A saved resolved config keeps the path it names.
        let back: mor_core::config::TrainConfig =
            toml::from_str(&toml::to_string(&c.train).unwrap()).unwrap();
        assert_eq!(back.update_path, want);
    }
    check_one(
        &tiny_with(&[("train.update_path", "gpu".into())]),
        "train.update_path",
        &["\"gpu\"", "`auto`", "`host`", "`device`"],
    );
    check_one(
        &tiny_with(&[("train.update_path", 1.into())]),
        "train.update_path",
        &["1"],
    );
}
