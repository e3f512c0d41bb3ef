//! A router from another crate that routes on the device and implements the trait's
//! documented hook for the token depths (`Router::finish_with_depths`), but not
//! `Router::finish_pending`: the model must take its depths from that hook. And a router
//! that pads its device decisions and hands a later step back to the host path: the host
//! rows it is given hold only the tokens that ran the previous step.

use candle_core::{Device, Tensor, Var};
use common::{Micro, MOR_RECURSION};
use mor_core::registry::{AccountingHints, CheckCtx, Family, ParamProblem, Plugin};
use mor_router::{
    DeviceStepRouting, ExpertChoiceParams, ExpertChoiceRouter, Result, RouteMode, Router,
    RouterCtx, RouterOutput, RouterPlugin, RouterStats, RoutingKind, RoutingState, StepRouting,
    TokenChoiceParams, TokenChoiceRouter,
};
use std::sync::Mutex;
mod common;

/// Expert choice behind a wrapper that forwards every method except `finish_pending`
/// (left at the trait's default, which is `finish`: nothing pending, no depths).
#[derive(Debug)]
struct DepthsHook(ExpertChoiceRouter);

impl Plugin for DepthsHook {
    const FAMILY: Family = Family::Router;
    const NAME: &'static str = "test_depths_hook";
    const DESCRIPTION: &'static str = "expert choice returning its depths from finish_with_depths";
    type Params = ExpertChoiceParams;
    fn check(params: &Self::Params, ctx: &CheckCtx) -> Vec<ParamProblem> {
        ExpertChoiceRouter::check(params, ctx)
    }
    fn accounting(params: &Self::Params, ctx: &CheckCtx) -> AccountingHints {
        ExpertChoiceRouter::accounting(params, ctx)
    }
}

impl RouterPlugin for DepthsHook {
    fn build(params: Self::Params, ctx: &RouterCtx) -> Result<Self> {
        Ok(DepthsHook(ExpertChoiceRouter::build(params, ctx)?))
    }
}

mor_router::register_router!(DepthsHook);

impl Router for DepthsHook {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn kind(&self) -> RoutingKind {
        self.0.kind()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.0.vars()
    }
    fn aux_vars(&self) -> Vec<(String, Var)> {
        self.0.aux_vars()
    }
    fn begin(&self, h1: &Tensor, mode: RouteMode) -> Result<RoutingState> {
        self.0.begin(h1, mode)
    }
    fn route(
        &self,
        step: usize,
        h: &Tensor,
        active: &[Vec<u32>],
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<StepRouting> {
        self.0.route(step, h, active, state, mode)
    }
    fn finish(&self, state: RoutingState) -> Result<RouterOutput> {
        self.0.finish(state)
    }
    fn routes_on_device(&self, device: &Device) -> bool {
        self.0.routes_on_device(device)
    }
    fn route_device(
        &self,
        step: usize,
        h: &Tensor,
        active: &Tensor,
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<Option<DeviceStepRouting>> {
        self.0.route_device(step, h, active, state, mode)
    }
    fn finish_with_depths(&self, state: RoutingState) -> Result<(RouterOutput, Option<Vec<u16>>)> {
        self.0.finish_with_depths(state)
    }
    fn after_optimizer_step(&self, stats: &[RouterStats], train_step: usize) -> Result<()> {
        self.0.after_optimizer_step(stats, train_step)
    }
}

#[test]
fn a_device_router_that_implements_finish_with_depths_gives_the_model_its_depths() {
    let cfg = |kind: &str| {
        Micro {
            runtime: "seed = 4",
            tables: &format!(
                "{MOR_RECURSION}\n[router]\nkind = \"{kind}\"\nz_loss = true\n\
                 infer_rule = \"full_sequence\"\nrouting_path = \"device\""
            ),
            ..common::micro(64, 32, 5, 16)
        }
        .resolve()
    };
    let ids = common::id_tensor(3, 16, 64, 5);
    let builtin = mor_models::model::MorModel::new(&cfg("expert_choice")).unwrap();
    let hooked = mor_models::model::MorModel::new(&cfg(DepthsHook::NAME)).unwrap();
    for mode in [RouteMode::Train, RouteMode::FullSequence] {
        let a = builtin.forward(&ids, mode).unwrap();
        let b = hooked
            .forward(&ids, mode)
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&a.logits), flat(&b.logits), "{mode:?}");
        assert_eq!(a.depths, b.depths, "{mode:?}");
        // Every depth from 1 to N_r occurs: the depths are real, not a default.
        for d in 1..=3u8 {
            assert!(
                b.depths.iter().flatten().any(|&x| x == d),
                "{mode:?} depth {d}"
            );
        }
        assert_eq!(a.router.terms, b.router.terms, "{mode:?}");
    }
}

