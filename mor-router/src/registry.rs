//! Registry entry and macro of the Router family.

use crate::{Result, Router};
use mor_core::registry::{Family, Plugin};
use std::fmt;
use std::sync::Arc;

/// What a router is built with.
#[derive(Debug, Clone)]
pub struct RouterCtx {
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// Recursion steps `N_r`.
    pub num_recursions: usize,
    /// Training sequence length `L`.
    pub seq_len: usize,
    /// Std of the N(0, std²) initialisation of router weights (spec §1.1: 0.02).
    pub init_std: f64,
    /// Seed for initialisation (draw with `mor_core::rng::Rng::derive(seed, name)`).
    pub seed: u64,
    /// Device.
    pub device: candle_core::Device,
    /// Compute backend.
    pub backend: Arc<dyn mor_kernels::Backend>,
}

/// A registrable router.
pub trait RouterPlugin: Router + Plugin + Sized {
    /// Builds the router (initialising its parameters) from its typed parameters.
    fn build(params: Self::Params, ctx: &RouterCtx) -> Result<Self>;
}

/// Typed registry entry of the router family.
#[derive(Clone, Copy)]
pub struct RouterEntry {
    /// Registered name.
    pub name: &'static str,
    /// Builds the router from its validated parameters.
    pub build: fn(&toml::Table, &RouterCtx) -> Result<Box<dyn Router>>,
}

impl fmt::Debug for RouterEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterEntry").field("name", &self.name).finish()
    }
}

fn build_erased<T: RouterPlugin>(p: &toml::Table, ctx: &RouterCtx) -> Result<Box<dyn Router>> {
    let params: T::Params = mor_core::registry::parse_params(p).map_err(|msg| mor_core::Error::Plugin {
        family: Family::Router,
        name: T::NAME.to_string(),
        msg,
    })?;
    Ok(Box::new(T::build(params, ctx)?))
}

impl RouterEntry {
    /// The entry for `T`.
    pub const fn of<T: RouterPlugin>() -> Self {
        RouterEntry { name: T::NAME, build: build_erased::<T> }
    }
}

inventory::collect!(RouterEntry);

/// Registers a [`RouterPlugin`] by its `NAME`.
#[macro_export]
macro_rules! register_router {
    ($ty:ty) => {
        $crate::__private::inventory::submit! {
            $crate::__private::PluginInfo::of::<$ty>(env!("CARGO_PKG_NAME"), module_path!())
        }
        $crate::__private::inventory::submit! {
            $crate::RouterEntry::of::<$ty>()
        }
    };
}

/// Builds the registered router `name`.
pub fn build_router(name: &str, params: &toml::Table, ctx: &RouterCtx) -> Result<Box<dyn Router>> {
    let e = mor_core::registry::find_typed(Family::Router, name, inventory::iter::<RouterEntry>, |e| e.name)
        .map_err(mor_core::Error::from)?;
    (e.build)(params, ctx)
}
