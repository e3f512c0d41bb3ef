//! The single-thread peak of the CPU's product instructions, measured with register-only
//! loops: `VDPBF16PS` (bf16 pairs, f32 accumulation, 64 FLOP per zmm instruction) and
//! `VFMADD231PS` (f32, 32 FLOP per zmm instruction), each over `chains` independent
//! accumulators, so that the figure is the instruction's throughput and not its latency.
//!
//! `cargo run --release -p mor-bench --example bf16_peak [seconds]`; prints GFLOP/s per
//! chain count, and the best as the peak the product kernels are measured against.

use std::time::Instant;

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.3);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: AVX512_BF16 is available (checked).
            sweep("VDPBF16PS", "bf16", secs, |iters, chains| unsafe {
                x86::dpbf16(iters, chains)
            });
        } else {
            println!("no AVX512_BF16 on this CPU");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F is available (checked).
            sweep("VFMADD231PS", "f32", secs, |iters, chains| unsafe {
                x86::fma(iters, chains)
            });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86_64 only (secs {secs})");
}

/// Prints the rate of `run(iters, chains)` for each chain count and the best as the peak.
#[allow(dead_code)]
fn sweep(inst: &str, what: &str, secs: f64, run: impl Fn(u64, usize) -> f64) {
    let mut best = 0f64;
    for chains in [8, 12, 16, 24] {
        let g = rate(secs, |iters| run(iters, chains));
        best = best.max(g);
        println!("{inst} zmm, {chains} chains: {g:.0} GFLOP/s");
    }
    println!("{what} peak (1 thread): {best:.0} GFLOP/s");
}

/// GFLOP/s of `run(iters)` (which returns the FLOP it did), best of several timed runs of
/// about `secs` each.
#[allow(dead_code)]
fn rate(secs: f64, run: impl Fn(u64) -> f64) -> f64 {
    let mut iters = 1u64 << 16;
    loop {
        let t0 = Instant::now();
        run(iters);
        if t0.elapsed().as_secs_f64() > 0.02 {
            break;
        }
        iters *= 2;
    }
    let mut best = 0f64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t0 = Instant::now();
        let flop = run(iters);
        best = best.max(flop / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Runs `$iters` rounds of `$op` on `$chains` (8, 12, 16 or 24) independent accumulators.
    macro_rules! chains {
        ($iters:expr, $chains:expr, $zero:expr, $op:expr, $a:expr, $b:expr, $sink:expr) => {{
            macro_rules! run {
                ($n:literal) => {{
                    let mut c = [$zero; $n];
                    for _ in 0..$iters {
                        for acc in c.iter_mut() {
                            *acc = $op(*acc, $a, $b);
                        }
                    }
                    let mut s = $zero;
                    for acc in c {
                        s = $sink(s, acc);
                    }
                    std::hint::black_box(s);
                }};
            }
            match $chains {
                8 => run!(8),
                12 => run!(12),
                16 => run!(16),
                _ => run!(24),
            }
        }};
    }

    /// `iters × chains` `VDPBF16PS` on registers; returns the FLOP done.
    ///
    /// # Safety
    /// AVX512_BF16 must be available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dpbf16(iters: u64, chains: usize) -> f64 {
        // SAFETY: `__m512i` and `__m512bh` are both 64 plain bytes.
        let (a, b): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(std::hint::black_box(_mm512_set1_epi32(
                    0x3f80_3f80,
                ))),
                std::mem::transmute::<__m512i, __m512bh>(std::hint::black_box(_mm512_set1_epi32(
                    0x0001_0001,
                ))),
            )
        };
        let z = _mm512_setzero_ps();
        chains!(iters, chains, z, _mm512_dpbf16_ps, a, b, _mm512_add_ps);
        (iters * chains as u64 * 64) as f64
    }

    /// `iters × chains` `VFMADD231PS` on registers; returns the FLOP done.
    ///
    /// # Safety
    /// AVX-512 F must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma(iters: u64, chains: usize) -> f64 {
        let a = std::hint::black_box(_mm512_set1_ps(1.0));
        let b = std::hint::black_box(_mm512_set1_ps(1e-30));
        let z = _mm512_setzero_ps();
        let f = |c, a, b| _mm512_fmadd_ps(a, b, c);
        chains!(iters, chains, z, f, a, b, _mm512_add_ps);
        (iters * chains as u64 * 32) as f64
    }
}
