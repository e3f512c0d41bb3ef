//! The host-sync counter: how often host code reads tensor values, and how many of those
//! reads were device-to-host transfers.
//!
//! On a GPU every read of a tensor's values by host code (`to_vec*`, `to_scalar`, a copy
//! to the CPU) waits for the device and copies across the bus; a training step should make
//! at most one, for logging (mor-spec's routing, top-k and gathers all stay on the device).
//! Code of the backend, the routers and the model reads values through [`to_host`] (or
//! calls [`record`] next to its own transfer), and the counter tells:
//! - [`HostSyncs::reads`]: every such read, on any device. On CPU this counts the same
//!   logical transfers a GPU run makes, so a CPU test can bound the syncs of a step;
//! - [`HostSyncs::device_to_host`] and [`HostSyncs::bytes`]: the reads of tensors that
//!   were not on the CPU, i.e. the transfers actually made (zero for CPU-resident work).
//!
//! The fused ops of the `cuda` backend never read values on the host: their CPU bodies
//! read CPU tensors (no transfer, not counted), their kernels read device memory.
//!
//! Counts are kept per thread (the thread that runs the step), so concurrent tests and
//! runs do not disturb each other; take a [`Scope`] before the work and read it after.

use crate::Result;
use candle_core::{DType, Tensor, WithDType};
use std::cell::Cell;

/// Host reads counted on this thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostSyncs {
    /// Reads of tensor values by host code, on any device (logical syncs).
    pub reads: u64,
    /// Of those, the reads of tensors on a non-CPU device: actual device-to-host transfers.
    pub device_to_host: u64,
    /// Bytes copied by the device-to-host transfers.
    pub bytes: u64,
}

impl HostSyncs {
    /// `self − earlier`, field by field (saturating).
    pub fn since(self, earlier: HostSyncs) -> HostSyncs {
        HostSyncs {
            reads: self.reads.saturating_sub(earlier.reads),
            device_to_host: self.device_to_host.saturating_sub(earlier.device_to_host),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

thread_local! {
    static COUNTS: Cell<HostSyncs> = const { Cell::new(HostSyncs { reads: 0, device_to_host: 0, bytes: 0 }) };
}

/// Counts one host read of `t`'s values (call it where code transfers by itself).
pub fn record(t: &Tensor) {
    let on_device = !t.device().is_cpu();
    let bytes = if on_device {
        (t.elem_count() * t.dtype().size_in_bytes()) as u64
    } else {
        0
    };
    COUNTS.with(|c| {
        let mut v = c.get();
        v.reads += 1;
        if on_device {
            v.device_to_host += 1;
            v.bytes += bytes;
        }
        c.set(v);
    });
}

/// The counts of this thread so far.
pub fn snapshot() -> HostSyncs {
    COUNTS.with(Cell::get)
}

/// The values of `t` (any shape, flattened) on the host as `T`, counted as one read.
///
/// # Errors
/// A candle error (e.g. a dtype conversion it does not support).
pub fn to_host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    record(t);
    Ok(t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?)
}

/// The values of a float tensor as `f64` on the host, counted as one read.
///
/// # Errors
/// A candle error.
pub fn to_host_f64(t: &Tensor) -> Result<Vec<f64>> {
    to_host::<f64>(t)
}

/// The one value of a single-element tensor as `f64`, counted as one read.
///
/// # Errors
/// A tensor of other than one element; a candle error.
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    record(t);
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    match v[..] {
        [x] => Ok(x),
        _ => Err(crate::Error::Invalid {
            op: "scalar_f64",
            msg: format!("a tensor of shape {:?} is not one value", t.dims()),
        }),
    }
}

/// The counts from a starting point on this thread.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    start: HostSyncs,
}

impl Scope {
    /// Starts counting from now.
    pub fn start() -> Scope {
        Scope { start: snapshot() }
    }

    /// The reads since [`Scope::start`].
    pub fn counts(&self) -> HostSyncs {
        snapshot().since(self.start)
    }
}
