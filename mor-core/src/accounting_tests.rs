//! Accounting tests: the released numbers of spec §1.3 and §1.4, parameter counts of spec
//! §1.1 and §2, and a naive per-query FLOPs count.

use super::*;
use crate::plan::{DepthFix, PlanRequest};
use proptest::prelude::*;

const BUDGET: f64 = 16.5e18;
const TOKENS_PER_STEP: u64 = 1024 * 2048;

fn plan(name: &str, layers: usize, n_r: usize) -> RecursionPlan {
    crate::sharing::plan(
        name,
        &toml::Table::new(),
        &PlanRequest {
            num_layers: layers,
            num_recursions: n_r,
            depth_fix: DepthFix::AddLayers,
        },
    )
    .unwrap()
}

fn caps(n_r: usize) -> AccountingHints {
    // The default expert-choice schedule cap_r = (N_r − r + 1)/N_r (spec §3.1).
    AccountingHints {
        capacities: Some(
            (1..=n_r)
                .map(|r| (n_r - r + 1) as f64 / n_r as f64)
                .collect(),
        ),
        kv_sharing: false,
        kv_full_context: false,
    }
}

/// (plan, hints, released steps) for each row of spec §1.3.
fn paper_rows() -> Vec<(&'static str, RecursionPlan, AccountingHints, u64)> {
    let mut kv = caps(3);
    kv.kv_sharing = true;
    vec![
        (
            "vanilla",
            plan("none", 32, 1),
            AccountingHints::default(),
            9438,
        ),
        (
            "recursive N_r=2",
            plan("middle_cycle", 32, 2),
            AccountingHints::default(),
            9438,
        ),
        (
            "recursive N_r=3",
            plan("middle_cycle", 32, 3),
            AccountingHints::default(),
            9438,
        ),
        (
            "recursive N_r=4",
            plan("middle_cycle", 32, 4),
            AccountingHints::default(),
            8883,
        ),
        ("MoR-E N_r=2", plan("middle_cycle", 32, 2), caps(2), 12619),
        ("MoR-E N_r=3", plan("middle_cycle", 32, 3), caps(3), 14161),
        ("MoR-E N_r=4", plan("middle_cycle", 32, 4), caps(4), 14216),
        (
            "MoR-E N_r=3 KV share",
            plan("middle_cycle", 32, 3),
            kv,
            14672,
        ),
    ]
}

#[test]
fn vanilla_360m_flops_per_token_is_exact() {
    // 32 · (2·(4·960² + 3·960·2560) + 2·2·960·2049/2) = 833,679,360 (spec §1.4).
    let dims = ModelDims::smollm_360m();
    let f = flops_per_token(&dims, &plan("none", 32, 1), &AccountingHints::default()).unwrap();
    assert_eq!(f, 833_679_360.0);
    // Forward-only budget: 16.5e18 / f = 19.79B tokens, 9437.5 → 9438 steps.
    assert_eq!(
        budget_steps(Budget::Flops(BUDGET), f, TOKENS_PER_STEP).unwrap(),
        9438
    );
    // A forward+backward (3×) count would give a third of the released steps.
    assert_eq!(
        budget_steps(Budget::Flops(BUDGET), 3.0 * f, TOKENS_PER_STEP).unwrap(),
        3146
    );
}

#[test]
fn released_step_counts_within_0_05_percent() {
    let dims = ModelDims::smollm_360m();
    // Residuals of this rule against the released configs (spec §1.4).
    let expected_ours = [9438, 9438, 9438, 8883, 12618, 14163, 14215, 14674];
    for ((name, plan, hints, released), ours) in paper_rows().into_iter().zip(expected_ours) {
        let f = flops_per_token(&dims, &plan, &hints).unwrap();
        let steps = budget_steps(Budget::Flops(BUDGET), f, TOKENS_PER_STEP).unwrap();
        assert_eq!(steps, ours, "{name}");
        let rel = (steps as f64 - released as f64).abs() / released as f64;
        assert!(
            rel < 5e-4,
            "{name}: {steps} vs released {released} ({:.4}%)",
            rel * 100.0
        );
    }
}

#[test]
fn table_3_flops_of_fixed_token_runs() {
    // Spec §6.1: MoR at 20B tokens (9438 steps) costs 12.3 / 11.0 / 11.0 e18 FLOPs.
    let dims = ModelDims::smollm_360m();
    for (n_r, expected) in [(2, 12.3e18), (3, 11.0e18), (4, 11.0e18)] {
        let f = flops_per_token(&dims, &plan("middle_cycle", 32, n_r), &caps(n_r)).unwrap();
        let flops = f * 9438.0 * TOKENS_PER_STEP as f64;
        assert_eq!(
            (flops / 1e17).round() as u64,
            (expected / 1e17_f64).round() as u64,
            "N_r={n_r}: {flops:e}"
        );
    }
}

