//! KV sharing in vanilla models (spec §4: the paper shares K/V in Vanilla models with the
//! `Seq` and `Cyc` patterns and a loop count; spec §6.4 (d) gives the rows, spec §9 the keys
//! `kv.share_pattern` and `kv.share_loops`): config resolution and its errors, the plan
//! against the spec's layer mappings, the FLOPs and parameter accounting against closed
//! forms, and the paper configs of the table's vanilla rows.

use common::{Micro, VANILLA};
mod common;

use mor_core::config::{Config, ResolvedConfig};
use mor_core::plan::Segment;
use mor_models::MorModel;
use std::path::PathBuf;

fn link() {
    let _ = mor_models::builtin::link();
}

fn paper(name: &str) -> ResolvedConfig {
    link();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/paper")
        .join(format!("{name}.toml"));
    Config::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A small model of `layers` layers with `recursion` and `kv` sections.
fn small(layers: usize, recursion: &str, kv: &str, extra: &str) -> Result<ResolvedConfig, String> {
    link();
    Micro {
        runtime: "backend = { kind = \"reference\" }",
        tables: &format!("[recursion]\n{recursion}\n[kv]\n{kv}\n{extra}"),
        ..common::micro(64, 16, layers, 16)
    }
    .try_resolve()
}

fn shared(layers: usize, pattern: &str, loops: usize) -> ResolvedConfig {
    small(
        layers,
        VANILLA,
        &format!(
            "kind = \"recursive_sharing\"\nshare_pattern = \"{pattern}\"\nshare_loops = {loops}"
        ),
        "",
    )
    .unwrap_or_else(|e| panic!("{pattern}{loops}: {e}"))
}

/// The layer whose K/V layer `l` (0-based) of an `n`-layer vanilla model reads, written from
/// the spec's unique-layer mappings (spec §2) read as K/V mappings (spec §4), not from the
/// plan: Cycle `l mod (L/N)`, Sequence `⌊l/N⌋·N` (the first of each run of N),
/// Middle-Cycle `1 + (l−1) mod ((L−2)/N)`, Middle-Sequence `1 + ⌊(l−1)/N⌋·N`, the first
/// and last layers of the Middle patterns their own.
fn kv_source(pattern: &str, n: usize, loops: usize, l: usize) -> usize {
    let middle = pattern.starts_with("middle_");
    if middle && (l == 0 || l == n - 1) {
        return l;
    }
    match pattern {
        "cycle" => l % (n / loops),
        "seq" | "sequence" => l / loops * loops,
        "middle_cycle" => 1 + (l - 1) % ((n - 2) / loops),
        "middle_sequence" => 1 + (l - 1) / loops * loops,
        other => panic!("unknown pattern {other}"),
    }
}

/// The slot whose step-1 K/V the slot `s` of `cfg`'s plan reads under recursive sharing
/// (itself when it computes its own).
fn plan_source(cfg: &ResolvedConfig, s: usize) -> usize {
    match cfg.plan.slots[s].segment {
        Segment::Recursion { step, layer } if step >= 2 => cfg
            .plan
            .slots
            .iter()
            .position(|x| x.segment == Segment::Recursion { step: 1, layer })
            .expect("a step-1 slot of the same layer"),
        _ => s,
    }
}

/// The plan keeps every layer unique and labels the slots so that recursive sharing makes
/// each layer read exactly the K/V the spec's pattern gives it; `infer.max_depth` defaults
/// to the loop count (all labelled steps), and `num_recursions` stays 1.
#[test]
fn plans_follow_the_spec_mappings_with_unique_layers() {
    for (pattern, n, loops) in [
        ("cycle", 8, 2),
        ("cycle", 9, 3),
        ("seq", 8, 2),
        ("sequence", 8, 4),
        ("middle_cycle", 8, 3),
        ("middle_cycle", 8, 2),
        ("middle_sequence", 8, 2),
        ("middle_sequence", 11, 3),
    ] {
        let c = shared(n, pattern, loops);
        let p = &c.plan;
        assert_eq!(p.num_slots(), n, "{pattern}{loops}: layer count kept");
        assert_eq!(p.num_blocks, n, "{pattern}{loops}: every layer unique");
        let blocks: Vec<usize> = p.slots.iter().map(|s| s.block).collect();
        assert_eq!(blocks, (0..n).collect::<Vec<_>>(), "{pattern}{loops}");
        assert_eq!(p.num_recursions, loops);
        assert_eq!(c.recursion.num_recursions, 1);
        assert_eq!(
            c.infer.max_depth, loops,
            "{pattern}{loops}: infer.max_depth"
        );
        assert!(c.router.is_none());
        for s in 0..n {
            assert_eq!(
                plan_source(&c, s),
                kv_source(pattern, n, loops, s),
                "{pattern}{loops}: layer {s}"
            );
        }
        // Shared layers: every layer but the one per group that computes.
        let sharing = (0..n)
            .filter(|&l| kv_source(pattern, n, loops, l) != l)
            .count();
        let grouped = if pattern.starts_with("middle_") {
            n - 2
        } else {
            n
        };
        assert_eq!(sharing, grouped - grouped / loops, "{pattern}{loops}");
    }
}

/// Spec §1.4: a KV-sharing layer projects no K/V (`2d²` instead of `4d²`) and, with every
/// token active, attends over the same `L(L+1)/2` pairs, so the FLOPs per token drop by
/// exactly `4d²` per sharing layer; the parameters by its K/V projections,
/// `2·d·hkv·dh`. The model lists exactly the counted parameters (the K/V projections of
/// sharing layers are not parameters), and the memory estimate counts the same.
#[test]
fn accounting_saves_exactly_the_kv_projections_of_sharing_layers() {
    let plain = small(8, VANILLA, "kind = \"recursion_wise\"", "").unwrap();
    let base = mor_core::accounting::report(&plain).unwrap();
    for (pattern, loops) in [("cycle", 2), ("seq", 4), ("middle_cycle", 3)] {
        let c = shared(8, pattern, loops);
        let r = mor_core::accounting::report(&c).unwrap();
        let m = &c.model;
        let (d, kvd) = (m.hidden_size as f64, (m.num_kv_heads * m.head_dim) as u64);
        let n_shared = (0..8)
            .filter(|&l| kv_source(pattern, 8, loops, l) != l)
            .count();
        assert!(n_shared > 0);
        assert!(r.kv_sharing);
        assert_eq!(
            base.flops_per_token - r.flops_per_token,
            n_shared as f64 * 4.0 * d * d,
            "{pattern}{loops}"
        );
        assert_eq!(
            base.non_embedding_params - r.non_embedding_params,
            n_shared as u64 * 2 * m.hidden_size as u64 * kvd,
            "{pattern}{loops}"
        );
        assert_eq!(
            base.memory.parameters - r.memory.parameters,
            4 * n_shared as u64 * 2 * m.hidden_size as u64 * kvd,
            "{pattern}{loops}: memory estimate"
        );
        let model = MorModel::new(&c).unwrap();
        let vars = model.named_vars();
        let total: usize = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        assert_eq!(
            total as u64,
            r.non_embedding_params + r.embedding_params,
            "{pattern}{loops}"
        );
        for l in 0..8 {
            let listed = vars
                .iter()
                .any(|(n, _)| n == &format!("model.layers.{l}.self_attn.k_proj.weight"));
            assert_eq!(
                listed,
                kv_source(pattern, 8, loops, l) == l,
                "{pattern}{loops}: k_proj of layer {l}"
            );
        }
    }
}

/// The configs of the vanilla rows of spec §6.4 (d) (360M, 10B tokens): 32 layers with
/// Seq2 and Cyc2, 30 layers with Seq3 and Cyc3. Closed forms against the vanilla 360M
/// numbers (833,679,360 FLOPs per token for 32 layers, spec §1.3/§1.4): each sharing layer
/// saves `4d² = 3,686,400` FLOPs per token and `2·d·hkv·dh = 614,400` parameters.
#[test]
fn paper_vanilla_kv_sharing_rows() {
    let vanilla = mor_core::accounting::report(&paper("vanilla")).unwrap();
    assert_eq!(vanilla.flops_per_token, 833_679_360.0);
    let per_layer_flops = 2.0 * (4.0 * 960.0 * 960.0 + 3.0 * 960.0 * 2560.0) * 2048.0
        + 2.0 * 2.0 * 960.0 * 2048.0 * 2049.0 / 2.0;
    let per_layer_params = 2 * 960 * 960 + 2 * 960 * 320 + 3 * 960 * 2560 + 2 * 960;
    assert_eq!(vanilla.non_embedding_params, 32 * per_layer_params + 960);
    for (name, pattern, layers, loops) in [
        ("vanilla_kvshare_cyc2", "cycle", 32usize, 2usize),
        ("vanilla_kvshare_seq2", "seq", 32, 2),
        ("vanilla_kvshare_cyc3", "cycle", 30, 3),
        ("vanilla_kvshare_seq3", "seq", 30, 3),
    ] {
        let c = paper(name);
        let r = mor_core::accounting::report(&c).unwrap();
        assert_eq!(c.plan.num_slots(), layers, "{name}");
        assert_eq!(c.plan.num_blocks, layers, "{name}");
        assert_eq!(c.plan.num_recursions, loops, "{name}");
        for s in 0..layers {
            assert_eq!(
                plan_source(&c, s),
                kv_source(pattern, layers, loops, s),
                "{name}"
            );
        }
        let n_shared = layers - layers / loops;
        let flops = layers as f64 * per_layer_flops / 2048.0 - n_shared as f64 * 3_686_400.0;
        assert_eq!(r.flops_per_token, flops, "{name}");
        assert_eq!(
            r.non_embedding_params,
            layers as u64 * per_layer_params + 960 - n_shared as u64 * 614_400,
            "{name}"
        );
        // 10B-token ablation: int(10e9 / (1024·2048)) = 4768 steps (spec §1.3).
        assert_eq!(r.steps, 4768, "{name}");
        assert!(r.kv_sharing, "{name}");
    }
    // Cyc2 on 32 layers: 16 sharing layers.
    let cyc2 = mor_core::accounting::report(&paper("vanilla_kvshare_cyc2")).unwrap();
    assert_eq!(cyc2.flops_per_token, 774_696_960.0);
    assert_eq!(cyc2.non_embedding_params, 304_804_800);
}

/// Combinations that make no sense are refused at resolution with the field, the value and
/// what is allowed.
#[test]
fn bad_combinations_name_the_field_and_the_allowed_values() {
    let kv = |extra: &str| format!("kind = \"recursive_sharing\"\n{extra}");
    let cases: Vec<(String, &str, String, &[&str])> = vec![
        // A recursive model shares along its own plan.
        (
            "num_recursions = 2\nsharing = { kind = \"middle_cycle\" }".into(),
            "",
            kv("share_pattern = \"cycle\"\nshare_loops = 2"),
            &["kv.share_pattern", "vanilla models only", "middle_cycle"],
        ),
        // A policy that does not share K/V.
        (
            VANILLA.into(),
            "",
            "kind = \"recursion_wise\"\nshare_pattern = \"cycle\"\nshare_loops = 2".into(),
            &["kv.kind", "\"recursion_wise\"", "`recursive_sharing`"],
        ),
        (
            VANILLA.into(),
            "",
            "kind = \"hybrid\"\nshare_pattern = \"seq\"\nshare_loops = 2".into(),
            &["kv.kind", "\"hybrid\"", "`recursive_sharing`"],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"zigzag\"\nshare_loops = 2"),
            &[
                "kv.share_pattern",
                "\"zigzag\"",
                "`seq`",
                "`cycle`",
                "`middle_cycle`",
            ],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = 2\nshare_loops = 2"),
            &["kv.share_pattern", "`seq`"],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"cycle\""),
            &[
                "kv.share_loops",
                "(missing)",
                "required with kv.share_pattern",
            ],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_loops = 2"),
            &["kv.share_loops", "set only together with kv.share_pattern"],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"cycle\"\nshare_loops = 1"),
            &["kv.share_loops", "an integer in 2..=num_layers"],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"cycle\"\nshare_loops = \"two\""),
            &["kv.share_loops", "\"two\"", "an integer in 2..=num_layers"],
        ),
        // 8 layers do not divide by 3; the Middle patterns group 8 − 2 = 6, not by 4.
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"seq\"\nshare_loops = 3"),
            &["kv.share_loops", "a divisor of num_layers = 8"],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"middle_cycle\"\nshare_loops = 4"),
            &["kv.share_loops", "a divisor of num_layers − 2 = 6"],
        ),
        (
            VANILLA.into(),
            "",
            kv("share_pattern = \"cycle\"\nshare_loops = 16"),
            &["kv.share_loops", "16", "a divisor of num_layers = 8"],
        ),
        // Every layer of a vanilla model runs: no test-time depth below the loop count.
        (
            VANILLA.into(),
            "[infer]\nmax_depth = 1",
            kv("share_pattern = \"cycle\"\nshare_loops = 2"),
            &["infer.max_depth", "\"n_r\" or 2", "would skip layers"],
        ),
        // A router needs a recursive model.
        (
            VANILLA.into(),
            "[router]\nkind = \"expert_choice\"",
            kv("share_pattern = \"cycle\"\nshare_loops = 2"),
            &["recursion.num_recursions", "router `expert_choice`"],
        ),
    ];
    for (recursion, extra, kv, needles) in cases {
        let err = small(8, &recursion, &kv, extra)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{recursion}\n{kv}\n{extra}"));
        for n in needles {
            assert!(err.contains(n), "missing {n:?} in: {err}\n({kv})");
        }
    }
    // `auto` means unset, and a vanilla model without a pattern is unchanged.
    let auto = small(
        8,
        VANILLA,
        "kind = \"recursive_sharing\"\nshare_pattern = \"auto\"\nshare_loops = \"auto\"",
        "",
    )
    .unwrap();
    assert_eq!(auto.plan.num_recursions, 1);
    assert_eq!(auto.infer.max_depth, 1);
    assert!(auto.recursion.kv_share.is_none());
    // The loop count is accepted as max_depth, and the config round-trips through its TOML.
    let c = small(
        8,
        VANILLA,
        &kv("share_pattern = \"middle_cycle\"\nshare_loops = 3"),
        "[infer]\nmax_depth = 3",
    )
    .unwrap();
    assert_eq!(c.infer.max_depth, 3);
    let again = Config::from_toml_str(&c.to_toml_string()).unwrap();
    assert_eq!(again.plan, c.plan);
    assert_eq!(again.recursion, c.recursion);
}
