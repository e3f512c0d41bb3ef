//! Integration tests of `mor-kvcache`: training semantics, the cost table, the registry and
//! the decode-time caches.

// Links the crate's plugin registrations into this binary (see mor-core's registry docs).
use mor_kvcache as _;

mod common;
mod cost;
mod decode;
mod props;
mod registry;
mod training;