#[test]
fn paper_parameter_counts() {
    let dims = ModelDims::smollm_360m();
    let m = |x: u64| (x as f64 / 1e6).round() as u64;
    let rows = [
        ("none", 1, 315),
        ("middle_cycle", 2, 167),
        ("middle_cycle", 3, 118),
        ("middle_cycle", 4, 98),
    ];
    for (name, n_r, millions) in rows {
        let c = param_counts(&dims, &plan(name, 32, n_r), true);
        assert_eq!(
            m(c.non_embedding),
            millions,
            "{name} N_r={n_r}: {}",
            c.non_embedding
        );
        assert_eq!(c.embedding, 49_152 * 960);
    }
    // Per block: q,o 960·960 each, k,v 960·320 each, MLP 3·960·2560, two norms 2·960.
    let c = param_counts(&dims, &plan("none", 32, 1), true);
    assert_eq!(
        c.non_embedding,
        32 * (2 * 921_600 + 2 * 307_200 + 7_372_800 + 1_920) + 960
    );
    // Spec §1.1 and §6.3: 135M 106M / 42M (1+10+1), 730M 654M / 252M, 1.7B 1.61B / 0.67B.
    let other = [
        (ModelDims::smollm_135m(), "none", 1, 106.0, 1e6),
        (ModelDims::smollm_135m(), "middle_cycle", 3, 42.0, 1e6),
        (ModelDims::mor_730m(), "none", 1, 654.0, 1e6),
        (ModelDims::mor_730m(), "middle_cycle", 3, 252.0, 1e6),
        (ModelDims::smollm_1_7b(), "none", 1, 1.61, 1e9),
        (ModelDims::smollm_1_7b(), "middle_cycle", 3, 0.67, 1e9),
    ];
    for (d, name, n_r, expected, unit) in other {
        let c = param_counts(&d, &plan(name, d.num_layers, n_r), true);
        let digits = if unit == 1e9 { 100.0 } else { 1.0 };
        assert_eq!(
            (c.non_embedding as f64 / unit * digits).round() / digits,
            expected,
            "{name} {d:?}"
        );
    }
}

#[test]
fn unshared_norms_and_untied_head() {
    let mut dims = ModelDims::micro();
    let p = plan("middle_cycle", 4, 2); // 1 + 1×2 + 1 = 4 slots, 3 blocks
    let shared = param_counts(&dims, &p, true);
    let unshared = param_counts(&dims, &p, false);
    let (slots, blocks) = (p.num_slots() as u64, p.num_blocks as u64);
    assert_eq!((slots, blocks), (4, 3));
    assert_eq!(
        unshared.non_embedding - shared.non_embedding,
        (slots - blocks) * 2 * 64
    );
    assert_eq!(shared.embedding, 512 * 64);
    dims.tie_embeddings = false;
    assert_eq!(param_counts(&dims, &p, true).embedding, 2 * 512 * 64);
}

#[test]
fn budgets_warmup_and_active_tokens() {
    // Spec §1.3: 10B-token ablations use int(10e9/(1024·2048)) = 4768 steps.
    assert_eq!(
        budget_steps(Budget::Tokens(10e9), 1.0, TOKENS_PER_STEP).unwrap(),
        4768
    );
    assert_eq!(
        budget_steps(Budget::Steps(7), 1.0, TOKENS_PER_STEP).unwrap(),
        7
    );
    assert_eq!(
        budget_steps(Budget::Tokens(1.0), 1.0, TOKENS_PER_STEP).unwrap(),
        1
    );
    assert!(budget_steps(Budget::Flops(1e300), 1.0, 1).is_err());
    // Spec §1.3: warmup is 5% of the 2e18 budget's steps: 57 for vanilla, 86 for MoR N_r=3.
    let dims = ModelDims::smollm_360m();
    let rows = paper_rows();
    let f_van = flops_per_token(&dims, &rows[0].1, &rows[0].2).unwrap();
    let f_mor = flops_per_token(&dims, &rows[5].1, &rows[5].2).unwrap();
    assert_eq!(auto_warmup(9438, Some(2e18), f_van, TOKENS_PER_STEP), 57);
    assert_eq!(auto_warmup(14163, Some(2e18), f_mor, TOKENS_PER_STEP), 86);
    assert_eq!(auto_warmup(200, None, f_mor, TOKENS_PER_STEP), 10);
    // Spec §3.1: k = 2048, 1365, 682 for N_r = 3; max(1, ·) for tiny capacities.
    assert_eq!(
        step_tokens(&caps(3), 3, 2048).unwrap(),
        vec![2048, 1365, 682]
    );
    assert_eq!(
        step_tokens(&caps(4), 4, 2048).unwrap(),
        vec![2048, 1536, 1024, 512]
    );
    assert_eq!(active_tokens(1e-9, 2048), 1);
    assert!(step_tokens(&caps(3), 4, 2048)
        .unwrap_err()
        .contains("3 capacities for 4"));
    let bad = AccountingHints {
        capacities: Some(vec![1.0, 1.5]),
        ..Default::default()
    };
    assert!(step_tokens(&bad, 2, 16)
        .unwrap_err()
        .contains("outside (0, 1]"));
}

