//! End-to-end tests of `cargo xtask list | plan` with every built-in plugin linked: the
//! paper's rows (spec §1.3, §6.1), the error messages of bad configs, and resolution with
//! the real router, KV and backend plugins.

use mor_core::config::{apply_override, Config};
use mor_core::Error;
use mor_models as _;
use proptest::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("xtask runs")
}

fn plan_json(config: &str, sets: &[&str]) -> Value {
    let mut args = vec!["plan", "--json", "--config", config];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = xtask(&args);
    assert!(
        out.status.success(),
        "{config}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("plan --json prints JSON")
}

/// Runs `plan` on the tiny config with overrides and returns stderr; asserts a non-zero exit.
fn plan_error(sets: &[&str]) -> String {
    let mut args = vec!["plan", "--config", "configs/tiny.toml"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = xtask(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{sets:?} should fail; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

#[track_caller]
fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(haystack.contains(n), "`{n}` not in:\n{haystack}");
    }
}

/// (file, released steps of spec §1.3, steps of the spec §1.4 rule, non-embedding params in
/// millions, unrolled slots, billions of tokens as in the table).
const ROWS: [(&str, u64, u64, u64, usize, f64); 9] = [
    ("vanilla", 9438, 9438, 315, 32, 19.8),
    ("recursive_nr2", 9438, 9438, 167, 32, 19.8),
    ("recursive_nr3", 9438, 9438, 118, 32, 19.8),
    ("recursive_nr4", 8883, 8883, 98, 34, 18.6),
    ("mor_expert_nr2", 12619, 12618, 167, 32, 26.5),
    ("mor_expert_nr3", 14161, 14163, 118, 32, 29.7),
    ("mor_expert_nr4", 14216, 14215, 98, 34, 29.8),
    ("mor_expert_nr3_kvshare", 14672, 14674, 118, 32, 30.8),
    ("mor_token_nr3", 14161, 14163, 118, 32, 29.7),
];

#[test]
fn paper_rows_plan_to_the_released_step_counts() {
    for (name, released, ours, millions, slots, tokens_b) in ROWS {
        let r = plan_json(&format!("configs/paper/{name}.toml"), &[]);
        let steps = r["steps"].as_u64().unwrap();
        assert_eq!(steps, ours, "{name}");
        let residual = (steps as f64 - released as f64) / released as f64;
        assert!(
            residual.abs() < 5e-4,
            "{name}: {steps} vs {released} ({:+.4}%)",
            residual * 100.0
        );
        let non_emb = r["non_embedding_params"].as_u64().unwrap();
        assert_eq!(
            (non_emb as f64 / 1e6).round() as u64,
            millions,
            "{name}: {non_emb}"
        );
        assert_eq!(
            r["embedding_params"].as_u64().unwrap(),
            49_152 * 960,
            "{name}"
        );
        assert_eq!(r["slots"].as_array().unwrap().len(), slots, "{name}");
        assert_eq!(r["num_slots"].as_u64().unwrap() as usize, slots, "{name}");
        let tokens = r["tokens"].as_f64().unwrap();
        assert_eq!(tokens, (steps * 1024 * 2048) as f64, "{name}");
        assert_eq!((tokens / 1e8).round() / 10.0, tokens_b, "{name}");
        // Every row is within the 16.5e18 budget by less than one step's FLOPs.
        let fpt = r["flops_per_token"].as_f64().unwrap();
        assert!(
            tokens * fpt >= 16.5e18 && (tokens - 2_097_152.0) * fpt < 16.5e18,
            "{name}"
        );
    }
}

#[test]
fn paper_rows_details() {
    let van = plan_json("configs/paper/vanilla.toml", &[]);
    assert_eq!(van["flops_per_token"].as_f64().unwrap(), 833_679_360.0);
    assert_eq!(van["num_blocks"].as_u64().unwrap(), 32);
    assert_eq!(van["router_params"].as_u64().unwrap(), 0);
    assert_eq!(van["warmup_steps"].as_u64().unwrap(), 57); // spec §1.3
    assert_eq!(van["decay_steps"].as_u64().unwrap(), 1888); // spec §1.3
    let mor = plan_json("configs/paper/mor_expert_nr3.toml", &[]);
    assert_eq!(mor["warmup_steps"].as_u64().unwrap(), 86); // spec §1.3
    assert_eq!(mor["active_tokens"], serde_json::json!([2048, 1365, 682]));
    assert_eq!(
        mor["slots"][0],
        serde_json::json!({"block": 0, "segment": "prelude"})
    );
    assert_eq!(
        mor["slots"][11],
        serde_json::json!({"block": 1, "segment": "recursion", "step": 2, "layer": 0})
    );
    assert_eq!(
        mor["slots"][31],
        serde_json::json!({"block": 11, "segment": "coda"})
    );
    let kv = plan_json("configs/paper/mor_expert_nr3_kvshare.toml", &[]);
    assert_eq!(kv["kv_sharing"], Value::Bool(true));
    let token = plan_json("configs/paper/mor_token_nr3.toml", &[]);
    assert_eq!(token["flops_per_token"], mor["flops_per_token"]); // perfect balance (spec §1.4)
                                                                  // Overrides reach the plan: subsampling 135M with N_r = 3 gives 1 + 9×3 + 1 = 29 layers.
    let sub = plan_json(
        "configs/paper/recursive_nr3.toml",
        &[
            "model.preset=135m",
            "recursion.depth_fix=subsample",
            "train.budget={ steps = 10 }",
        ],
    );
    assert_eq!(sub["num_slots"].as_u64().unwrap(), 29);
    assert_eq!(
        (sub["non_embedding_params"].as_f64().unwrap() / 1e6).round(),
        39.0
    ); // spec §2
}

#[test]
fn tiny_plan_text_and_json() {
    let out = xtask(&["plan", "--config", "configs/tiny.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_contains(
        &text,
        &[
            "middle_cycle: N_r = 3, B_d = 2, 8 slots, 4 unique blocks",
            "step 3 layer 1",
            "coda",
            "20 steps",
        ],
    );
    let r = plan_json("configs/tiny.toml", &[]);
    for key in [
        "steps",
        "tokens",
        "flops_per_token",
        "non_embedding_params",
        "embedding_params",
        "slots",
    ] {
        assert!(r.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(r["steps"].as_u64().unwrap(), 20);
    assert_eq!(r["tokens"].as_u64().unwrap(), 20 * 8 * 128);
}

#[test]
fn unknown_plugin_name() {
    let e = plan_error(&["router.kind=expert_choise"]);
    assert_contains(
        &e,
        &[
            "(1 problem)",
            "`router.kind` = \"expert_choise\"",
            "unknown router",
            "expert_choice, token_choice",
        ],
    );
    let e = plan_error(&["kv.kind=paged"]);
    assert_contains(
        &e,
        &["`kv.kind`", "hybrid, recursion_wise, recursive_sharing"],
    );
}

#[test]
fn misspelled_plugin_parameter() {
    let e = plan_error(&["router.capcity=[1.0, 0.5, 0.25]"]);
    assert_contains(
        &e,
        &[
            "(1 problem)",
            "`router.capcity`",
            "unknown field `capcity`",
            "expected one of",
            "`capacity`",
        ],
    );
}

#[test]
fn recursions_that_do_not_fit_the_layers() {
    let e = plan_error(&["recursion.num_recursions=5"]);
    assert_contains(
        &e,
        &[
            "(1 problem)",
            "`recursion.num_recursions` = 5",
            "does not fit 4 recursive layers",
            "allowed: 1..=4",
        ],
    );
}

#[test]
fn capacity_list_of_the_wrong_length() {
    let e = plan_error(&["router.capacity=[1.0, 0.5]"]);
    assert_contains(
        &e,
        &[
            "(1 problem)",
            "`router.capacity`",
            "has 2 entries",
            "list of 3 fractions",
        ],
    );
}

#[test]
fn bad_files_and_flags() {
    let out = xtask(&["plan", "--config", "configs/no_such.toml"]);
    assert!(!out.status.success());
    assert_contains(
        &String::from_utf8_lossy(&out.stderr),
        &["cannot read configs/no_such.toml"],
    );
    let dir = std::env::temp_dir().join(format!("mor-xtask-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\npreset = \"tiny\"\n[train]\nschedule = \"cosin\"\n",
    )
    .unwrap();
    let out = xtask(&["plan", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert_contains(
        &String::from_utf8_lossy(&out.stderr),
        &["bad.toml", "`train.schedule`", "`cosine`"],
    );
    std::fs::remove_dir_all(&dir).ok();
    let e = plan_error(&["no-equals-sign"]);
    assert_contains(&e, &["key=value"]);
}

#[test]
fn every_builtin_plugin_is_listed() {
    let out = xtask(&["list", "--json"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (family, names) in mor_models::builtin::EXPECTED {
        for name in names {
            let family_json = serde_json::to_value(family).unwrap();
            let hit = list
                .iter()
                .any(|e| e["family"] == family_json && e["name"] == *name);
            assert!(hit, "{family} `{name}` is not listed");
        }
    }
    let text = xtask(&["list"]);
    assert_contains(
        &String::from_utf8_lossy(&text.stdout),
        &[
            "sharing\n",
            "router\n",
            "kv_policy\n",
            "backend\n",
            "mor-router",
        ],
    );
    assert!(
        mor_models::builtin::missing().is_empty(),
        "{:?}",
        mor_models::builtin::missing()
    );
    assert_eq!(mor_models::builtin::link(), &mor_models::builtin::CRATES);
}

#[test]
fn real_plugins_resolve_every_paper_config() {
    for (name, ..) in ROWS {
        let c = Config::from_path(&root().join(format!("configs/paper/{name}.toml"))).unwrap();
        assert_eq!(c.model.seq_len, 2048, "{name}");
        assert_eq!(c.train.batch_seqs, 1024, "{name}");
        assert_eq!(
            c.recursion.sharing.kind,
            if name == "vanilla" {
                "none"
            } else {
                "middle_cycle"
            }
        );
        if let Some(r) = &c.router {
            // The validated parameters carry the router's defaults.
            assert!(!r.params.is_empty(), "{name}: {r:?}");
        }
    }
}

const ROUTER_KEYS: [&str; 8] = [
    "kind",
    "capacity",
    "alpha",
    "router_arch",
    "sampling",
    "router_func",
    "aux_coeff",
    "temperature",
];

fn router_value() -> impl Strategy<Value = toml::Value> {
    prop_oneof![
        prop::sample::select(vec![
            "expert_choice",
            "token_choice",
            "none",
            "linear",
            "mlp",
            "aux_router",
            "sigmoid",
            "auto",
            ""
        ])
        .prop_map(|s| toml::Value::String(s.to_string())),
        prop::sample::select(vec![-1.0, 0.0, 0.1, 0.5, 1.0, 2.0, f64::NAN])
            .prop_map(toml::Value::Float),
        prop::sample::select(vec![-1i64, 0, 1, 3]).prop_map(toml::Value::Integer),
        prop::collection::vec(prop::sample::select(vec![1.0, 0.7, 0.3, 0.0, 1.5]), 0..5)
            .prop_map(|v| toml::Value::Array(v.into_iter().map(toml::Value::Float).collect())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Resolution with the real plugins returns a config or a config error for any router
    /// parameters, never a panic.
    #[test]
    fn resolution_with_real_plugins_never_panics(
        sets in prop::collection::vec((0..ROUTER_KEYS.len(), router_value()), 0..5),
        n_r in 1i64..6,
    ) {
        let text = std::fs::read_to_string(root().join("configs/tiny.toml")).unwrap();
        let mut t = Config::parse_table(&text).unwrap();
        apply_override(&mut t, "recursion.num_recursions", n_r.into()).unwrap();
        for (k, v) in sets {
            apply_override(&mut t, &format!("router.{}", ROUTER_KEYS[k]), v).unwrap();
        }
        match Config::from_table(t) {
            Ok(c) => {
                let r = mor_core::accounting::report(&c).unwrap();
                prop_assert_eq!(r.steps, 20);
            }
            Err(Error::Config(p)) => prop_assert!(!p.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error: {other}"),
        }
    }
}
