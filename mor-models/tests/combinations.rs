//! Every combination of sharing × router × KV policy that the paper's tables use (spec §6.1,
//! §6.4 (a)–(d)) resolves from a config file and runs a training step with a finite loss.

use candle_core::{Device, Tensor};
use mor_core::config::Config;
use mor_models::model::MorModel;
use mor_models::optim::{AdamW, AdamWConfig};
use mor_router::RouteMode;

fn combos() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let base = |n_r: usize, sharing: &str, router: Option<&str>, kv: &str| {
        let router = match router {
            Some(r) => format!("[router]\nkind = \"{r}\"\n"),
            None => String::new(),
        };
        format!(
            "[model]\npreset = \"micro\"\nvocab_size = 64\nhidden_size = 32\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 48\nnum_layers = 8\nseq_len = 16\n[recursion]\nnum_recursions = {n_r}\nsharing = {{ kind = \"{sharing}\" }}\n{router}[kv]\nkind = \"{kv}\"\n[train]\nbudget = {{ steps = 1 }}\nbatch_seqs = 2\nmicro_batch_seqs = 2\n"
        )
    };
    // Table 3 / §6.1: vanilla, recursive N_r = 2..4, MoR expert (cache, share), MoR token.
    out.push(("vanilla".into(), base(1, "none", None, "recursion_wise")));
    // §6.4 (a): every sharing strategy for the recursive model, N_r = 2 and 3.
    for s in ["cycle", "sequence", "middle_cycle", "middle_sequence"] {
        for n in [2, 3] {
            out.push((
                format!("recursive/{s}/{n}"),
                base(n, s, None, "recursion_wise"),
            ));
        }
    }
    out.push((
        "recursive/middle_cycle/4".into(),
        base(4, "middle_cycle", None, "recursion_wise"),
    ));
    // §6.4 (d): KV sharing for the recursive baselines.
    for s in ["cycle", "middle_cycle"] {
        out.push((
            format!("recursive/{s}/3/share"),
            base(3, s, None, "recursive_sharing"),
        ));
    }
    // MoR supports cycle and middle_cycle (spec §2); expert: cache, share, hybrid; token:
    // cache, share.
    for s in ["cycle", "middle_cycle"] {
        for n in [2, 3, 4] {
            for kv in ["recursion_wise", "recursive_sharing", "hybrid"] {
                out.push((
                    format!("expert/{s}/{n}/{kv}"),
                    base(n, s, Some("expert_choice"), kv),
                ));
            }
            for kv in ["recursion_wise", "recursive_sharing"] {
                out.push((
                    format!("token/{s}/{n}/{kv}"),
                    base(n, s, Some("token_choice"), kv),
                ));
            }
        }
    }
    out
}

#[test]
fn paper_combinations_train_one_step() {
    let dir = std::env::temp_dir().join(format!("mor-combos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = mor_core::rng::Rng::new(1);
    let ids: Vec<u32> = (0..32).map(|_| r.below(64) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (2, 16), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 64).collect::<Vec<_>>(),
        (2, 16),
        &Device::Cpu,
    )
    .unwrap();
    let all = combos();
    assert!(all.len() >= 40, "{} combinations", all.len());
    for (name, text) in all {
        let path = dir.join(format!("{}.toml", name.replace('/', "_")));
        std::fs::write(&path, text).unwrap();
        let cfg = Config::from_path(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = MorModel::new(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut opt = AdamW::new(
            AdamWConfig {
                lr: 1e-3,
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: 0.1,
            },
            model
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v, true))
                .collect(),
        )
        .unwrap();
        let out = model
            .forward(&x, RouteMode::Train)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut loss = MorModel::cross_entropy(&out.logits, &y).unwrap();
        if let Some(rl) = &out.router.loss {
            loss = (loss + rl).unwrap();
        }
        let l = loss.to_scalar::<f32>().unwrap();
        assert!(l.is_finite() && l > 0.0, "{name}: loss {l}");
        opt.step(&loss.backward().unwrap(), 1e-3).unwrap();
        // The step changed the model and the next loss is finite too.
        let l2 = MorModel::cross_entropy(&model.forward(&x, RouteMode::Train).unwrap().logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            l2.is_finite() && l2 != l,
            "{name}: loss after the step {l2} (before {l})"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hybrid_with_token_choice_is_refused_by_config() {
    let text = "[model]\npreset = \"micro\"\n[recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }\n[router]\nkind = \"token_choice\"\n[kv]\nkind = \"hybrid\"\n";
    let err = Config::from_toml_str(text).unwrap_err().to_string();
    assert!(err.contains("kv") && err.contains("hybrid"), "{err}");
}