/// FLOPs of one sequence counted query by query: query i (1-based) of a causal layer with
/// k active tokens sees i keys; QKᵀ and AV each cost 2·d_a per key. With KV sharing a query
/// sees, on average, the (L+1)/2 keys of the full step-1 context.
fn naive_flops_per_token(
    dims: &ModelDims,
    plan: &RecursionPlan,
    caps: Option<&[f64]>,
    kv_sharing: bool,
) -> f64 {
    let (d, di, da, l) = (
        dims.hidden_size as f64,
        dims.intermediate_size as f64,
        (dims.num_heads * dims.head_dim) as f64,
        dims.seq_len,
    );
    let mut total = 0.0;
    for slot in &plan.slots {
        let (k, step) = match slot.segment {
            Segment::Recursion { step, .. } => {
                let cap = caps.map_or(1.0, |c| c[step - 1]);
                (((cap * l as f64) + 1e-9).floor().max(1.0) as usize, step)
            }
            _ => (l, 0),
        };
        let shared = kv_sharing && step >= 2;
        let params = if shared { 2.0 * d * d } else { 4.0 * d * d } + 3.0 * d * di;
        for i in 1..=k {
            total += 2.0 * params;
            let keys = if shared {
                (l as f64 + 1.0) / 2.0
            } else {
                i as f64
            };
            total += 2.0 * 2.0 * da * keys;
        }
    }
    total / l as f64
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn flops_match_naive_count(
        layers in 3usize..12,
        n_r in 1usize..4,
        seq_len in 1usize..40,
        routed in any::<bool>(),
        kv_sharing in any::<bool>(),
        raw_caps in proptest::collection::vec(0.01f64..=1.0, 4),
    ) {
        prop_assume!(n_r <= layers - 2);
        let dims = ModelDims { seq_len, ..ModelDims::micro() };
        let p = plan("middle_cycle", layers, n_r);
        let caps: Vec<f64> = raw_caps[..n_r].to_vec();
        let hints = AccountingHints { capacities: routed.then(|| caps.clone()), kv_sharing, ..Default::default() };
        let ours = flops_per_token(&dims, &p, &hints).unwrap();
        let naive = naive_flops_per_token(&dims, &p, routed.then_some(&caps[..]), kv_sharing);
        prop_assert!((ours - naive).abs() <= 1e-9 * naive, "{} vs {}", ours, naive);
    }
}

