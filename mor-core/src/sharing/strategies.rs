//! The built-in sharing strategies of spec §2: `none` (vanilla), `cycle`, `sequence`,
//! `middle_cycle` and `middle_sequence`.
//!
//! Every strategy unrolls `L_eff` layer slots and maps slot ℓ to a unique block `j(ℓ)`
//! (spec §2, "Unique-layer mapping"):
//!
//! | strategy | mapping (0-based ℓ) | base depth `B_d` |
//! |---|---|---|
//! | `cycle` | `j = ℓ mod B_d` | `L / N_r` |
//! | `sequence` | `j = ⌊ℓ / N_r⌋` | `L / N_r` |
//! | `middle_cycle` | `0 → 0`, `L_eff−1 → B_d+1`, else `((ℓ−1) mod B_d) + 1` | `(L−2) / N_r` |
//! | `middle_sequence` | `0 → 0`, `L_eff−1 → B_d+1`, else `⌊(ℓ−1)/N_r⌋ + 1` | `(L−2) / N_r` |
//!
//! When the layer count does not divide by `N_r`, [`DepthFix::AddLayers`] rounds `B_d` up
//! (the paper's main and isoFLOP runs: 360m with `N_r = 4` becomes `1+8×4+1 = 34` layers)
//! and [`DepthFix::Subsample`] rounds it down (the reference code: 135m with `N_r = 3`
//! becomes `1+9×3+1 = 29` layers).

use crate::plan::{DepthFix, PlanRequest, RecursionPlan, Segment, Slot};
use crate::registry::{Family, Plugin};
use crate::sharing::{SharingPlugin, SharingStrategy};
use serde::{Deserialize, Serialize};

/// Parameters of the built-in strategies: there are none, and any field is rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Base depth `B_d` of `layers` layers (the part that recurses) split into `n_r` steps
/// under `fix` (spec §2, "Non-divisible depth").
///
/// # Errors
/// When `n_r` is 0 or larger than `layers` (no step could hold a layer).
pub fn base_depth(layers: usize, n_r: usize, fix: DepthFix) -> Result<usize, String> {
    if n_r == 0 {
        return Err("num_recursions must be at least 1".to_string());
    }
    if layers == 0 {
        return Err("the recursive part has no layers".to_string());
    }
    if n_r > layers {
        return Err(format!(
            "num_recursions = {n_r} does not fit {layers} recursive layer{}: each recursion step needs at \
             least one layer (allowed: 1..={layers})",
            if layers == 1 { "" } else { "s" }
        ));
    }
    Ok(match fix {
        DepthFix::AddLayers => layers.div_ceil(n_r),
        DepthFix::Subsample => layers / n_r,
    })
}

/// Recursion part of a cyclic stack: step r runs layers `0..B_d` in order.
fn cycle_slots(b_d: usize, n_r: usize, block_offset: usize) -> impl Iterator<Item = Slot> {
    (1..=n_r).flat_map(move |step| {
        (0..b_d).map(move |layer| Slot {
            block: block_offset + layer,
            segment: Segment::Recursion { step, layer },
        })
    })
}

/// Recursion part of a sequence stack: slot ℓ' repeats block `⌊ℓ'/N_r⌋`, and counts as
/// layer `⌊ℓ'/N_r⌋` of step `(ℓ' mod N_r) + 1`.
fn sequence_slots(b_d: usize, n_r: usize, block_offset: usize) -> impl Iterator<Item = Slot> {
    (0..b_d * n_r).map(move |l| Slot {
        block: block_offset + l / n_r,
        segment: Segment::Recursion {
            step: l % n_r + 1,
            layer: l / n_r,
        },
    })
}

/// Builds a plan for a strategy whose whole depth recurses (`cycle`, `sequence`).
fn plan_full(name: &str, req: &PlanRequest, sequence: bool) -> Result<RecursionPlan, String> {
    let n_r = req.num_recursions;
    let b_d = base_depth(req.num_layers, n_r, req.depth_fix)?;
    let slots: Vec<Slot> = if sequence {
        sequence_slots(b_d, n_r, 0).collect()
    } else {
        cycle_slots(b_d, n_r, 0).collect()
    };
    Ok(RecursionPlan {
        strategy: name.to_string(),
        num_recursions: n_r,
        base_depth: b_d,
        num_blocks: b_d,
        requested_layers: req.num_layers,
        depth_fix: req.depth_fix,
        slots,
    })
}

/// Builds a plan for a Middle-* strategy: a unique first layer, the recursion, a unique
/// last layer.
fn plan_middle(name: &str, req: &PlanRequest, sequence: bool) -> Result<RecursionPlan, String> {
    let n_r = req.num_recursions;
    if req.num_layers < 3 {
        return Err(format!(
            "{name} needs at least 3 layers (a unique first layer, at least one shared layer and a unique \
             last layer); got num_layers = {}",
            req.num_layers
        ));
    }
    let b_d = base_depth(req.num_layers - 2, n_r, req.depth_fix)?;
    let mut slots = Vec::with_capacity(b_d * n_r + 2);
    slots.push(Slot {
        block: 0,
        segment: Segment::Prelude,
    });
    if sequence {
        slots.extend(sequence_slots(b_d, n_r, 1));
    } else {
        slots.extend(cycle_slots(b_d, n_r, 1));
    }
    slots.push(Slot {
        block: b_d + 1,
        segment: Segment::Coda,
    });
    Ok(RecursionPlan {
        strategy: name.to_string(),
        num_recursions: n_r,
        base_depth: b_d,
        num_blocks: b_d + 2,
        requested_layers: req.num_layers,
        depth_fix: req.depth_fix,
        slots,
    })
}

