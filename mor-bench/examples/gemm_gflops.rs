//! GFLOP/s of the `cpu` backend's product kernels on one thread, at the shapes of the
//! speed-target model's training products (rows 2048, d 256, ff 704, vocabulary 4096).
//!
//! `cargo run --release -p mor-bench --example gemm_gflops [reps]`; run it again with
//! `MOR_CPU_TIER=avx2` to time the `linear` op on the `gemm` crate's f32 kernel.
//!
//! Times are the calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID` on Linux, wall time
//! elsewhere), best of `reps`: on a machine shared with other work, time the thread spent
//! preempted does not count, so the figures are the kernels' rates while they run.

use candle_core::{DType, Device, Tensor};
use mor_core::config::Precision;
use mor_kernels::cpu::{matmul_with, CpuBackend, Kernel};
use mor_kernels::Backend;
use std::time::Instant;

/// Seconds of CPU time of the calling thread (wall time where that clock is not read).
fn thread_seconds() -> f64 {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    {
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut [i64; 2]) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = [0i64; 2];
        // SAFETY: `ts` is a valid `struct timespec` (two 64-bit fields on 64-bit Linux).
        if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return ts[0] as f64 + ts[1] as f64 * 1e-9;
        }
    }
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    println!("tier {}", mor_kernels::cpu::isa::tier());
    // (m, n, k, a transposed): forward x·wᵀ, the dw product gᵀ·x, square.
    let shapes = [
        (2048, 1408, 256, false),
        (2048, 256, 704, false),
        (256, 704, 2048, true),
        (2048, 4096, 256, false),
        (1024, 1024, 1024, false),
    ];
    for &(m, n, k, ta) in &shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut c = vec![0f32; m * n];
        let (ars, acs) = if ta { (1, m) } else { (k, 1) };
        let flops = 2.0 * (m * n * k) as f64;
        let mut line = format!("{m}x{n}x{k}{}:", if ta { " (aᵀ)" } else { "" });
        for kern in Kernel::available() {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t0 = thread_seconds();
                matmul_with(
                    kern,
                    (m, n, k),
                    (&a, ars, acs),
                    (&b, n, 1),
                    (&mut c, n),
                    false,
                    1.0,
                )
                .unwrap();
                best = best.min(thread_seconds() - t0);
            }
            line += &format!("  {kern:?} {:.0}", flops / best / 1e9);
        }
        // The backend's `linear` (x · wᵀ) in f32 and bf16, one thread.
        if !ta {
            let x = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(b.clone(), (n, k), &Device::Cpu).unwrap();
            for p in [Precision::F32, Precision::Bf16] {
                let be = CpuBackend::with_precision(p);
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let y = pool.install(|| {
                        let t0 = thread_seconds();
                        let y = be.linear(&x, &w).unwrap();
                        best = best.min(thread_seconds() - t0);
                        y
                    });
                    assert_eq!(y.dtype(), DType::F32);
                }
                line += &format!("  linear-{} {:.0}", p.as_str(), flops / best / 1e9);
            }
        }
        println!("{line}  GFLOP/s");
    }
}