/// Hybrid sharing (spec §4) projects K/V at every step like recursion-wise caching, and its
/// step-r queries read the full step-1 context like sharing: counted query by query, its
/// FLOPs are the recursion-wise linear terms plus the sharing attention terms.
#[test]
fn hybrid_counts_full_context_attention_with_own_projections() {
    let dims = ModelDims::smollm_360m();
    let p = plan("middle_cycle", 32, 3);
    let hybrid = AccountingHints {
        kv_full_context: true,
        ..caps(3)
    };
    let ours = flops_per_token(&dims, &p, &hybrid).unwrap();
    // Query by query: every slot projects q/k/v/o (4d²); a step >= 2 query sees (L+1)/2
    // keys on average, a step-1, prelude or coda query i sees i keys.
    let (d, di, da, l) = (960.0, 2560.0, 960.0, 2048usize);
    let mut naive = 0.0;
    for slot in &p.slots {
        let (k, step) = match slot.segment {
            Segment::Recursion { step, .. } => ([2048, 1365, 682][step - 1], step),
            _ => (l, 0),
        };
        for i in 1..=k {
            naive += 2.0 * (4.0 * d * d + 3.0 * d * di);
            let keys = if step >= 2 {
                (l as f64 + 1.0) / 2.0
            } else {
                i as f64
            };
            naive += 2.0 * 2.0 * da * keys;
        }
    }
    naive /= l as f64;
    assert!((ours - naive).abs() <= 1e-12 * naive, "{ours} vs {naive}");
    // Between recursion-wise (fewer keys) and sharing (fewer projections... but the same
    // keys): recursion-wise < hybrid, and hybrid − sharing = the K/V projections of the 20
    // step >= 2 slots, 2·2d²·k_r per token of those slots.
    let rw = flops_per_token(&dims, &p, &caps(3)).unwrap();
    let share = flops_per_token(
        &dims,
        &p,
        &AccountingHints {
            kv_sharing: true,
            ..caps(3)
        },
    )
    .unwrap();
    assert!(rw < ours, "{rw} vs {ours}");
    let kv_proj = 10.0 * 2.0 * 2.0 * d * d * (1365.0 + 682.0) / l as f64;
    assert!(((ours - share) - kv_proj).abs() <= 1e-9 * ours);
    // The hybrid attention the old rule left out: 2.3% of the total here.
    let missing = (ours - rw) / ours;
    assert!((0.02..0.035).contains(&missing), "{missing}");
    // `kv_sharing` implies the full context.
    let both = AccountingHints {
        kv_sharing: true,
        kv_full_context: true,
        ..caps(3)
    };
    assert_eq!(flops_per_token(&dims, &p, &both).unwrap(), share);
}

#[test]
fn router_parameter_counts() {
    let dims = ModelDims::micro(); // d = 64
    let spec = |kind: &str, params: &str| PluginSpec {
        kind: kind.into(),
        params: params.parse().unwrap(),
    };
    assert_eq!(router_params(&dims, 3, None), 0);
    assert_eq!(
        router_params(&dims, 3, Some(&spec("expert_choice", ""))),
        3 * 64
    );
    assert_eq!(
        router_params(
            &dims,
            3,
            Some(&spec("token_choice", "router_arch = \"linear\""))
        ),
        64 * 3
    );
    assert_eq!(
        router_params(
            &dims,
            3,
            Some(&spec("expert_choice", "router_arch = \"mlp\""))
        ),
        3 * (64 * 128 + 128)
    );
    assert_eq!(
        router_params(
            &dims,
            2,
            Some(&spec(
                "token_choice",
                "router_arch = \"wide_mlp\"\nwide_mult = 4"
            ))
        ),
        64 * 256 + 256 * 2
    );
    assert_eq!(
        router_params(
            &dims,
            3,
            Some(&spec("expert_choice", "sampling = \"aux_router\""))
        ),
        2 * 3 * 64
    );
}

#[test]
fn relaxation_parameter_and_flop_counts() {
    // 360M dims, middle_cycle N_r = 3 of 32 layers: 10 blocks per step, 30 recursion slots.
    let dims = ModelDims::smollm_360m();
    let p = plan("middle_cycle", 32, 3);
    let slots = p
        .slots
        .iter()
        .filter(|s| matches!(s.segment, Segment::Recursion { .. }))
        .count() as u64;
    assert_eq!(slots, 30);
    let (d, q, kv) = (960u64, 15 * 64, 5 * 64);
    assert_eq!(
        (
            dims.hidden_size as u64,
            (dims.num_heads * dims.head_dim) as u64
        ),
        (d, q)
    );
    assert_eq!((dims.num_kv_heads * dims.head_dim) as u64, kv);
    assert_eq!(relaxation_params(&dims, &p, None, false), 0);
    let enc = Relaxation::RecursionEncoding;
    assert_eq!(relaxation_params(&dims, &p, Some(&enc), false), 3 * 960);
    let lora = |targets: &[&str]| Relaxation::Lora {
        rank: 64,
        alpha: 64.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    };
    // q_proj: 960 → 960; v_proj: 960 → 320; 64 · (in + out) each, per slot.
    let qv = lora(&["q_proj", "v_proj"]);
    let per_slot = 64 * ((d + q) + (d + kv));
    assert_eq!(per_slot, 64 * (1920 + 1280));
    assert_eq!(
        relaxation_params(&dims, &p, Some(&qv), false),
        30 * per_slot
    );
    // Under KV sharing the 20 slots of steps 2 and 3 have no v_proj adapter.
    assert_eq!(
        relaxation_params(&dims, &p, Some(&qv), true),
        30 * 64 * (d + q) + 10 * 64 * (d + kv)
    );
    let o = lora(&["o_proj"]);
    assert_eq!(
        relaxation_params(&dims, &p, Some(&o), false),
        30 * 64 * (q + d)
    );
    // FLOPs: 2 · rank · (in + out) per active token of each recursion slot; without a
    // router every token runs every slot.
    let all = AccountingHints {
        capacities: None,
        kv_sharing: false,
        kv_full_context: false,
    };
    let f = relaxation_flops_per_token(&dims, &p, &all, Some(&qv)).unwrap();
    assert_eq!(f, (30 * 2 * per_slot) as f64);
    assert_eq!(
        relaxation_flops_per_token(&dims, &p, &all, Some(&enc)).unwrap(),
        0.0
    );
    // Expert choice with capacities 1, 2/3, 1/3 of L = 2048: k = 2048, 1365, 683 (rounded
    // as `active_tokens` does), each of the 10 slots of a step.
    let h = caps(3);
    let k: Vec<u64> = (1..=3)
        .map(|r| active_tokens((4 - r) as f64 / 3.0, 2048) as u64)
        .collect();
    let expect = (2 * per_slot * 10 * k.iter().sum::<u64>()) as f64 / 2048.0;
    let f = relaxation_flops_per_token(&dims, &p, &h, Some(&qv)).unwrap();
    assert!((f - expect).abs() <= 1e-9 * expect, "{f} vs {expect}");
}

