//! A third-party sharing strategy for mor: `reverse_cycle`.
//!
//! It is Cycle (spec §2) with the shared block run backwards at every recursion step:
//! slot ℓ uses block `B_d − 1 − (ℓ mod B_d)`. It shows what a strategy crate needs: a type
//! implementing [`SharingStrategy`], [`Plugin`] and [`SharingPlugin`], registered with
//! [`mor_core::register_sharing!`] next to its impl. A binary or test finds it by name once
//! it names this crate (`use mor_example_custom_sharing as _;`).

use mor_core::plan::{PlanRequest, RecursionPlan, Segment, Slot};
use mor_core::registry::{Family, Plugin};
use mor_core::sharing::{base_depth, SharingPlugin, SharingStrategy};
use serde::{Deserialize, Serialize};

/// Parameters of [`ReverseCycle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReverseCycleParams {
    /// Run the first recursion step forwards and only later steps backwards.
    pub forward_first: bool,
}

/// Cycle with each recursion step running the shared block in reverse order.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReverseCycle {
    params: ReverseCycleParams,
}

impl Plugin for ReverseCycle {
    const FAMILY: Family = Family::SharingStrategy;
    const NAME: &'static str = "reverse_cycle";
    const DESCRIPTION: &'static str =
        "Cycle with the shared block run backwards at each step (an example plugin)";
    type Params = ReverseCycleParams;
}

impl SharingStrategy for ReverseCycle {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String> {
        let n_r = req.num_recursions;
        let b_d = base_depth(req.num_layers, n_r, req.depth_fix)?;
        let slots = (1..=n_r)
            .flat_map(|step| {
                (0..b_d).map(move |layer| {
                    let forward = step == 1 && self.params.forward_first;
                    let block = if forward { layer } else { b_d - 1 - layer };
                    Slot {
                        block,
                        segment: Segment::Recursion { step, layer },
                    }
                })
            })
            .collect();
        Ok(RecursionPlan {
            strategy: Self::NAME.to_string(),
            num_recursions: n_r,
            base_depth: b_d,
            num_blocks: b_d,
            requested_layers: req.num_layers,
            depth_fix: req.depth_fix,
            slots,
        })
    }
}

impl SharingPlugin for ReverseCycle {
    fn build(params: ReverseCycleParams) -> Self {
        ReverseCycle { params }
    }
}

mor_core::register_sharing!(ReverseCycle);
