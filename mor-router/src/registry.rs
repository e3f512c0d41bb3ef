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
    /// Dtype of the router parameters and of the router's own arithmetic (scores, gates,
    /// losses): `F32` for training (master weights in f32, spec §9 "Implementation notes"),
    /// `F64` for finite-difference tests. Hidden states of another dtype are converted on
    /// entry and gates are returned in the dtype of the hidden states.
    pub dtype: candle_core::DType,
}

impl RouterCtx {
    /// A context with the spec's defaults: `init_std = 0.02` (spec §1.1), seed 0 and f32
    /// parameters.
    pub fn new(
        hidden_size: usize,
        num_recursions: usize,
        seq_len: usize,
        device: candle_core::Device,
        backend: Arc<dyn mor_kernels::Backend>,
    ) -> Self {
        RouterCtx {
            hidden_size,
            num_recursions,
            seq_len,
            init_std: 0.02,
            seed: 0,
            device,
            backend,
            dtype: candle_core::DType::F32,
        }
    }

    /// The facts a parameter check needs, taken from this context.
    pub fn check_ctx(&self, router: &str) -> mor_core::registry::CheckCtx {
        mor_core::registry::CheckCtx {
            num_recursions: self.num_recursions,
            seq_len: self.seq_len,
            hidden_size: self.hidden_size,
            router: Some(router.to_string()),
            sharing: String::new(),
        }
    }
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
        f.debug_struct("RouterEntry")
            .field("name", &self.name)
            .finish()
    }
}

fn build_erased<T: RouterPlugin>(p: &toml::Table, ctx: &RouterCtx) -> Result<Box<dyn Router>> {
    let params: T::Params =
        mor_core::registry::parse_params(p).map_err(|msg| mor_core::Error::Plugin {
            family: Family::Router,
            name: T::NAME.to_string(),
            msg,
        })?;
    Ok(Box::new(T::build(params, ctx)?))
}

impl RouterEntry {
    /// The entry for `T`.
    pub const fn of<T: RouterPlugin>() -> Self {
        RouterEntry {
            name: T::NAME,
            build: build_erased::<T>,
        }
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
    let e =
        mor_core::registry::find_typed(Family::Router, name, inventory::iter::<RouterEntry>, |e| {
            e.name
        })
        .map_err(mor_core::Error::from)?;
    (e.build)(params, ctx)
}
