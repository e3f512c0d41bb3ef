//! Utilities shared by the router tests.

use candle_core::{DType, Device, Tensor, Var};
use mor_core::rng::Rng;
use mor_kernels::{Backend, Result as KResult};
use mor_router::{RouteMode, Router, RouterCtx, RouterOutput, StepRouting};
use std::sync::Arc;

/// A backend whose ops all fail: the routers never call the backend, and a router that did
/// would fail these tests loudly.
#[derive(Debug)]
pub struct NoBackend(Device);

fn nope<T>(op: &'static str) -> KResult<T> {
    Err(mor_kernels::Error::Invalid {
        op,
        msg: "not available in router tests".into(),
    })
}

impl Backend for NoBackend {
    fn name(&self) -> &'static str {
        "none"
    }
    fn device(&self) -> &Device {
        &self.0
    }
    fn rms_norm(&self, _: &Tensor, _: &Tensor, _: f64) -> KResult<Tensor> {
        nope("rms_norm")
    }
    fn rope(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> KResult<Tensor> {
        nope("rope")
    }
    fn attention(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> KResult<Tensor> {
        nope("attention")
    }
    fn swiglu(&self, _: &Tensor, _: &Tensor) -> KResult<Tensor> {
        nope("swiglu")
    }
    fn gather_tokens(&self, _: &Tensor, _: &Tensor) -> KResult<Tensor> {
        nope("gather_tokens")
    }
    fn scatter_add_tokens(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
    ) -> KResult<Tensor> {
        nope("scatter_add_tokens")
    }
}

/// A CPU context with the given sizes, f64 parameters and initialisation std `std`.
pub fn ctx(d: usize, nr: usize, l: usize, std: f64, seed: u64) -> RouterCtx {
    let mut c = RouterCtx::new(d, nr, l, Device::Cpu, Arc::new(NoBackend(Device::Cpu)));
    c.init_std = std;
    c.seed = seed;
    c.dtype = DType::F64;
    c
}

/// Parses a TOML snippet into a parameter table.
pub fn table(s: &str) -> toml::Table {
    s.parse::<toml::Table>().expect("test TOML parses")
}

/// Builds a registered router by name from a TOML snippet.
pub fn build(name: &str, params: &str, c: &RouterCtx) -> Box<dyn Router> {
    mor_router::build_router(name, &table(params), c).expect("router builds")
}

/// `[b, l, d]` hidden states from N(0, 1), f64.
pub fn hidden(b: usize, l: usize, d: usize, seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f64> = (0..b * l * d).map(|_| r.normal()).collect();
    Tensor::from_vec(v, (b, l, d), &Device::Cpu).unwrap()
}

/// Host copy of `[b, l, d]` hidden states.
pub fn host3(h: &Tensor) -> Vec<Vec<Vec<f64>>> {
    h.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap()
}

/// Runs a whole forward: `begin`, `route` for steps 1..=nr with `active` = the previous
/// selection, `finish`. The hidden states are not updated between steps.
pub fn forward(
    router: &dyn Router,
    h: &Tensor,
    nr: usize,
    mode: RouteMode,
) -> mor_router::Result<(Vec<Vec<Vec<u32>>>, Vec<StepRouting>, RouterOutput)> {
    let (b, l, _) = h.dims3()?;
    let mut st = router.begin(h, mode)?;
    let mut active: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
    let mut actives = Vec::new();
    let mut steps = Vec::new();
    for step in 1..=nr {
        let s = router.route(step, h, &active, &mut st, mode)?;
        actives.push(active.clone());
        active = s.selected.clone();
        steps.push(s);
    }
    let out = router.finish(st)?;
    Ok((actives, steps, out))
}

/// Central finite differences (f64) of the scalar `f` against its autograd gradient, for
/// every entry of every var. Returns the worst relative error and fails above `tol`.
pub fn fd_check(vars: &[&Var], f: &dyn Fn() -> Tensor, eps: f64, tol: f64) -> f64 {
    let grads = f().backward().unwrap();
    let mut worst = 0f64;
    for (vi, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("var {vi} received no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let set = |p: Vec<f64>| {
            v.set(&Tensor::from_vec(p, v.shape(), v.device()).unwrap())
                .unwrap()
        };
        let mut any_nonzero = false;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            set(p.clone());
            let lp = f().to_scalar::<f64>().unwrap();
            p[i] -= 2.0 * eps;
            set(p);
            let lm = f().to_scalar::<f64>().unwrap();
            set(base.clone());
            let num = (lp - lm) / (2.0 * eps);
            let err = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-3);
            any_nonzero |= g[i] != 0.0;
            worst = worst.max(err);
            assert!(
                err < tol,
                "var {vi} entry {i}: analytic {} numeric {num} (rel err {err})",
                g[i]
            );
        }
        assert!(any_nonzero, "var {vi}: every gradient entry is zero");
    }
    worst
}

/// Logistic function.
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The named var of a router.
pub fn var(router: &dyn Router, name: &str) -> Var {
    router
        .vars()
        .into_iter()
        .chain(router.aux_vars())
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no var `{name}`"))
        .1
}

/// Host copy of a 2-D var.
pub fn host2(v: &Var) -> Vec<Vec<f64>> {
    v.as_tensor().to_vec2::<f64>().unwrap()
}
