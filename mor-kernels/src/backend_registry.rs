//! Registry entry and macro of the Backend family.

use crate::{Backend, Result};
use candle_core::Device;
use mor_core::config::Precision;
use mor_core::registry::{Family, Plugin};
use std::fmt;
use std::sync::Arc;

/// What a backend is built with.
///
/// Built with [`BackendCtx::new`] (and [`BackendCtx::with_precision`]), so that fields can be
/// added without breaking third-party backends.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BackendCtx {
    /// Device requested by the run (`Device::Cpu` unless a GPU run asks otherwise).
    pub device: Device,
    /// Numeric precision of the run's products (`train.precision`). A backend that does not
    /// implement a precision refuses it in `build`, naming the backends that do.
    pub precision: Precision,
}

impl BackendCtx {
    /// A context on `device`, in f32.
    pub fn new(device: Device) -> Self {
        BackendCtx {
            device,
            precision: Precision::F32,
        }
    }

    /// The same context with `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// `Err` naming `backend` and the backends that implement bf16, unless the context asks
    /// for f32.
    pub fn require_f32(&self, backend: &str) -> Result<()> {
        if self.precision == Precision::F32 {
            return Ok(());
        }
        let alternative = match backend {
            "cpu" | "cuda" => "",
            _ => ", or backend.kind = \"cpu\" or \"cuda\"",
        };
        Err(crate::Error::Invalid {
            op: "build",
            msg: format!(
                "train.precision = \"{}\" is not implemented by the `{backend}` backend; \
                 use train.precision = \"f32\"{alternative}",
                self.precision.as_str()
            ),
        })
    }
}

/// A registrable backend.
pub trait BackendPlugin: Backend + Plugin + Sized {
    /// Builds the backend from its typed parameters.
    fn build(params: Self::Params, ctx: &BackendCtx) -> Result<Self>;
}

/// Typed registry entry of the backend family.
#[derive(Clone, Copy)]
pub struct BackendEntry {
    /// Registered name.
    pub name: &'static str,
    /// Builds the backend from its validated parameters.
    pub build: fn(&toml::Table, &BackendCtx) -> Result<Arc<dyn Backend>>,
}

impl fmt::Debug for BackendEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendEntry")
            .field("name", &self.name)
            .finish()
    }
}

fn build_erased<T: BackendPlugin>(p: &toml::Table, ctx: &BackendCtx) -> Result<Arc<dyn Backend>> {
    let params: T::Params =
        mor_core::registry::parse_params(p).map_err(|msg| mor_core::Error::Plugin {
            family: Family::Backend,
            name: T::NAME.to_string(),
            msg,
        })?;
    Ok(Arc::new(T::build(params, ctx)?))
}

impl BackendEntry {
    /// The entry for `T`.
    pub const fn of<T: BackendPlugin>() -> Self {
        BackendEntry {
            name: T::NAME,
            build: build_erased::<T>,
        }
    }
}

inventory::collect!(BackendEntry);

/// Registers a [`BackendPlugin`] by its `NAME`.
#[macro_export]
macro_rules! register_backend {
    ($ty:ty) => {
        $crate::__private::inventory::submit! {
            $crate::__private::PluginInfo::of::<$ty>(env!("CARGO_PKG_NAME"), module_path!())
        }
        $crate::__private::inventory::submit! {
            $crate::BackendEntry::of::<$ty>()
        }
    };
}

/// Builds the registered backend `name`.
pub fn build_backend(
    name: &str,
    params: &toml::Table,
    ctx: &BackendCtx,
) -> Result<Arc<dyn Backend>> {
    let e = mor_core::registry::find_typed(
        Family::Backend,
        name,
        inventory::iter::<BackendEntry>,
        |e| e.name,
    )
    .map_err(mor_core::Error::from)?;
    (e.build)(params, ctx)
}