#[test]
fn dora_and_adaption_prompt_parameter_and_flop_counts() {
    // 360M dims, middle_cycle N_r = 3 of 32 layers: 30 recursion slots, 10 per step.
    let dims = ModelDims::smollm_360m();
    let p = plan("middle_cycle", 32, 3);
    let (d, q, kv) = (960u64, 15 * 64, 5 * 64);
    let targets: Vec<String> = ["q_proj", "v_proj"].iter().map(|t| t.to_string()).collect();
    let lora = Relaxation::Lora {
        rank: 64,
        alpha: 64.0,
        targets: targets.clone(),
    };
    let dora = Relaxation::Dora {
        rank: 64,
        alpha: 64.0,
        targets,
    };
    // DoRA = LoRA + one magnitude per output row (q: 960, v: 320) per slot.
    let lora_slot = 64 * ((d + q) + (d + kv));
    assert_eq!(
        relaxation_params(&dims, &p, Some(&dora), false),
        30 * (lora_slot + q + kv)
    );
    assert_eq!(
        relaxation_params(&dims, &p, Some(&dora), false)
            - relaxation_params(&dims, &p, Some(&lora), false),
        30 * (960 + 320)
    );
    // KV sharing: no v_proj adapter (nor its magnitude) at the 20 slots of steps 2 and 3.
    assert_eq!(
        relaxation_params(&dims, &p, Some(&dora), true),
        30 * (64 * (d + q) + q) + 10 * (64 * (d + kv) + kv)
    );
    // Adaption prompt of P = 10: a [10, 960] prefix and 15 head gates per slot.
    let ap = Relaxation::AdaptionPrompt { prompt_len: 10 };
    assert_eq!(
        relaxation_params(&dims, &p, Some(&ap), false),
        30 * (10 * 960 + 15)
    );
    assert_eq!(
        relaxation_params(&dims, &p, Some(&ap), true),
        30 * (10 * 960 + 15)
    );
    let all = AccountingHints {
        capacities: None,
        kv_sharing: false,
        kv_full_context: false,
    };
    // DoRA: LoRA's products plus one multiply per output.
    assert_eq!(
        relaxation_flops_per_token(&dims, &p, &all, Some(&dora)).unwrap(),
        (30 * (2 * lora_slot + q + kv)) as f64
    );
    // Adaption prompt: every query scores P prefix keys and weighs P values, per head:
    // 2 · 2 · d_a · P per token and slot.
    assert_eq!(
        relaxation_flops_per_token(&dims, &p, &all, Some(&ap)).unwrap(),
        (30 * 2 * 2 * q * 10) as f64
    );
    // Expert choice: only the k_r active tokens of a step pay.
    let h = caps(3);
    let k: u64 = (1..=3)
        .map(|r| active_tokens((4 - r) as f64 / 3.0, 2048) as u64)
        .sum();
    let expect = (2 * 2 * q * 10 * 10 * k) as f64 / 2048.0;
    let f = relaxation_flops_per_token(&dims, &p, &h, Some(&ap)).unwrap();
    assert!((f - expect).abs() <= 1e-9 * expect, "{f} vs {expect}");
}
