//! Plugins from a crate the binary does not link are unknown, with an error that lists the
//! registered names and says how to link the crate; with the `example-plugins` feature the
//! example crate's `entropy_router` and `strided_kv` resolve by name.
//!
//! The xtask binary under test is built with the same features as this test, so the
//! default build checks the error and `--features example-plugins` checks the success.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(root())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("xtask runs")
}

const PLAN: [&str; 7] = [
    "plan",
    "--config",
    "configs/tiny.toml",
    "--set",
    "router.kind=entropy_router",
    "--set",
    "kv.kind=strided_kv",
];

#[cfg(not(feature = "example-plugins"))]
#[test]
fn an_unlinked_plugin_is_unknown_with_a_helpful_error() {
    let out = xtask(&PLAN);
    assert!(
        !out.status.success(),
        "plan should fail without the example crate"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "`router.kind` = \"entropy_router\": unknown router `entropy_router`; registered router plugins: expert_choice, token_choice.",
        "`kv.kind` = \"strided_kv\": unknown kv_policy `strided_kv`; registered ",
        ": hybrid, recursion_wise, recursive_sharing.",
        "A plugin from another crate is only visible when that crate is linked: add `use <plugin_crate> as _;` to your binary or test",
        "\"Writing your own strategy\"",
    ] {
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    }

    // The grid of the example resolves every run before training any, so it fails at once.
    let out = xtask(&[
        "ablate",
        "--grid",
        "configs/grids/entropy.toml",
        "--dry-run",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown router `entropy_router`"), "{err}");
    assert!(err.contains("unknown kv_policy `strided_kv`"), "{err}");

    let out = xtask(&["list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !listed.contains("entropy_router"),
        "{listed}"
    );
}

#[cfg(feature = "example-plugins")]
#[test]
fn a_linked_plugin_resolves_and_is_listed_with_its_crate() {
    let out = xtask(&PLAN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = xtask(&["list", "--json"]);
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for (family, name) in [("router", "entropy_router"), ("kv_policy", "strided_kv")] {
        let entry = listed
            .as_array()
            .expect("an array")
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {listed}"));
        assert_eq!(entry["family"], family);
        assert_eq!(entry["crate"], "mor-example-entropy-router");
    }

    let out = xtask(&[
        "ablate",
        "--grid",
        "configs/grids/entropy.toml",
        "--dry-run",
    ]);
    let runs = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "router=entropy_router",
        "kv=strided_kv",
        "router=expert_choice",
    ] {
        assert!(runs.contains(needle), "`{needle}` not in:\n{runs}");
    }
}
