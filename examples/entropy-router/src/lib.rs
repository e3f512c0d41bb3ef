//! A third-party strategy crate for mor: the `entropy_router` router and the `strided_kv`
//! KV policy.
//!
//! It shows everything a crate outside the workspace needs to add strategies that a config
//! selects by name:
//! - a type implementing the family trait ([`mor_router::Router`],
//!   [`mor_kvcache::KvPolicy`]), the family-independent [`mor_core::Plugin`] (name,
//!   description, typed `Params` with `deny_unknown_fields` and defaults, cross-field
//!   checks) and the family's plugin trait ([`mor_router::RouterPlugin`],
//!   [`mor_kvcache::KvPolicyPlugin`]) that builds it;
//! - one registration line next to each `impl`: `mor_router::register_router!(EntropyRouter)`
//!   and `mor_kvcache::register_kv_policy!(StridedKv)`.
//!
//! The crate depends only on `mor-core`, `mor-router`, `mor-kvcache`, `candle-core` and
//! `serde`, and uses only their public items.
//!
//! # Linking
//! `rustc` links a library only when something names it, and an unlinked crate registers
//! nothing. Every binary or test that should find these plugins by name writes, once:
//!
//! ```
//! use mor_example_entropy_router as _;
//!
//! let info = mor_core::registry::find(mor_core::Family::Router, "entropy_router").unwrap();
//! assert_eq!(info.crate_name, "mor-example-entropy-router");
//! ```
//!
//! In this workspace `cargo xtask` links it behind the feature `example-plugins`:
//! `cargo run --release -p xtask --features example-plugins -- list`.
//!
//! # Config
//! ```toml
//! [router]
//! kind = "entropy_router"
//! num_codes = 4
//! alpha = 0.1
//!
//! [kv]
//! kind = "strided_kv"
//! stride = 4
//! ```

pub mod kv;
pub mod router;

pub use kv::{StridedCache, StridedKv, StridedKvParams};
pub use router::{EntropyParams, EntropyRouter};
