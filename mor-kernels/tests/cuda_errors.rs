//! The errors a user meets when `backend.kind = "cuda"` cannot work: a build without the
//! `cuda` feature, no device. Each is one message naming the cause and the fix, never a
//! panic. (The mapping of driver error codes is unit-tested in `src/error.rs`.)

use candle_core::Device;
use mor_core::config::Precision;
use mor_kernels::{build_backend, cuda, BackendCtx, CudaCause, Error};

fn params(ordinal: Option<i64>) -> toml::Table {
    let mut t = toml::Table::new();
    if let Some(o) = ordinal {
        t.insert("ordinal".into(), toml::Value::Integer(o));
    }
    t
}

#[test]
fn cuda_without_the_feature_names_the_flag_whatever_the_config() {
    if cuda::COMPILED {
        return;
    }
    for precision in [Precision::F32, Precision::Bf16] {
        for ordinal in [None, Some(0), Some(3)] {
            let ctx = BackendCtx::new(Device::Cpu).with_precision(precision);
            let err = build_backend("cuda", &params(ordinal), &ctx).unwrap_err();
            assert!(
                matches!(err, Error::NotCompiledWithCuda),
                "{precision:?} {ordinal:?}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("--features cuda")
                    && msg.contains("-p xtask")
                    && msg.contains("backend.kind = \"cpu\""),
                "{msg}"
            );
        }
    }
}

/// In a build with the feature, on a machine without a usable GPU, building the backend
/// is one diagnosed error (never a panic); with a GPU it succeeds.
#[test]
fn cuda_without_a_device_is_one_error_with_the_fix() {
    if !cuda::COMPILED {
        return;
    }
    match build_backend("cuda", &params(Some(0)), &BackendCtx::new(Device::Cpu)) {
        Ok(be) => assert_eq!(be.name(), "cuda"),
        Err(e) => {
            assert!(
                matches!(
                    e.cuda_cause(),
                    Some(CudaCause::NoDevice | CudaCause::DriverMissing | CudaCause::DriverTooOld)
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("fix: "), "{e}");
        }
    }
    // An ordinal past any machine's devices is always refused with the fix.
    let Err(err) = build_backend("cuda", &params(Some(4095)), &BackendCtx::new(Device::Cpu)) else {
        panic!("no machine has 4096 GPUs");
    };
    assert!(
        err.to_string().contains("cannot open CUDA device 4095"),
        "{err}"
    );
}
