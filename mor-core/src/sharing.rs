//! Parameter sharing strategies (spec §2): the [`SharingStrategy`] trait, its registry
//! entry and macro, and the built-in strategies `none`, `cycle`, `sequence`,
//! `middle_cycle` and `middle_sequence`.

use crate::plan::{PlanRequest, RecursionPlan};
use crate::registry::{Family, Plugin};
use std::fmt;

/// Maps unrolled layer slots onto unique parameter blocks.
///
/// # Contract
/// `plan` must give every slot exactly one block in `0..num_blocks`, use every block at
/// least once, and mark slots as prelude / recursion / coda. It returns an error (never
/// panics) when the request cannot be planned (e.g. `N_r` larger than the layers allow).
///
/// # Examples
/// ```
/// use mor_core::plan::{DepthFix, PlanRequest, Segment};
///
/// // Middle-Cycle, 9 layers, N_r = 3 (spec §2): unique first and last layers around a
/// // shared block of (9 - 2) / 3 -> 3 layers (add_layers rounds up: 1 + 3·3 + 1 = 11 slots).
/// let req = PlanRequest { num_layers: 9, num_recursions: 3, depth_fix: DepthFix::AddLayers };
/// let plan = mor_core::sharing::plan("middle_cycle", &toml::Table::new(), &req)?;
/// let blocks: Vec<usize> = plan.slots.iter().map(|s| s.block).collect();
/// assert_eq!(blocks, [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4]);
/// assert_eq!(plan.slots[0].segment, Segment::Prelude);
/// assert_eq!(plan.slots[4].segment, Segment::Recursion { step: 2, layer: 0 });
/// # Ok::<(), mor_core::Error>(())
/// ```
pub trait SharingStrategy: Send + Sync + fmt::Debug {
    /// The registered name.
    fn name(&self) -> &'static str;
    /// Plans the unrolled stack.
    fn plan(&self, req: &PlanRequest) -> Result<RecursionPlan, String>;
}

/// A registrable sharing strategy.
pub trait SharingPlugin: SharingStrategy + Plugin + Sized {
    /// Builds the strategy from its typed parameters.
    fn build(params: Self::Params) -> Self;
}

/// Typed registry entry of the sharing family.
#[derive(Clone, Copy)]
pub struct SharingEntry {
    /// Registered name.
    pub name: &'static str,
    /// Builds the strategy from its (validated) parameter table.
    pub build: fn(&toml::Table) -> Result<Box<dyn SharingStrategy>, String>,
}

impl fmt::Debug for SharingEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharingEntry")
            .field("name", &self.name)
            .finish()
    }
}

fn build_erased<T: SharingPlugin>(p: &toml::Table) -> Result<Box<dyn SharingStrategy>, String> {
    let params: T::Params = crate::registry::parse_params(p)?;
    Ok(Box::new(T::build(params)))
}

impl SharingEntry {
    /// The entry for `T`.
    pub const fn of<T: SharingPlugin>() -> Self {
        SharingEntry {
            name: T::NAME,
            build: build_erased::<T>,
        }
    }
}

inventory::collect!(SharingEntry);

/// Registers a [`SharingPlugin`] by its `NAME`.
#[macro_export]
macro_rules! register_sharing {
    ($ty:ty) => {
        $crate::__private::inventory::submit! {
            $crate::__private::PluginInfo::of::<$ty>(env!("CARGO_PKG_NAME"), module_path!())
        }
        $crate::__private::inventory::submit! {
            $crate::sharing::SharingEntry::of::<$ty>()
        }
    };
}

/// Builds the registered sharing strategy `name` from its parameters.
pub fn build(name: &str, params: &toml::Table) -> crate::Result<Box<dyn SharingStrategy>> {
    let e = crate::registry::find_typed(
        Family::SharingStrategy,
        name,
        inventory::iter::<SharingEntry>,
        |e| e.name,
    )?;
    (e.build)(params).map_err(|msg| crate::Error::Plugin {
        family: Family::SharingStrategy,
        name: name.to_string(),
        msg,
    })
}

// The built-in strategies are implemented below (see `strategies`).
mod strategies;
#[allow(unused_imports)]
pub use strategies::*;

/// Builds the registered strategy `name` from `params`, plans `req` with it and checks the
/// plan against the [`SharingStrategy`] contract ([`RecursionPlan::validate`]).
///
/// # Errors
/// [`Error::Registry`](crate::Error::Registry) for an unknown name, [`Error::Plugin`](crate::Error::Plugin)
/// for bad parameters, [`Error::Plan`](crate::Error::Plan) when the request cannot be planned.
pub fn plan(name: &str, params: &toml::Table, req: &PlanRequest) -> crate::Result<RecursionPlan> {
    let strategy = build(name, params)?;
    let plan = strategy.plan(req).map_err(crate::Error::Plan)?;
    plan.validate().map_err(crate::Error::Plan)?;
    Ok(plan)
}
