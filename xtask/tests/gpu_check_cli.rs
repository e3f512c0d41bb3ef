//! `cargo xtask gpu-check` in a build without the `cuda` feature: it fails at once with the
//! message of `backend.kind = "cuda"` in such a build (the feature flag, the command, the
//! cpu alternative), writes nothing, and never panics.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn gpu_check_without_the_feature_names_the_flag_and_writes_nothing() {
    if mor_kernels::cuda::COMPILED {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mor-gpu-check-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for full in [true, false] {
        let out = dir.join(format!("report-{full}.json"));
        let mut args = vec!["gpu-check", "--out", out.to_str().unwrap()];
        if full {
            args.push("--full");
        }
        let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(&args)
            .current_dir(root())
            .output()
            .expect("xtask runs");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("--features cuda")
                && stderr.contains("-p xtask")
                && stderr.contains("backend.kind = \"cpu\""),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "{} was written", out.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
