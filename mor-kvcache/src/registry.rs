//! Registry entry and macro of the KvPolicy family.

use crate::{KvPolicy, Result};
use mor_core::registry::{Family, Plugin};
use std::fmt;
use std::sync::Arc;

/// What a KV policy is built with.
#[derive(Debug, Clone)]
pub struct KvCtx {
    /// Recursion steps `N_r`.
    pub num_recursions: usize,
    /// Compute backend.
    pub backend: Arc<dyn mor_kernels::Backend>,
}

/// A registrable KV policy.
pub trait KvPolicyPlugin: KvPolicy + Plugin + Sized {
    /// Builds the policy from its typed parameters.
    fn build(params: Self::Params, ctx: &KvCtx) -> Result<Self>;
}

/// Typed registry entry of the KV-policy family.
#[derive(Clone, Copy)]
pub struct KvEntry {
    /// Registered name.
    pub name: &'static str,
    /// Builds the policy from its validated parameters.
    pub build: fn(&toml::Table, &KvCtx) -> Result<Arc<dyn KvPolicy>>,
}

impl fmt::Debug for KvEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvEntry").field("name", &self.name).finish()
    }
}

fn build_erased<T: KvPolicyPlugin>(p: &toml::Table, ctx: &KvCtx) -> Result<Arc<dyn KvPolicy>> {
    let params: T::Params =
        mor_core::registry::parse_params(p).map_err(|msg| mor_core::Error::Plugin {
            family: Family::KvPolicy,
            name: T::NAME.to_string(),
            msg,
        })?;
    Ok(Arc::new(T::build(params, ctx)?))
}

impl KvEntry {
    /// The entry for `T`.
    pub const fn of<T: KvPolicyPlugin>() -> Self {
        KvEntry {
            name: T::NAME,
            build: build_erased::<T>,
        }
    }
}

inventory::collect!(KvEntry);

/// Registers a [`KvPolicyPlugin`] by its `NAME`.
#[macro_export]
macro_rules! register_kv_policy {
    ($ty:ty) => {
        $crate::__private::inventory::submit! {
            $crate::__private::PluginInfo::of::<$ty>(env!("CARGO_PKG_NAME"), module_path!())
        }
        $crate::__private::inventory::submit! {
            $crate::KvEntry::of::<$ty>()
        }
    };
}

/// Builds the registered KV policy `name`.
pub fn build_kv_policy(name: &str, params: &toml::Table, ctx: &KvCtx) -> Result<Arc<dyn KvPolicy>> {
    let e =
        mor_core::registry::find_typed(Family::KvPolicy, name, inventory::iter::<KvEntry>, |e| {
            e.name
        })
        .map_err(mor_core::Error::from)?;
    (e.build)(params, ctx)
}
