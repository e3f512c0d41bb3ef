//! Test-time depth (spec Fig. 5c): `MorModel::set_max_depth` caps the plain forward, and the
//! decode engine's `max_depth` gives the same logits and depths, token by token, for
//! expert-choice, token-choice and recursive models.

mod common;

use candle_core::{Device, Tensor};
use common::Micro;
use mor_core::config::ResolvedConfig;
use mor_models::engine::{DecodeOptions, Decoder};
use mor_models::MorModel;
use mor_router::RouteMode;

const VOCAB: usize = 64;
const CONTEXT: usize = 20;

fn cfg(tables: &str) -> ResolvedConfig {
    Micro {
        model: "init_std = 0.2",
        runtime: &common::runtime("cpu", 5),
        tables,
        ..common::micro(VOCAB, 32, 8, CONTEXT)
    }
    .resolve()
}

fn cases() -> Vec<(&'static str, ResolvedConfig)> {
    let rec = "[recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }\n";
    vec![
        ("recursive", cfg(rec)),
        (
            "expert",
            cfg(&format!("{rec}[router]\nkind = \"expert_choice\"\n")),
        ),
        (
            "token",
            cfg(&format!("{rec}[router]\nkind = \"token_choice\"\n")),
        ),
    ]
}

#[test]
fn capped_forward_equals_capped_decoding() {
    let _ = mor_models::builtin::link();
    for (name, c) in cases() {
        let model = MorModel::new(&c).unwrap();
        let ids = common::random_ids(CONTEXT, VOCAB, 23);
        let t = Tensor::from_vec(ids.clone(), (1, CONTEXT), &Device::Cpu).unwrap();
        model.set_max_depth(None).unwrap();
        let uncapped = model.forward(&t, RouteMode::Causal).unwrap();
        let uncapped = uncapped.logits.to_vec3::<f32>().unwrap();
        for d in 1..=3 {
            model.set_max_depth(Some(d)).unwrap();
            assert_eq!(model.max_depth(), d);
            let full = model.forward(&t, RouteMode::Causal).unwrap();
            let logits = full.logits.to_vec3::<f32>().unwrap();
            let mut dec = Decoder::new(
                &model,
                DecodeOptions {
                    max_depth: Some(d),
                    ..DecodeOptions::default()
                },
            )
            .unwrap();
            let (mut worst, mut moved) = (0f32, 0f32);
            for (pos, &id) in ids.iter().enumerate() {
                let step = dec.step(id).unwrap();
                assert!(step.depth <= d, "{name} d={d}: depth {}", step.depth);
                assert_eq!(
                    step.depth, full.depths[0][pos] as usize,
                    "{name} d={d} @{pos}"
                );
                for ((a, b), u) in step
                    .logits
                    .iter()
                    .zip(&logits[0][pos])
                    .zip(&uncapped[0][pos])
                {
                    worst = worst.max((a - b).abs());
                    moved = moved.max((b - u).abs());
                }
            }
            assert!(worst < 1e-4, "{name} d={d}: decode vs forward {worst}");
            if d < 3 {
                // The cap changes what the model computes.
                assert!(moved > 1e-3, "{name} d={d}: capped logits equal uncapped");
            } else {
                assert_eq!(moved, 0.0, "{name}: the full depth is the uncapped model");
            }
        }
        model.set_max_depth(None).unwrap();
        assert_eq!(model.max_depth(), 3);
        for bad in [0, 4] {
            let e = model.set_max_depth(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("1..=3"), "{name}: {e}");
        }
    }
}
