//! A naive per-token reference of the Mixture-of-Recursions forward (plain loops over
//! tokens, no gather/scatter, no batching tricks), written separately from the model, that
//! the fast path must match on random inputs under every KV policy and both routers
//! (spec §3.1 pseudocode, §3.2, §4).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{rmsnorm, rope, Micro, MOR_RECURSION, VANILLA};
use mor_core::config::ResolvedConfig;
use mor_core::plan::Segment;
use mor_models::MorModel;
use mor_router::RouteMode;
use std::collections::HashMap;

struct W {
    t: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl W {
    fn get(&self, n: &str) -> &(Vec<usize>, Vec<f64>) {
        self.t.get(n).unwrap_or_else(|| panic!("no tensor {n}"))
    }
}

/// `y = W x` for `W: [out, in]`.
fn matvec(w: &(Vec<usize>, Vec<f64>), x: &[f64]) -> Vec<f64> {
    let (o, i) = (w.0[0], w.0[1]);
    (0..o)
        .map(|r| (0..i).map(|c| w.1[r * i + c] * x[c]).sum())
        .collect()
}

struct Dims {
    hq: usize,
    hkv: usize,
    dh: usize,
    eps: f64,
    theta: f64,
}

/// Per-token K/V of one layer (RoPE applied): (pos, k [hkv*dh], v [hkv*dh]).
type Kv = Vec<(usize, Vec<f64>, Vec<f64>)>;

/// A model's weights read once as f64 and its dimensions: what the naive references below
/// compute with (embedding, norms, layers, LM head), never the model's own forward.
struct Naive {
    w: W,
    dims: Dims,
    d: usize,
    vocab: usize,
    emb: Vec<f64>,
}

impl Naive {
    fn of(model: &MorModel) -> Naive {
        let m = &model.config().model;
        let mut w = W { t: HashMap::new() };
        for (n, v) in model.named_vars() {
            let t = v.as_tensor();
            w.t.insert(
                n,
                (
                    t.dims().to_vec(),
                    t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                ),
            );
        }
        let emb = w.get("model.embed_tokens.weight").1.clone();
        Naive {
            w,
            dims: Dims {
                hq: m.num_heads,
                hkv: m.num_kv_heads,
                dh: m.head_dim,
                eps: m.rms_eps,
                theta: m.rope_theta,
            },
            d: m.hidden_size,
            vocab: m.vocab_size,
            emb,
        }
    }

