//! The integration tests of `mor-router`, one binary:
//! - `common`: shared test utilities (a context, a forward driver, a finite-difference checker);
//! - `expert`: expert-choice selection against a naive reference, causal independence,
//!   gradients of gates and losses;
//! - `token`: token-choice depths, gates and losses against naive references, loss-free
//!   bias dynamics, warm-up and buffers;
//! - `params`: parameter parsing, checks and the registry;
//! - `metrics`: closed-form values of the router metrics.

// The routers register themselves through `inventory`; naming the crate links it.
use mor_router as _;

mod common;
mod device_path;
mod expert;
mod metrics;
mod params;
mod token;
mod token_device;
