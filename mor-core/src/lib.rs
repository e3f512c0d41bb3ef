//! Contracts shared by every mor crate.
//!
//! - [`registry`]: the plugin machinery over `inventory` for the four plugin families
//!   (Router, SharingStrategy, KvPolicy, Backend);
//! - [`sharing`]: the [`SharingStrategy`](sharing::SharingStrategy) trait, the paper's
//!   strategies and the [`RecursionPlan`](plan::RecursionPlan) they produce;
//! - [`config`]: the run configuration (TOML), resolved in three stages;
//! - [`accounting`]: parameter and FLOPs accounting of spec §1.4;
//! - [`rng`]: a small seedable, serialisable RNG used for every random draw in mor.

#![warn(missing_docs)]

pub mod accounting;
pub mod config;
pub mod error;
pub mod plan;
pub mod registry;
pub mod rng;
pub mod sharing;

pub use error::{Error, Result};
pub use registry::{Family, Plugin, PluginInfo};

/// Items the `register_*!` macros of the family crates reach through `$crate::__private`,
/// so plugin authors need no direct `inventory` dependency.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::PluginInfo;
    pub use inventory;
}
