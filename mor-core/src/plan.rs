//! The recursion plan: which unique parameter block each unrolled layer slot uses, and how
//! the slots split into prelude, recursion steps and coda (spec §2).

use serde::{Deserialize, Serialize};

/// How to handle a layer count that does not divide by `N_r` (spec §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DepthFix {
    /// Round the base depth up and add layers (the paper's main and isoFLOP runs,
    /// e.g. 34 layers for 360m with N_r = 4).
    #[default]
    AddLayers,
    /// Round the base depth down and drop layers (the reference code's auto-adjust,
    /// e.g. 29 layers for 135m with N_r = 3).
    Subsample,
}

/// Where a layer slot sits in the unrolled stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "segment", rename_all = "snake_case")]
pub enum Segment {
    /// A unique layer before the recursion (Middle-* strategies: the first layer).
    Prelude,
    /// Layer `layer` (0-based inside the shared block) of recursion step `step` (1-based).
    Recursion {
        /// Recursion step, 1-based.
        step: usize,
        /// Position inside the shared block, 0-based.
        layer: usize,
    },
    /// A unique layer after the recursion (Middle-* strategies: the last layer).
    Coda,
}

/// One unrolled layer slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Index of the unique parameter block this slot uses.
    pub block: usize,
    /// Where the slot sits.
    #[serde(flatten)]
    pub segment: Segment,
}

/// What a sharing strategy is asked to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRequest {
    /// Layer count of the model before any depth fix (e.g. 32 for 360m).
    pub num_layers: usize,
    /// Recursion steps `N_r` (>= 1).
    pub num_recursions: usize,
    /// How to handle a depth that does not divide.
    pub depth_fix: DepthFix,
}

/// The resolved plan of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecursionPlan {
    /// Name of the strategy that produced the plan.
    pub strategy: String,
    /// Recursion steps `N_r`.
    pub num_recursions: usize,
    /// Layers in the shared block `B_d`.
    pub base_depth: usize,
    /// Number of unique parameter blocks.
    pub num_blocks: usize,
    /// Layer count asked for before the depth fix.
    pub requested_layers: usize,
    /// Depth fix applied.
    pub depth_fix: DepthFix,
    /// The unrolled slots, in execution order (`L_eff` of them).
    pub slots: Vec<Slot>,
}

impl RecursionPlan {
    /// Effective (unrolled) number of layers `L_eff`.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    /// Blocks of the prelude slots, in order.
    pub fn prelude(&self) -> Vec<usize> {
        self.segment_blocks(|s| matches!(s, Segment::Prelude))
    }

    /// Blocks of the coda slots, in order.
    pub fn coda(&self) -> Vec<usize> {
        self.segment_blocks(|s| matches!(s, Segment::Coda))
    }

    /// Blocks run at recursion step `step` (1-based), in execution order.
    pub fn step_blocks(&self, step: usize) -> Vec<usize> {
        self.segment_blocks(|s| matches!(s, Segment::Recursion { step: r, .. } if *r == step))
    }

    /// True when every recursion step runs its layers as one contiguous run of slots, in
    /// step order (Cycle, Middle-Cycle). Routing (MoR) requires such a plan.
    pub fn is_cyclic(&self) -> bool {
        let rec: Vec<(usize, usize)> = self
            .slots
            .iter()
            .filter_map(|s| match s.segment {
                Segment::Recursion { step, layer } => Some((step, layer)),
                _ => None,
            })
            .collect();
        let expected: Vec<(usize, usize)> = (1..=self.num_recursions)
            .flat_map(|r| (0..self.base_depth).map(move |l| (r, l)))
            .collect();
        rec == expected
    }

    /// How many slots use each block (blocks out of range are not counted; see
    /// [`RecursionPlan::validate`]).
    pub fn block_uses(&self) -> Vec<usize> {
        let mut uses = vec![0; self.num_blocks];
        for s in &self.slots {
            if let Some(u) = uses.get_mut(s.block) {
                *u += 1;
            }
        }
        uses
    }

    /// Checks the [`SharingStrategy`](crate::sharing::SharingStrategy) contract: at least
    /// one slot, `N_r >= 1`, every slot's block in `0..num_blocks`, every block used, and
    /// every recursion slot's step in `1..=N_r` and layer in `0..B_d`.
    ///
    /// # Errors
    /// A sentence naming the first broken rule.
    pub fn validate(&self) -> Result<(), String> {
        if self.slots.is_empty() {
            return Err(format!(
                "strategy `{}` planned no layer slots",
                self.strategy
            ));
        }
        if self.num_recursions == 0 {
            return Err(format!(
                "strategy `{}` planned num_recursions = 0",
                self.strategy
            ));
        }
        for (i, s) in self.slots.iter().enumerate() {
            if s.block >= self.num_blocks {
                return Err(format!(
                    "strategy `{}`: slot {i} uses block {} but the plan has {} blocks",
                    self.strategy, s.block, self.num_blocks
                ));
            }
            if let Segment::Recursion { step, layer } = s.segment {
                if step == 0 || step > self.num_recursions || layer >= self.base_depth {
                    return Err(format!(
                        "strategy `{}`: slot {i} is marked step {step} layer {layer}, outside steps 1..={} \
                         and layers 0..{}",
                        self.strategy, self.num_recursions, self.base_depth
                    ));
                }
            }
        }
        if let Some(j) = self.block_uses().iter().position(|&u| u == 0) {
            return Err(format!(
                "strategy `{}`: block {j} is never used",
                self.strategy
            ));
        }
        Ok(())
    }

    fn segment_blocks(&self, f: impl Fn(&Segment) -> bool) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|s| f(&s.segment))
            .map(|s| s.block)
            .collect()
    }
}
