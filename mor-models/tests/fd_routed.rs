//! Gradients through a routed MoR model against central finite differences in f64
//! (TOOLCHAIN.md §3): expert choice and token choice, on the `reference` and `cpu` backends,
//! a random subset of coordinates of every parameter (the main optimiser's, with the LM
//! loss plus the router's loss terms; the auxiliary router's, with its own loss).
//!
//! The top-k selection is piecewise constant in the parameters: the check holds only while
//! a perturbation keeps every selection. Each perturbed forward asserts that the tokens'
//! depths (which fix every step's selection, selections being nested) are unchanged.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{Micro, MOR_RECURSION};
use mor_core::config::ResolvedConfig;
use mor_models::model::MorModel;
use mor_router::RouteMode;

/// Central-difference step: small against the routing margins (every perturbed forward
/// checks that the routing held), large enough that the f64 rounding of the loss, about
/// 1e-15, moves the difference quotient by about 1e-10 only.
const EPS: f64 = 1e-5;
/// Largest relative error `|num - ana| / max(|num|, |ana|, 1e-3)` accepted. The quotient's
/// rounding (1e-10, relative 1e-7 at the 1e-3 floor) dominates its truncation error
/// `EPS² f'''/6`; the worst coordinate measures about 1.3e-7 (4.8e-7 with a step of 1e-4,
/// above 1e-6 with 1e-6: rounding and truncation balance near 1e-5).
const TOL: f64 = 1e-6;
/// Coordinates checked per parameter tensor (all of them when it has fewer).
const PER_PARAM: usize = 5;

fn config(router: &str, backend: &str) -> ResolvedConfig {
    Micro {
        runtime: &common::runtime(backend, 7),
        tables: &format!("{MOR_RECURSION}\n[router]\n{router}"),
        ..common::micro(32, 16, 5, 12)
    }
    .resolve()
}

fn ids(b: usize, t: usize, seed: u64) -> Tensor {
    common::id_tensor(b, t, 32, seed)
}

/// Which loss a check differentiates.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Cross-entropy plus the router's loss terms (what the main optimiser steps on).
    Main,
    /// The auxiliary router's loss (its inputs are detached from the model).
    Aux,
}

/// The loss and the depths of one forward.
fn loss(model: &MorModel, x: &Tensor, y: &Tensor, which: Loss) -> (Tensor, Vec<Vec<u8>>) {
    let out = model.forward(x, RouteMode::Train).unwrap();
    let l = match which {
        Loss::Main => {
            let ce = MorModel::cross_entropy(&out.logits, y).unwrap();
            match &out.router.loss {
                Some(r) => (ce + r).unwrap(),
                None => ce,
            }
        }
        Loss::Aux => out
            .router
            .aux_router_loss
            .clone()
            .expect("the router has an auxiliary loss"),
    };
    (l, out.depths)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Checks `PER_PARAM` random coordinates of every variable in `vars`; returns the worst
/// relative error and the number of coordinates checked.
fn fd_check(model: &MorModel, vars: &[(String, Var)], which: Loss, what: &str) -> (f64, usize) {
    let (x, y) = (ids(2, 12, 1), ids(2, 12, 2));
    let (l0, depths0) = loss(model, &x, &y, which);
    // The forward is deterministic: the same parameters give the same bits.
    assert_eq!(scalar(&loss(model, &x, &y, which).0), scalar(&l0), "{what}");
    // Routing is not degenerate: some tokens stop before the last recursion.
    assert!(
        depths0.iter().flatten().any(|&d| d < 3) && depths0.iter().flatten().any(|&d| d == 3),
        "{what}: depths {depths0:?}"
    );
    let grads = l0.backward().unwrap();
    let mut rng = mor_core::rng::Rng::new(17);
    let (mut worst, mut checked) = (0f64, 0usize);
    for (name, v) in vars {
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let analytic = match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => panic!("{what}: no gradient for {name}"),
        };
        let mut coords: Vec<usize> = (0..base.len()).collect();
        rng.shuffle(&mut coords);
        coords.truncate(PER_PARAM);
        for &i in &coords {
            let at = |value: f64| {
                let mut p = base.clone();
                p[i] = value;
                v.set(&Tensor::from_vec(p, v.shape(), v.device()).unwrap())
                    .unwrap();
                let (l, depths) = loss(model, &x, &y, which);
                assert_eq!(
                    depths, depths0,
                    "{what}: perturbing {name}[{i}] by {EPS:e} changed the routing"
                );
                scalar(&l)
            };
            let (lp, lm) = (at(base[i] + EPS), at(base[i] - EPS));
            v.set(&Tensor::from_vec(base.clone(), v.shape(), v.device()).unwrap())
                .unwrap();
            let num = (lp - lm) / (2.0 * EPS);
            let ana = analytic[i];
            let err = (num - ana).abs() / num.abs().max(ana.abs()).max(1e-3);
            assert!(
                err < TOL,
                "{what}: {name}[{i}]: analytic {ana} vs numeric {num} (relative error {err:e})"
            );
            worst = worst.max(err);
            checked += 1;
        }
    }
    (worst, checked)
}

/// `router` is the body of the `[router]` table.
fn check(router: &str, with_aux: bool) {
    for backend in ["reference", "cpu"] {
        let cfg = config(router, backend);
        let model = MorModel::new_with(&cfg, DType::F64, Device::Cpu).unwrap();
        assert_eq!(model.dtype(), DType::F64);
        let vars: Vec<(String, Var)> = model.named_vars();
        assert!(
            vars.iter().any(|(n, _)| n.contains("router")),
            "the router's parameters are among the model's: {:?}",
            vars.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        let what = format!("{}/{backend}", router.replace('\n', " "));
        let (worst, checked) = fd_check(&model, &vars, Loss::Main, &what);
        assert!(checked >= vars.len(), "{what}: {checked} coordinates");
        println!("{what}: {checked} coordinates, worst relative error {worst:e}");
        let aux = model.aux_named_vars();
        assert_eq!(!aux.is_empty(), with_aux, "{what}: auxiliary router");
        if with_aux {
            let (worst, checked) = fd_check(&model, &aux, Loss::Aux, &format!("{what}/aux"));
            println!("{what}/aux: {checked} coordinates, worst relative error {worst:e}");
        }
    }
}

#[test]
fn expert_choice_gradients_match_finite_differences() {
    check("kind = \"expert_choice\"", false);
}

/// Sampling by an auxiliary router: its parameters are checked against its own loss (its
/// inputs are detached, so the main loss does not reach them and its loss not the model).
#[test]
fn expert_choice_with_an_auxiliary_router_gradients_match_finite_differences() {
    check("kind = \"expert_choice\"\nsampling = \"aux_router\"", true);
}

#[test]
fn token_choice_gradients_match_finite_differences() {
    check("kind = \"token_choice\"", false);
}