/// Vanilla: no sharing. `N_r` must be 1; every slot has its own block, and the whole
/// stack counts as one recursion step of `num_layers` layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSharing;

impl Plugin for NoSharing {
    const FAMILY: Family = Family::SharingStrategy;
    const NAME: &'static str = "none";
    const DESCRIPTION: &'static str =
        "Vanilla: no parameter sharing, N_r = 1, every layer its own block";
    type Params = NoParams;
}

impl SharingStrategy for NoSharing {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String> {
        if req.num_recursions != 1 {
            return Err(format!(
                "sharing `none` (vanilla) needs num_recursions = 1, got {}; choose a sharing strategy \
                 (cycle, sequence, middle_cycle, middle_sequence) to recurse",
                req.num_recursions
            ));
        }
        if req.num_layers == 0 {
            return Err("num_layers must be at least 1".to_string());
        }
        let slots = (0..req.num_layers)
            .map(|i| Slot {
                block: i,
                segment: Segment::Recursion { step: 1, layer: i },
            })
            .collect();
        Ok(RecursionPlan {
            strategy: Self::NAME.to_string(),
            num_recursions: 1,
            base_depth: req.num_layers,
            num_blocks: req.num_layers,
            requested_layers: req.num_layers,
            depth_fix: req.depth_fix,
            slots,
        })
    }
}

impl SharingPlugin for NoSharing {
    fn build(_params: NoParams) -> Self {
        NoSharing
    }
}

register_sharing!(NoSharing);

/// Cycle: the whole stack of `B_d` layers repeats `N_r` times, `j = ℓ mod B_d`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cycle;

impl Plugin for Cycle {
    const FAMILY: Family = Family::SharingStrategy;
    const NAME: &'static str = "cycle";
    const DESCRIPTION: &'static str =
        "Cycle: the block of B_d = L/N_r layers repeats N_r times, j = l mod B_d";
    type Params = NoParams;
}

impl SharingStrategy for Cycle {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String> {
        plan_full(Self::NAME, req, false)
    }
}

impl SharingPlugin for Cycle {
    fn build(_params: NoParams) -> Self {
        Cycle
    }
}

register_sharing!(Cycle);

/// Sequence: each unique layer repeats `N_r` times in a row, `j = ⌊ℓ / N_r⌋`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sequence;

impl Plugin for Sequence {
    const FAMILY: Family = Family::SharingStrategy;
    const NAME: &'static str = "sequence";
    const DESCRIPTION: &'static str =
        "Sequence: each of B_d = L/N_r layers repeats N_r times in a row, j = l / N_r";
    type Params = NoParams;
}

impl SharingStrategy for Sequence {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String> {
        plan_full(Self::NAME, req, true)
    }
}

impl SharingPlugin for Sequence {
    fn build(_params: NoParams) -> Self {
        Sequence
    }
}

register_sharing!(Sequence);

/// Middle-Cycle (the paper's choice for every MoR and Recursive model): unique first and
/// last layers around a cycle of `B_d = (L−2)/N_r` layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct MiddleCycle;

impl Plugin for MiddleCycle {
    const FAMILY: Family = Family::SharingStrategy;
    const NAME: &'static str = "middle_cycle";
    const DESCRIPTION: &'static str =
        "Middle-Cycle: unique first and last layers around a cycle of B_d = (L-2)/N_r layers (the paper's choice)";
    type Params = NoParams;
}

impl SharingStrategy for MiddleCycle {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String> {
        plan_middle(Self::NAME, req, false)
    }
}

impl SharingPlugin for MiddleCycle {
    fn build(_params: NoParams) -> Self {
        MiddleCycle
    }
}

register_sharing!(MiddleCycle);

/// Middle-Sequence: unique first and last layers around `B_d = (L−2)/N_r` layers, each
/// repeated `N_r` times in a row.
#[derive(Debug, Clone, Copy, Default)]
pub struct MiddleSequence;

impl Plugin for MiddleSequence {
    const FAMILY: Family = Family::SharingStrategy;
    const NAME: &'static str = "middle_sequence";
    const DESCRIPTION: &'static str =
        "Middle-Sequence: unique first and last layers around B_d = (L-2)/N_r layers, each repeated N_r times in a row";
    type Params = NoParams;
}

impl SharingStrategy for MiddleSequence {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String> {
        plan_middle(Self::NAME, req, true)
    }
}

impl SharingPlugin for MiddleSequence {
    fn build(_params: NoParams) -> Self {
        MiddleSequence
    }
}

register_sharing!(MiddleSequence);

#[cfg(test)]
#[path = "strategies_tests.rs"]
mod tests;