/// Token choice (which pads its device decisions) that decides step 3 on the host, and
/// notes the `active` rows the model hands it there.
#[derive(Debug)]
struct HostStepThree {
    inner: TokenChoiceRouter,
}

/// The `active` rows [`HostStepThree`] was given at step 3 (only one test builds it).
static SEEN: Mutex<Vec<Vec<u32>>> = Mutex::new(Vec::new());

impl Plugin for HostStepThree {
    const FAMILY: Family = Family::Router;
    const NAME: &'static str = "test_host_step_three";
    const DESCRIPTION: &'static str = "token choice deciding step 3 on the host";
    type Params = TokenChoiceParams;
    fn check(params: &Self::Params, ctx: &CheckCtx) -> Vec<ParamProblem> {
        TokenChoiceRouter::check(params, ctx)
    }
    fn accounting(params: &Self::Params, ctx: &CheckCtx) -> AccountingHints {
        TokenChoiceRouter::accounting(params, ctx)
    }
}

impl RouterPlugin for HostStepThree {
    fn build(params: Self::Params, ctx: &RouterCtx) -> Result<Self> {
        Ok(HostStepThree {
            inner: TokenChoiceRouter::build(params, ctx)?,
        })
    }
}

mor_router::register_router!(HostStepThree);

impl Router for HostStepThree {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn kind(&self) -> RoutingKind {
        self.inner.kind()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.inner.vars()
    }
    fn begin(&self, h1: &Tensor, mode: RouteMode) -> Result<RoutingState> {
        self.inner.begin(h1, mode)
    }
    fn route(
        &self,
        step: usize,
        h: &Tensor,
        active: &[Vec<u32>],
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<StepRouting> {
        if step == 3 {
            *SEEN.lock().unwrap() = active.to_vec();
        }
        self.inner.route(step, h, active, state, mode)
    }
    fn finish(&self, state: RoutingState) -> Result<RouterOutput> {
        self.inner.finish(state)
    }
    fn routes_on_device(&self, device: &Device) -> bool {
        self.inner.routes_on_device(device)
    }
    fn route_device(
        &self,
        step: usize,
        h: &Tensor,
        active: &Tensor,
        state: &mut RoutingState,
        mode: RouteMode,
    ) -> Result<Option<DeviceStepRouting>> {
        if step == 3 {
            return Ok(None);
        }
        self.inner.route_device(step, h, active, state, mode)
    }
    fn finish_pending(&self, state: RoutingState) -> Result<RouterOutput> {
        self.inner.finish_pending(state)
    }
}

#[test]
fn a_step_handed_back_to_the_host_sees_only_the_tokens_that_ran_the_last_one() {
    let cfg = Micro {
        runtime: "seed = 4",
        tables: &format!(
            "{MOR_RECURSION}\n[router]\nkind = \"{}\"\nrouting_path = \"device\"",
            HostStepThree::NAME
        ),
        ..common::micro(64, 32, 5, 16)
    }
    .resolve();
    let ids = common::id_tensor(3, 16, 64, 5);
    let model = mor_models::model::MorModel::new(&cfg).unwrap();
    SEEN.lock().unwrap().clear();
    let out = model.forward(&ids, RouteMode::Train).unwrap();
    // The tokens that ran step 2 are those of depth >= 2 (token choice fixes depths up
    // front); the host rows of step 3 must be exactly them, ascending.
    let want: Vec<Vec<u32>> = out
        .depths
        .iter()
        .map(|row| {
            (0..row.len() as u32)
                .filter(|&p| row[p as usize] >= 2)
                .collect()
        })
        .collect();
    assert!(
        want.iter().any(|r| r.len() < 16),
        "some token must stop after step 1 for the check to mean anything"
    );
    assert_eq!(*SEEN.lock().unwrap(), want);
}
