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

/// The layer pattern of KV sharing in a vanilla model (spec §4: the paper also shares K/V
/// in Vanilla models with the `Seq`, `Cyc` and `M-Cyc` patterns and a loop count; spec §9,
/// `kv.share_pattern`). The layers keep their own parameters; only the K/V are shared, along
/// the slot labels the named sharing strategy (spec §2) would give with `N_r = loops`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvSharePattern {
    /// `Seq`: groups of `loops` consecutive layers; the first of each group computes K/V
    /// and the other `loops − 1` reuse them (layer ℓ reads layer `⌊ℓ/loops⌋·loops`).
    Sequence,
    /// `Cyc`: the first `L/loops` layers compute K/V and layer ℓ reads layer
    /// `ℓ mod (L/loops)`.
    Cycle,
    /// `M-Cyc`: the first and last layers keep their own K/V; the `L−2` middle layers share
    /// as `Cyc` (layer ℓ reads layer `1 + (ℓ−1) mod ((L−2)/loops)`).
    MiddleCycle,
    /// The first and last layers keep their own K/V; the `L−2` middle layers share as `Seq`.
    MiddleSequence,
}

impl KvSharePattern {
    /// The values `kv.share_pattern` accepts (spec §9 spells Sequence `seq`).
    pub const ALLOWED: &'static str =
        "`seq` (or `sequence`), `cycle`, `middle_cycle`, `middle_sequence`, or `auto` (no sharing pattern)";

    /// Reads a `kv.share_pattern` value; `None` for an unknown one.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "seq" | "sequence" => Self::Sequence,
            "cycle" => Self::Cycle,
            "middle_cycle" => Self::MiddleCycle,
            "middle_sequence" => Self::MiddleSequence,
            _ => return None,
        })
    }

    /// The sharing strategy (spec §2) whose slot labels the pattern uses.
    pub fn strategy(self) -> &'static str {
        match self {
            Self::Sequence => "sequence",
            Self::Cycle => "cycle",
            Self::MiddleCycle => "middle_cycle",
            Self::MiddleSequence => "middle_sequence",
        }
    }

    /// Whether the first and last layers stay outside the pattern.
    pub fn is_middle(self) -> bool {
        matches!(self, Self::MiddleCycle | Self::MiddleSequence)
    }
}

/// KV sharing in a vanilla model: `loops` layers read the K/V of one (spec §4, §9
/// `kv.share_pattern`, `kv.share_loops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvShare {
    /// The pattern.
    pub pattern: KvSharePattern,
    /// Layers per shared K/V (the loop count, >= 2).
    pub loops: usize,
}

impl KvShare {
    /// The plan of a vanilla model of `num_layers` unique layers whose K/V are shared by
    /// this pattern: the slots carry the (step, layer) labels of the pattern's strategy with
    /// `N_r = loops` (spec §2), every slot keeps its own block (`block = slot`), so that a
    /// KV policy that reuses step-1 K/V (spec §4) makes slot (step r >= 2, layer j) read the
    /// K/V of slot (step 1, layer j). The layer count is not changed: the layers the pattern
    /// groups (`L`, or `L − 2` for the Middle patterns) must divide by `loops`.
    ///
    /// # Errors
    /// A sentence when `loops < 2` or the layers do not divide.
    ///
    /// # Examples
    /// ```
    /// use mor_core::plan::{KvShare, KvSharePattern, Segment};
    /// // Vanilla 6 layers, Cyc2: layers 3, 4, 5 read the K/V of layers 0, 1, 2.
    /// let plan = KvShare { pattern: KvSharePattern::Cycle, loops: 2 }.vanilla_plan(6)?;
    /// let blocks: Vec<usize> = plan.slots.iter().map(|s| s.block).collect();
    /// assert_eq!(blocks, [0, 1, 2, 3, 4, 5]);
    /// assert_eq!(plan.slots[4].segment, Segment::Recursion { step: 2, layer: 1 });
    /// # Ok::<(), String>(())
    /// ```
    pub fn vanilla_plan(&self, num_layers: usize) -> Result<RecursionPlan, String> {
        let loops = self.loops;
        if loops < 2 {
            return Err(format!(
                "share_loops = {loops}: KV sharing needs at least 2 layers per shared K/V"
            ));
        }
        let grouped = if self.pattern.is_middle() {
            if num_layers < 3 {
                return Err(format!(
                    "pattern `{}` keeps the first and last layers apart and needs at least 3 layers; \
                     got num_layers = {num_layers}",
                    self.pattern.strategy()
                ));
            }
            num_layers - 2
        } else {
            num_layers
        };
        if grouped < loops || !grouped.is_multiple_of(loops) {
            return Err(format!(
                "share_loops = {loops} does not divide the {grouped} layers the `{}` pattern groups",
                self.pattern.strategy()
            ));
        }
        let req = PlanRequest {
            num_layers,
            num_recursions: loops,
            depth_fix: DepthFix::Subsample,
        };
        let mut plan = crate::sharing::plan(self.pattern.strategy(), &toml::Table::new(), &req)
            .map_err(|e| e.to_string())?;
        for (i, s) in plan.slots.iter_mut().enumerate() {
            s.block = i;
        }
        plan.num_blocks = plan.slots.len();
        plan.strategy = format!("none+kv_{}{loops}", self.pattern.strategy());
        plan.validate()?;
        if plan.num_slots() != num_layers {
            return Err(format!(
                "the `{}` pattern planned {} layers for num_layers = {num_layers}",
                self.pattern.strategy(),
                plan.num_slots()
            ));
        }
        Ok(plan)
    }
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

    /// Per block, whether the model computes K/V with its K/V projections. Every block
    /// does, except, when `later_steps_share` (the KV policy makes steps >= 2 reuse the
    /// step-1 K/V and project none, spec §4), a block whose every slot is at a recursion
    /// step >= 2: its K/V projections are never used. Only vanilla KV sharing
    /// ([`KvShare::vanilla_plan`]) has such blocks; a recursive plan runs every block at
    /// step 1 or outside the recursion.
    pub fn kv_projecting_blocks(&self, later_steps_share: bool) -> Vec<bool> {
        let mut out = vec![false; self.num_blocks];
        for s in &self.slots {
            let projects = match s.segment {
                Segment::Recursion { step, .. } => step == 1 || !later_steps_share,
                Segment::Prelude | Segment::Coda => true,
            };
            if let Some(b) = out.get_mut(s.block) {
                *b |= projects;
            }
        }
        out
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
