//! Links every built-in plugin crate, so that their registrations are visible to any binary
//! or test that depends on `mor-models`.
//!
//! `rustc` does not link an rlib that nothing names, and an unlinked crate contributes no
//! `inventory` entries (see `mor_core::registry`, "Linking"). Naming each crate here, and
//! calling [`link`] from a binary, makes the built-in routers (`mor-router`), KV policies
//! (`mor-kvcache`), backends (`mor-kernels`) and sharing strategies (`mor-core`) resolvable
//! by name.

use mor_kernels as _;
use mor_kvcache as _;
use mor_router as _;

/// The Cargo packages that register the built-in plugins.
pub const CRATES: [&str; 4] = ["mor-core", "mor-kernels", "mor-router", "mor-kvcache"];

/// Every built-in plugin name, by family: what `cargo xtask list` must show at least.
pub const EXPECTED: [(mor_core::Family, &[&str]); 4] = [
    (
        mor_core::Family::SharingStrategy,
        &[
            "none",
            "cycle",
            "sequence",
            "middle_cycle",
            "middle_sequence",
        ],
    ),
    (mor_core::Family::Router, &["expert_choice", "token_choice"]),
    (
        mor_core::Family::KvPolicy,
        &["recursion_wise", "recursive_sharing", "hybrid"],
    ),
    (mor_core::Family::Backend, &["reference", "cpu", "cuda"]),
];

/// Makes sure the built-in plugin crates are linked, and returns their package names.
///
/// Call it once from every binary that resolves plugins by name.
pub fn link() -> &'static [&'static str] {
    &CRATES
}

/// Expected built-in names that are not registered (empty when everything is linked).
pub fn missing() -> Vec<(mor_core::Family, &'static str)> {
    EXPECTED
        .iter()
        .flat_map(|(family, names)| {
            let registered = mor_core::registry::names(*family);
            names
                .iter()
                .filter(move |n| !registered.iter().any(|r| r == *n))
                .map(move |n| (*family, *n))
        })
        .collect()
}