    /// The embeddings of one row of ids.
    fn embed(&self, row: &[u32]) -> Vec<Vec<f64>> {
        let d = self.d;
        row.iter()
            .map(|&id| self.emb[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect()
    }

    /// Block `b` on the tokens `xs` (position, hidden): its two norms' weights read here.
    fn block(
        &self,
        b: usize,
        xs: &[(usize, Vec<f64>)],
        project: bool,
        kv_for: &dyn Fn(&Kv) -> Kv,
    ) -> (Vec<Vec<f64>>, Kv) {
        let norm = |n: &str| {
            self.w
                .get(&format!("model.layers.{b}.{n}.weight"))
                .1
                .clone()
        };
        let (a, n2) = (norm("input_layernorm"), norm("post_attention_layernorm"));
        layer(
            &self.w,
            &format!("model.layers.{b}"),
            (&a, &n2),
            xs,
            &self.dims,
            project,
            kv_for,
        )
    }

    /// Block `b` on every token of `h` (positions 0, 1, …).
    fn block_all(
        &self,
        b: usize,
        h: &[Vec<f64>],
        project: bool,
        kv_for: &dyn Fn(&Kv) -> Kv,
    ) -> (Vec<Vec<f64>>, Kv) {
        let xs: Vec<(usize, Vec<f64>)> = h.iter().cloned().enumerate().collect();
        self.block(b, &xs, project, kv_for)
    }

    /// Final norm and the tied LM head: the logits of every token of `h`.
    fn logits(&self, h: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let fw = &self.w.get("model.norm.weight").1;
        let d = self.d;
        h.iter()
            .map(|x| {
                let n = rmsnorm(x, fw, self.dims.eps);
                (0..self.vocab)
                    .map(|v| (0..d).map(|c| n[c] * self.emb[v * d + c]).sum())
                    .collect()
            })
            .collect()
    }
}

/// Hybrid K/V: the step-1 entries `base` with every position that has a fresh entry
/// overwritten by it.
fn overwrite(mut base: Kv, fresh: &Kv) -> Kv {
    for f in fresh {
        if let Some(e) = base.iter_mut().find(|e| e.0 == f.0) {
            *e = f.clone();
        }
    }
    base
}

/// The largest `|a − b|` over two sets of logits.
fn max_abs_diff(a: &[Vec<Vec<f64>>], b: &[Vec<Vec<f64>>]) -> f64 {
    let n = |x: &[Vec<Vec<f64>>]| x.iter().flatten().flatten().count();
    assert_eq!(n(a), n(b), "logits of different sizes");
    a.iter()
        .flatten()
        .flatten()
        .zip(b.iter().flatten().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max)
}

/// An f64 CPU model of `cfg` and its logits on `x` (the fast path under test).
fn f64_logits(cfg: &ResolvedConfig, x: &Tensor) -> (MorModel, Vec<Vec<Vec<f64>>>) {
    let model = MorModel::new_with(cfg, DType::F64, Device::Cpu).unwrap();
    let out = model.forward(x, RouteMode::Train).unwrap();
    let logits = out.logits.to_vec3::<f64>().unwrap();
    (model, logits)
}

/// `b` rows of `t` random ids below 64 from `seed`, and the same as a `[b, t]` tensor.
fn random_rows(seed: u64, b: usize, t: usize) -> (Vec<Vec<u32>>, Tensor) {
    let flat = common::random_ids(b * t, 64, seed);
    let rows = flat.chunks(t).map(<[u32]>::to_vec).collect();
    let x = Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap();
    (rows, x)
}

/// A micro model of `layers` layers (d = 16, 64 ids, context 16) on `backend` with `seed`;
/// `tables`: its `[recursion]`, `[router]` and `[kv]` tables.
fn micro_config(layers: usize, backend: &str, seed: u64, tables: &str) -> ResolvedConfig {
    Micro {
        runtime: &common::runtime(backend, seed),
        tables,
        ..common::micro(64, 16, layers, 16)
    }
    .resolve()
}

/// One decoder layer on tokens `xs` (position, hidden) with attention over `keys(j)`.
/// `kv_override`: for each query the keys/values it attends to (already causal-filtered by
/// position inside); `None` = the layer's own fresh K/V of `xs`.
fn layer(
    w: &W,
    prefix: &str,
    norms: (&[f64], &[f64]),
    xs: &[(usize, Vec<f64>)],
    dims: &Dims,
    project: bool,
    kv_for: &dyn Fn(&Kv) -> Kv,
) -> (Vec<Vec<f64>>, Kv) {
    let q_w = w.get(&format!("{prefix}.self_attn.q_proj.weight"));
    let o_w = w.get(&format!("{prefix}.self_attn.o_proj.weight"));
    let (hq, hkv, dh) = (dims.hq, dims.hkv, dims.dh);
    let normed: Vec<Vec<f64>> = xs
        .iter()
        .map(|(_, h)| rmsnorm(h, norms.0, dims.eps))
        .collect();
    let mut fresh: Kv = Vec::new();
    if project {
        // Read only here: a layer that projects no K/V may have no K/V weights at all.
        let k_w = w.get(&format!("{prefix}.self_attn.k_proj.weight"));
        let v_w = w.get(&format!("{prefix}.self_attn.v_proj.weight"));
        for (i, (p, _)) in xs.iter().enumerate() {
            let k = matvec(k_w, &normed[i]);
            let v = matvec(v_w, &normed[i]);
            let mut kr = Vec::new();
            for h in 0..hkv {
                kr.extend(rope(&k[h * dh..(h + 1) * dh], *p, dims.theta));
            }
            fresh.push((*p, kr, v));
        }
    }
    let keys = kv_for(&fresh);
    let mut out = Vec::new();
    for (i, (p, h0)) in xs.iter().enumerate() {
        let q = matvec(q_w, &normed[i]);
        let mut att = vec![0.0; hq * dh];
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            let qh = rope(&q[h * dh..(h + 1) * dh], *p, dims.theta);
            let vis: Vec<&(usize, Vec<f64>, Vec<f64>)> =
                keys.iter().filter(|(kp, _, _)| kp <= p).collect();
            let scores: Vec<f64> = vis
                .iter()
                .map(|(_, k, _)| {
                    (0..dh).map(|e| qh[e] * k[kvh * dh + e]).sum::<f64>() / (dh as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for (j, (_, _, v)) in vis.iter().enumerate() {
                let a = (scores[j] - m).exp() / z;
                for e in 0..dh {
                    att[h * dh + e] += a * v[kvh * dh + e];
                }
            }
        }
        let o = matvec(o_w, &att);
        let h1: Vec<f64> = h0.iter().zip(&o).map(|(a, b)| a + b).collect();
        let x2 = rmsnorm(&h1, norms.1, dims.eps);
        let g = matvec(w.get(&format!("{prefix}.mlp.gate_proj.weight")), &x2);
        let u = matvec(w.get(&format!("{prefix}.mlp.up_proj.weight")), &x2);
        let s: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
            .collect();
        let dn = matvec(w.get(&format!("{prefix}.mlp.down_proj.weight")), &s);
        out.push(h1.iter().zip(&dn).map(|(a, b)| a + b).collect());
    }
    (out, fresh)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Router decisions taken from the naive scores: expert-choice top-k by the logit `z` (the
/// router ranks by `z`, not by the saturating gate) with ties to the lower position.
fn topk_sorted(cands: &[usize], g: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|&a, &b| {
        g[b].partial_cmp(&g[a])
            .unwrap()
            .then(cands[a].cmp(&cands[b]))
    });
    let mut keep: Vec<usize> = order[..k.min(cands.len())]
        .iter()
        .map(|&i| cands[i])
        .collect();
    keep.sort();
    keep
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Expert,
    Token,
}

fn naive_forward(model: &MorModel, ids: &[Vec<u32>], kind: Kind, kv: &str) -> Vec<Vec<Vec<f64>>> {
    let nv = Naive::of(model);
    let w = &nv.w;
    let d = nv.d;
    let plan = model.config().plan.clone();
    let n_r = plan.num_recursions;
    let mut all_logits = Vec::new();
    for row in ids {
        let t = row.len();
        let mut h = nv.embed(row);
        let run_full = |h: &mut Vec<Vec<f64>>, seg: Segment| {
            for s in plan.slots.iter().filter(|s| s.segment == seg) {
                *h = nv.block_all(s.block, h, true, &|f: &Kv| f.clone()).0;
            }
        };
        run_full(&mut h, Segment::Prelude);
        let h1 = h.clone();
        // Token-choice: depth from one router on H^1 (argmax of softmax), gate p_{t,i}.
        let mut tc_depth = vec![n_r; t];
        let mut tc_gate = vec![1.0; t];
        if kind == Kind::Token {
            let wr = &w.get("model.router.w1").1; // [d, N_r]
            for i in 0..t {
                let z: Vec<f64> = (0..n_r)
                    .map(|j| (0..d).map(|c| h1[i][c] * wr[c * n_r + j]).sum())
                    .collect();
                let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = z.iter().map(|x| (x - mx).exp()).collect();
                let s: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / s).collect();
                let mut best = 0;
                for j in 1..n_r {
                    if p[j] > p[best] {
                        best = j;
                    }
                }
                tc_depth[i] = best + 1;
                tc_gate[i] = p[best];
            }
        }
        let mut active: Vec<usize> = (0..t).collect();
        let mut first: Vec<Kv> = Vec::new();
        for step in 1..=n_r {
            let sel: Vec<usize>;
            let mut gate: HashMap<usize, f64> = HashMap::new();
            match kind {
                Kind::Expert => {
                    let wr = &w.get(&format!("model.router.{step}.w1")).1; // [d, 1]
                    let z: Vec<f64> = active
                        .iter()
                        .map(|&i| (0..d).map(|c| h[i][c] * wr[c]).sum::<f64>())
                        .collect();
                    let g: Vec<f64> = z.iter().map(|&z| 0.1 * sigmoid(z)).collect();
                    let cap = (n_r - step + 1) as f64 / n_r as f64;
                    let k = ((cap * t as f64).floor() as usize).max(1);
                    sel = topk_sorted(&active, &z, k);
                    for (j, &i) in active.iter().enumerate() {
                        gate.insert(i, g[j]);
                    }
                }
                Kind::Token => {
                    sel = active
                        .iter()
                        .copied()
                        .filter(|&i| tc_depth[i] >= step)
                        .collect();
                }
            }
            if sel.is_empty() {
                break;
            }
            let mut xs: Vec<(usize, Vec<f64>)> = sel.iter().map(|&i| (i, h[i].clone())).collect();
            for (j, s) in plan
                .slots
                .iter()
                .filter(|s| matches!(s.segment, Segment::Recursion { step: r, .. } if r == step))
                .enumerate()
            {
                let project = !(kv == "recursive_sharing" && step >= 2);
                let first_j: Option<Kv> = if step >= 2 {
                    first.get(j).cloned()
                } else {
                    None
                };
                let kv_for = |fresh: &Kv| -> Kv {
                    match (kv, step) {
                        ("recursion_wise", _) | (_, 1) => fresh.clone(),
                        ("recursive_sharing", _) => first_j.clone().unwrap(),
                        ("hybrid", _) => overwrite(first_j.clone().unwrap(), fresh),
                        _ => unreachable!(),
                    }
                };
                let (y, fresh) = nv.block(s.block, &xs, project, &kv_for);
                if step == 1 {
                    first.push(fresh);
                }
                xs = sel.iter().copied().zip(y).collect();
            }
            for (i, y) in &xs {
                match kind {
                    Kind::Expert => {
                        let g = gate[i];
                        for c in 0..d {
                            h[*i][c] += g * y[c];
                        }
                    }
                    Kind::Token => {
                        if tc_depth[*i] == step {
                            for c in 0..d {
                                h[*i][c] = h1[*i][c] + tc_gate[*i] * y[c];
                            }
                        } else {
                            h[*i] = y.clone();
                        }
                    }
                }
            }
            active = sel;
        }
        run_full(&mut h, Segment::Coda);
        all_logits.push(nv.logits(&h));
    }
    all_logits
}

fn config(kind: Kind, kv: &str, backend: &str) -> ResolvedConfig {
    let router = match kind {
        Kind::Expert => "kind = \"expert_choice\"",
        Kind::Token => "kind = \"token_choice\"\nz_loss = false",
    };
    let tables = format!("{MOR_RECURSION}\n[router]\n{router}\n[kv]\nkind = \"{kv}\"");
    micro_config(5, backend, 11, &tables)
}

/// The largest `|fast − naive|` over the logits of an f64 model.
fn worst_error(kind: Kind, kv: &str, backend: &str) -> f64 {
    let (ids, x) = random_rows(5, 2, 13);
    let (model, fast) = f64_logits(&config(kind, kv, backend), &x);
    max_abs_diff(&fast, &naive_forward(&model, &ids, kind, kv))
}

fn check(kind: Kind, kv: &str, backend: &str) {
    let worst = worst_error(kind, kv, backend);
    assert!(
        worst < 1e-9,
        "{kind:?}/{kv}/{backend}: max |fast - naive| = {worst:e}"
    );
}

#[test]
fn expert_choice_matches_naive_reference_under_each_kv_policy() {
    for backend in ["reference", "cpu"] {
        for kv in ["recursion_wise", "recursive_sharing", "hybrid"] {
            check(Kind::Expert, kv, backend);
        }
    }
}

#[test]
fn token_choice_matches_naive_reference_under_each_kv_policy() {
    for backend in ["reference", "cpu"] {
        for kv in ["recursion_wise", "recursive_sharing"] {
            check(Kind::Token, kv, backend);
        }
    }
}

/// An f64 model computes in f64 throughout, RoPE tables included: its logits (of size
/// about 0.1 here) agree with the naive f64 reference to 1e-12, where f32 RoPE tables left
/// about 1e-10.
#[test]
fn f64_forward_agrees_with_the_f64_reference_to_1e_12() {
    for backend in ["reference", "cpu"] {
        for (kind, kv) in [
            (Kind::Expert, "recursion_wise"),
            (Kind::Expert, "hybrid"),
            (Kind::Token, "recursive_sharing"),
        ] {
            let worst = worst_error(kind, kv, backend);
            assert!(
                worst < 1e-12,
                "{kind:?}/{kv}/{backend}: max |fast - naive| = {worst:e}"
            );
        }
    }
}

/// The recursive baseline (no router) in plain loops: every token runs every slot in plan
/// order; under `recursive_sharing` the slot of step r >= 2 and block layer j reads the
/// step-1 K/V of layer j and projects none (spec §4), under `hybrid` it reads them with
/// every position overwritten by its fresh K/V (all tokens are selected).
fn naive_recursive(model: &MorModel, ids: &[Vec<u32>], kv: &str) -> Vec<Vec<Vec<f64>>> {
    let nv = Naive::of(model);
    let mut out = Vec::new();
    for row in ids {
        let mut h = nv.embed(row);
        let mut first: HashMap<usize, Kv> = HashMap::new();
        for s in &model.config().plan.slots {
            let (step, lj) = match s.segment {
                Segment::Recursion { step, layer } => (step, layer),
                _ => (0, usize::MAX),
            };
            let shares = step >= 2 && kv != "recursion_wise";
            let project = !(shares && kv == "recursive_sharing");
            let base = first.get(&lj).cloned();
            let kv_for = |fresh: &Kv| -> Kv {
                match (shares, kv) {
                    (false, _) => fresh.clone(),
                    (true, "recursive_sharing") => base.clone().unwrap(),
                    // Hybrid with every token selected: every step-1 entry is overwritten.
                    _ => overwrite(base.clone().unwrap(), fresh),
                }
            };
            let (y, fresh) = nv.block_all(s.block, &h, project, &kv_for);
            if step == 1 {
                first.insert(lj, fresh);
            }
            h = y;
        }
        out.push(nv.logits(&h));
    }
    out
}

fn recursive_config(sharing: &str, kv: &str) -> ResolvedConfig {
    let tables = format!(
        "[recursion]\nnum_recursions = 3\nsharing = {{ kind = \"{sharing}\" }}\n[kv]\nkind = \"{kv}\""
    );
    micro_config(8, "reference", 13, &tables)
}

/// Recursive KV sharing is what the model computes for every sharing plan, the non-cyclic
/// `sequence` and `middle_sequence` included (they once ignored it while the accounting
/// counted it): the logits equal the naive sharing reference and differ from the
/// recursion-wise ones, and the FLOPs accounting is lower by exactly the K/V projections of
/// the step >= 2 slots, `2·(4d² − 2d²)` per token each (spec §1.4).
#[test]
fn recursive_sharing_runs_and_is_counted_under_every_plan() {
    let (ids, x) = random_rows(9, 2, 11);
    for plan in ["cycle", "sequence", "middle_cycle", "middle_sequence"] {
        let mut logits = HashMap::new();
        for kv in ["recursion_wise", "recursive_sharing", "hybrid"] {
            let cfg = recursive_config(plan, kv);
            let (model, fast) = f64_logits(&cfg, &x);
            let worst = max_abs_diff(&fast, &naive_recursive(&model, &ids, kv));
            assert!(worst < 1e-12, "{plan}/{kv}: max |fast - naive| = {worst:e}");
            logits.insert(kv, fast);
        }
        // Hybrid with every token selected overwrites every step-1 entry: recursion-wise.
        let diff = |a: &str, b: &str| max_abs_diff(&logits[a], &logits[b]);
        assert!(diff("recursion_wise", "hybrid") < 1e-12, "{plan}");
        assert!(diff("recursion_wise", "recursive_sharing") > 1e-6, "{plan}");

        let flops = |kv: &str| {
            mor_core::accounting::report(&recursive_config(plan, kv))
                .unwrap()
                .flops_per_token
        };
        let cfg = recursive_config(plan, "recursive_sharing");
        let later = cfg
            .plan
            .slots
            .iter()
            .filter(|s| matches!(s.segment, Segment::Recursion { step, .. } if step >= 2))
            .count() as f64;
        let d = cfg.model.hidden_size as f64;
        let saved = flops("recursion_wise") - flops("recursive_sharing");
        assert_eq!(saved, later * 2.0 * 2.0 * d * d, "{plan}");
        assert!(later > 0.0, "{plan}");
    }
}

/// The layer whose K/V layer `l` of an `n`-layer vanilla model reads under KV sharing with
/// `pattern` and `loops` (spec §4), from spec §2's mappings, not from the plan: Cycle
/// `l mod (L/N)`, Sequence `⌊l/N⌋·N`, Middle-Cycle `1 + (l−1) mod ((L−2)/N)`,
/// Middle-Sequence `1 + ⌊(l−1)/N⌋·N`; the first and last layers of the Middle patterns
/// read their own.
fn kv_source(pattern: &str, n: usize, loops: usize, l: usize) -> usize {
    if pattern.starts_with("middle_") && (l == 0 || l == n - 1) {
        return l;
    }
    match pattern {
        "cycle" => l % (n / loops),
        "seq" => l / loops * loops,
        "middle_cycle" => 1 + (l - 1) % ((n - 2) / loops),
        "middle_sequence" => 1 + (l - 1) / loops * loops,
        other => panic!("unknown pattern {other}"),
    }
}

/// A vanilla model in plain loops, layer after layer, every layer with its own weights:
/// layer `l` computes K/V when `kv_source(l) = l`, and otherwise attends with its own
/// queries over the K/V layer `kv_source(l)` computed (spec §4: no K/V projection, the full
/// causal context). `pattern = None`: no sharing.
fn naive_vanilla(
    model: &MorModel,
    ids: &[Vec<u32>],
    pattern: Option<(&str, usize)>,
) -> Vec<Vec<Vec<f64>>> {
    let nv = Naive::of(model);
    let n = model.config().model.num_layers;
    let mut out = Vec::new();
    for row in ids {
        let mut h = nv.embed(row);
        let mut computed: HashMap<usize, Kv> = HashMap::new();
        for l in 0..n {
            let src = pattern.map_or(l, |(p, loops)| kv_source(p, n, loops, l));
            let reused = (src != l).then(|| computed[&src].clone());
            let kv_for = |fresh: &Kv| -> Kv { reused.clone().unwrap_or_else(|| fresh.clone()) };
            let (y, fresh) = nv.block_all(l, &h, src == l, &kv_for);
            if src == l {
                computed.insert(l, fresh);
            }
            h = y;
        }
        out.push(nv.logits(&h));
    }
    out
}

fn vanilla_config(kv: &str, backend: &str) -> ResolvedConfig {
    micro_config(
        8,
        backend,
        13,
        &format!("[recursion]\n{VANILLA}\n[kv]\n{kv}"),
    )
}

/// Vanilla models with KV sharing (spec §4, the vanilla rows of §6.4 (d)) under every
/// pattern, the Seq ones (run in plan order) and the Cyc ones (run step by step) included:
/// the logits equal the naive layer-by-layer reference, which follows spec §2's mappings
/// rather than the plan, on both backends; sharing changes them (the unshared model with
/// the same weights agrees with the unshared reference and differs).
#[test]
fn vanilla_kv_sharing_matches_a_naive_layer_by_layer_reference() {
    let (ids, x) = random_rows(21, 2, 11);
    for backend in ["reference", "cpu"] {
        let (plain, plain_logits) =
            f64_logits(&vanilla_config("kind = \"recursion_wise\"", backend), &x);
        let e = max_abs_diff(&plain_logits, &naive_vanilla(&plain, &ids, None));
        assert!(e < 1e-12, "{backend}/unshared: {e:e}");
        for (pattern, loops) in [
            ("cycle", 2),
            ("cycle", 4),
            ("seq", 2),
            ("seq", 4),
            ("middle_cycle", 3),
            ("middle_sequence", 2),
        ] {
            let cfg = vanilla_config(
                &format!(
                    "kind = \"recursive_sharing\"\nshare_pattern = \"{pattern}\"\nshare_loops = {loops}"
                ),
                backend,
            );
            let (model, fast) = f64_logits(&cfg, &x);
            let naive = naive_vanilla(&model, &ids, Some((pattern, loops)));
            let e = max_abs_diff(&fast, &naive);
            assert!(
                e < 1e-12,
                "{backend}/{pattern}{loops}: max |fast - naive| = {e:e}"
            );
            let changed = max_abs_diff(&fast, &plain_logits);
            assert!(
                changed > 1e-6,
                "{backend}/{pattern}{loops}: sharing left the logits unchanged ({changed:e})"
            );
        }
    }
}
