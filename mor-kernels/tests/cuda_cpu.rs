//! Tests of the `cuda` backend that run without a GPU: launch-configuration maths, the
//! module table and cache keys, the kernels' CPU bodies against plain candle ops and
//! finite differences, the top-k radix select against a sort, and the error of a build
//! without the `cuda` feature.

use candle_core::{DType, Device, Tensor, Var};
use mor_core::rng::Rng;
use mor_kernels::cuda::host;
use mor_kernels::cuda::launch::{self, DecodePlan, DecodeShape, TopkPlan};
use mor_kernels::cuda::module::{kernel_name, nvrtc_arch, KernelDType, KernelModule, ModuleKey};
use mor_kernels::cuda::{self, plain, CudaBackend, RouterActivation, RouterParams};
use mor_kernels::{Backend, PAD_POS};
use proptest::prelude::*;
use std::collections::HashMap;

const CPU: Device = Device::Cpu;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &CPU).unwrap()
}

fn u32s(v: Vec<u32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &CPU).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[track_caller]
fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "max |a - b| = {d:e} > {tol:e}");
}

/// Central finite differences in f64 (TOOLCHAIN.md §3): checks the analytic gradient of
/// `f` with respect to every element of every var. Returns the worst relative error.
fn fd_check(vars: &[&Var], f: &dyn Fn() -> Tensor, tol: f64) -> f64 {
    let eps = 1e-5;
    let grads = f().backward().unwrap();
    let mut worst = 0f64;
    for (vi, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("var {vi} received no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let set = |p: Vec<f64>| {
            v.set(&Tensor::from_vec(p, v.shape(), v.device()).unwrap())
                .unwrap()
        };
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            set(p.clone());
            let lp = f().to_scalar::<f64>().unwrap();
            p[i] -= 2.0 * eps;
            set(p);
            let lm = f().to_scalar::<f64>().unwrap();
            set(base.clone());
            let num = (lp - lm) / (2.0 * eps);
            let err = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-3);
            worst = worst.max(err);
            assert!(
                err < tol,
                "var {vi} elem {i}: analytic {} vs numeric {num}",
                g[i]
            );
        }
    }
    worst
}

/// `sum(out * r)` for a fixed random `r`, so every output element weighs differently.
fn weighted_sum(out: &Tensor, r: &Tensor) -> Tensor {
    (out * r).unwrap().sum_all().unwrap()
}

fn sorted_distinct(rng: &mut Rng, rows: usize, l: usize, k: usize) -> Vec<u32> {
    let mut v = Vec::new();
    for _ in 0..rows {
        let mut all: Vec<u32> = (0..l as u32).collect();
        rng.shuffle(&mut all);
        let mut row = all[..k].to_vec();
        row.sort_unstable();
        v.extend(row);
    }
    v
}

// ---------------------------------------------------------------------------------------
// Launch-configuration maths.

#[test]
fn elementwise_grid_covers_every_element() {
    for n in [
        1u64,
        31,
        255,
        256,
        257,
        65_536 * 256,
        65_536 * 256 + 1,
        3_000_000_000,
    ] {
        let d = launch::elementwise(n).unwrap();
        assert_eq!(d.block, (launch::ELEMENTWISE_THREADS, 1, 1));
        assert!(d.blocks() >= 1 && d.blocks() <= launch::ELEMENTWISE_MAX_BLOCKS);
        let iters = launch::grid_stride_iterations(&d, n);
        assert!(d.threads() * iters >= n, "n = {n}");
        assert!(
            d.threads() * (iters - 1) < n,
            "one iteration too many for n = {n}"
        );
        if n <= 256 * launch::ELEMENTWISE_MAX_BLOCKS {
            assert_eq!(iters, 1, "small launches need no loop (n = {n})");
        }
    }
    assert!(launch::elementwise(0).is_err());
}

#[test]
fn warp_per_row_grid_covers_all_rows_exactly() {
    for rows in [1u64, 7, 8, 9, 1000, 16_385, 1 << 24] {
        let d = launch::warp_per_row(rows).unwrap();
        let per = launch::rows_per_block_warp(&d);
        assert_eq!(per, 8);
        assert!(
            d.blocks() * per >= rows && (d.blocks() - 1) * per < rows,
            "rows = {rows}"
        );
    }
    assert!(launch::warp_per_row(0).is_err());
}

#[test]
fn row_blocks_are_whole_warps_within_limits() {
    for (cols, want) in [
        (1u64, 32u32),
        (32, 32),
        (33, 64),
        (576, 576),
        (1000, 1024),
        (1024, 1024),
        (50_000, 1024),
    ] {
        assert_eq!(launch::row_block_threads(cols), want, "cols = {cols}");
    }
    let d = launch::block_per_row(4096, 576).unwrap();
    assert_eq!((d.grid.0, d.block.0), (4096, 576));
    let b = launch::rms_norm_bwd(10_000, 576).unwrap();
    assert_eq!(b.grid.0 as u64, launch::RMS_NORM_BWD_MAX_BLOCKS);
    assert_eq!(launch::rms_norm_bwd(3, 576).unwrap().grid.0, 3);
    for (rows, cols) in [(1u64, 1u64), (5460, 1024), (1 << 20, 576), (3, 100)] {
        let d = launch::row_loop(rows, cols).unwrap();
        let t = d.block.0;
        assert!(
            t.is_multiple_of(32) && t <= launch::ROW_LOOP_MAX_THREADS && t as u64 >= cols.min(256)
        );
        // Blocks stride over the rows: every row is visited, each by exactly one block.
        let iters = rows.div_ceil(d.blocks());
        assert!(d.blocks() * iters >= rows && d.blocks() <= rows);
    }
    assert!(launch::row_loop(4, 0).is_err());
    assert!(launch::row_loop(0, 4).is_err());
    assert!(launch::block_per_row(4, 0).is_err());
    assert!(launch::block_per_row(0, 4).is_err());
}

fn check_topk_plan(rows: u64, n: u64, k: u64) {
    let p = TopkPlan::new(rows, n, k).unwrap();
    assert_eq!(p.dims.grid, (rows as u32, 1, 1));
    let t = p.dims.block.0;
    assert!(t.is_multiple_of(launch::WARP) && (32..=launch::MAX_THREADS_PER_BLOCK).contains(&t));
    assert_eq!(p.chunk, t as u64);
    // The chunks tile [0, n) without gaps or overlaps.
    assert!(
        p.n_chunks * p.chunk >= n && (p.n_chunks - 1) * p.chunk < n,
        "n = {n}"
    );
    let (first, last) = (p.chunk_range(0), p.chunk_range(p.n_chunks - 1));
    assert_eq!(first.0, 0);
    assert_eq!(last.1, n);
    assert!(last.0 < last.1, "the last chunk is not empty");
    assert_eq!(p.chunk_range(p.n_chunks), (n, n), "past the end is empty");
    assert!(p.static_shared_bytes <= launch::SHARED_MEM_LIMIT);
    assert_eq!(
        p.static_shared_bytes, 1172,
        "256 bins + 32 warp counts + 5 scalars, as ptxas reports"
    );
    assert_eq!(p.reads_per_row(), 5 * n);
}

#[test]
fn topk_plan_covers_long_sequences() {
    for (n, k) in [
        (1u64, 1u64),
        (31, 5),
        (2048, 1365),
        (8192, 2730),
        (1 << 20, 349_525),
        (1 << 20, 1),
        (1 << 20, 1 << 20),
        (3_000_000, 1_000_000),
    ] {
        check_topk_plan(8, n, k);
    }
    let p = TopkPlan::new(1, 1 << 20, 1000).unwrap();
    assert_eq!((p.chunk, p.n_chunks), (1024, 1024));
}

#[test]
fn topk_plan_rejects_bad_sizes() {
    assert!(TopkPlan::new(1, 10, 0).is_err());
    assert!(TopkPlan::new(1, 10, 11).is_err());
    assert!(TopkPlan::new(1, 0, 0).is_err());
    assert!(TopkPlan::new(0, 10, 1).is_err());
    assert!(TopkPlan::new(1, u32::MAX as u64 + 1, 1).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn topk_plan_chunks_tile_the_row(n in 1u64..=1_048_576, kf in 0.0f64..1.0, rows in 1u64..64) {
        let k = ((kf * n as f64) as u64).clamp(1, n);
        check_topk_plan(rows, n, k);
        let p = TopkPlan::new(rows, n, k).unwrap();
        let mut end = 0;
        for c in 0..p.n_chunks {
            let (s, e) = p.chunk_range(c);
            prop_assert_eq!(s, end);
            prop_assert!(e > s);
            end = e;
        }
        prop_assert_eq!(end, n);
    }

    #[test]
    fn decode_parts_cover_each_request(
        batch in 1usize..40, kv in 1usize..5, group in 1usize..5, dh in 1usize..=256,
        bt in 1usize..33, mb in 0usize..50, part in 1usize..600, len in 0usize..2000,
    ) {
        let shape = DecodeShape { batch, q_heads: kv * group, kv_heads: kv, head_dim: dh, block_tokens: bt, max_blocks: mb, num_blocks: 100 };
        let p = DecodePlan::new(shape, part).unwrap();
        prop_assert_eq!(p.partial.grid, (p.n_parts as u32, (kv * group) as u32, batch as u32));
        prop_assert_eq!(p.combine.grid, ((kv * group) as u32, batch as u32, 1));
        prop_assert!(p.partial.shared_mem_bytes <= launch::SHARED_MEM_LIMIT);
        prop_assert_eq!(p.partial.shared_mem_bytes as usize, 4 * (dh + 2) * 4);
        prop_assert_eq!(p.partial_len, batch * kv * group * p.n_parts * (dh + 2));
        // The parts tile [0, min(len, capacity)).
        let mut covered = 0;
        for i in 0..p.n_parts {
            let (s, e) = p.part_range(i, len);
            prop_assert!(s <= e);
            if s < e {
                prop_assert_eq!(s, covered);
                covered = e;
            }
        }
        prop_assert_eq!(covered, len.min(mb * bt));
    }
}

#[test]
fn decode_plan_rejects_bad_shapes() {
    let ok = DecodeShape {
        batch: 2,
        q_heads: 8,
        kv_heads: 2,
        head_dim: 64,
        block_tokens: 16,
        max_blocks: 4,
        num_blocks: 8,
    };
    assert_eq!(DecodePlan::new(ok, 32).unwrap().n_parts, 2);
    for bad in [
        DecodeShape {
            q_heads: 6,
            kv_heads: 4,
            ..ok
        },
        DecodeShape {
            head_dim: 257,
            ..ok
        },
        DecodeShape { head_dim: 0, ..ok },
        DecodeShape { batch: 0, ..ok },
        DecodeShape {
            batch: 70_000,
            ..ok
        },
        DecodeShape {
            block_tokens: 0,
            ..ok
        },
    ] {
        let e = DecodePlan::new(bad, 32).unwrap_err().to_string();
        assert!(e.contains("paged decode attention plan"), "{e}");
    }
    assert!(DecodePlan::new(ok, 0).is_err());
}

// ---------------------------------------------------------------------------------------
// Modules, kernel names and cache keys.

fn kernels_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

#[test]
fn every_source_file_is_a_module_and_back() {
    let mut stems: Vec<String> = std::fs::read_dir(kernels_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    stems.sort();
    let mut names: Vec<String> = KernelModule::ALL
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    names.sort();
    assert_eq!(stems, names);
    for m in KernelModule::ALL {
        assert_eq!(KernelModule::from_name(m.name()), Some(m));
    }
    assert_eq!(KernelModule::from_name("nope"), None);
}

#[test]
fn every_launched_kernel_is_defined_for_f32_and_bf16() {
    for m in KernelModule::ALL {
        let src = std::fs::read_to_string(kernels_dir().join(format!("{}.cu", m.name()))).unwrap();
        for base in m.kernels() {
            assert!(
                src.contains(&format!("void {base}_##SUFFIX(")),
                "{base} is not defined in {m}.cu"
            );
        }
        assert!(
            src.contains("(float, f32)") && src.contains("(mor_bf16, bf16)"),
            "{m}.cu lacks an f32 or bf16 instantiation"
        );
        // Sources must compile with NVRTC without include paths.
        assert!(
            !src.contains("#include <"),
            "{m}.cu includes a system header"
        );
    }
    assert_eq!(
        kernel_name("mor_rms_norm_fwd", KernelDType::Bf16),
        "mor_rms_norm_fwd_bf16"
    );
    assert_eq!(
        kernel_name("mor_topk_sorted", KernelDType::F32),
        "mor_topk_sorted_f32"
    );
    assert_eq!(KernelDType::of(DType::F64), None);
    assert_eq!(KernelDType::of(DType::BF16), Some(KernelDType::Bf16));
}

#[test]
fn module_cache_keys_separate_devices_and_modules() {
    let mut cache = HashMap::new();
    for ordinal in 0..3 {
        for m in KernelModule::ALL {
            assert!(cache
                .insert(ModuleKey { ordinal, module: m }, (ordinal, m))
                .is_none());
        }
    }
    assert_eq!(cache.len(), 3 * KernelModule::ALL.len());
    assert_eq!(KernelModule::ALL.len(), 9);
    let k = ModuleKey {
        ordinal: 1,
        module: KernelModule::Router,
    };
    assert_eq!(cache[&k], (1, KernelModule::Router));
    assert_eq!(k.to_string(), "cuda:1/router");
    assert_ne!(
        k,
        ModuleKey {
            ordinal: 0,
            module: KernelModule::Router
        }
    );
}

#[test]
fn nvrtc_targets_follow_the_compute_capability() {
    for ((maj, min), want) in [
        ((9, 0), "compute_90"),
        ((8, 0), "compute_80"),
        ((8, 6), "compute_86"),
        ((8, 9), "compute_89"),
        ((8, 7), "compute_87"),
        ((10, 0), "compute_100"),
        ((11, 0), "compute_100"),
        ((12, 1), "compute_120"),
        ((7, 5), "compute_80"),
    ] {
        assert_eq!(nvrtc_arch(maj, min), want, "sm_{maj}{min}");
    }
}

// ---------------------------------------------------------------------------------------
// Without the feature.

#[test]
fn cuda_backend_without_the_feature_says_how_to_get_it() {
    use mor_kernels::{build_backend, BackendCtx, Error};
    assert!(mor_core::registry::names(mor_core::Family::Backend).contains(&"cuda".to_string()));
    if cuda::COMPILED {
        // Built with the feature: the message must never ask for it; without a GPU the
        // error is a CUDA error, not a panic.
        match build_backend("cuda", &toml::Table::new(), &BackendCtx::new(CPU)) {
            Ok(be) => assert_eq!(be.name(), "cuda"),
            Err(e) => assert!(matches!(e, Error::CudaFailure { .. }), "{e:?}"),
        }
        assert!(cuda::embedded_module(KernelModule::Router).is_some());
        return;
    }
    let err = build_backend("cuda", &toml::Table::new(), &BackendCtx::new(CPU)).unwrap_err();
    assert!(matches!(err, Error::NotCompiledWithCuda), "{err:?}");
    assert!(err.to_string().contains("--features cuda"), "{err}");
    let mut params = toml::Table::new();
    params.insert("ordinal".into(), toml::Value::Integer(1));
    assert!(matches!(
        build_backend("cuda", &params, &BackendCtx::new(CPU)),
        Err(Error::NotCompiledWithCuda)
    ));
    assert!(matches!(
        CudaBackend::new(0),
        Err(Error::NotCompiledWithCuda)
    ));
    assert!(matches!(
        CudaBackend::on_device(CPU),
        Err(Error::NotCompiledWithCuda)
    ));
    let out = std::env::temp_dir().join("mor-gpu-check-never-written.json");
    assert!(matches!(
        cuda::gpu_check(&out),
        Err(Error::NotCompiledWithCuda)
    ));
    assert!(!out.exists());
    assert!(cuda::embedded_module(KernelModule::Router).is_none());
}

/// With the `cuda` feature and a GPU, the whole GPU check must pass. Without a GPU the
/// test says so and passes, unless `MOR_REQUIRE_CUDA=1` asks for a GPU.
#[test]
fn gpu_check_passes_when_a_gpu_is_present() {
    let require = std::env::var("MOR_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    if !cuda::COMPILED {
        assert!(
            !require,
            "MOR_REQUIRE_CUDA=1 but this build has no `cuda` feature"
        );
        return;
    }
    if let Err(e) = CudaBackend::new(0) {
        assert!(!require, "MOR_REQUIRE_CUDA=1 but no CUDA device: {e}");
        eprintln!("no CUDA device ({e}); the GPU check did not run");
        return;
    }
    let out = std::env::temp_dir().join(format!("mor-gpu-check-{}.json", std::process::id()));
    let report = cuda::gpu_check(&out).unwrap();
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(report.passed(), "failed checks: {failed:#?}");
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("\"passed\": true"));
    let _ = std::fs::remove_file(out);
}

#[test]
fn cuda_backend_rejects_unknown_parameters() {
    use mor_kernels::{build_backend, BackendCtx};
    let mut params = toml::Table::new();
    params.insert("device".into(), toml::Value::Integer(0));
    let err = build_backend("cuda", &params, &BackendCtx::new(CPU))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown field") && err.contains("device"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Top-k: the kernel's radix select against a sort.

#[test]
fn float_keys_preserve_order() {
    let v = [
        f32::NEG_INFINITY,
        -3.5,
        -1e-30,
        -0.0,
        0.0,
        1e-30,
        2.0,
        f32::MAX,
        f32::INFINITY,
    ];
    for w in v.windows(2) {
        assert!(
            host::float_key32(w[0]) < host::float_key32(w[1]),
            "{} vs {}",
            w[0],
            w[1]
        );
        assert!(host::float_key64(w[0] as f64) < host::float_key64(w[1] as f64));
    }
    assert_eq!(host::float_key32(f32::NAN), 0);
    assert!(host::float_key32(f32::NEG_INFINITY) > 0);
}

fn tie_value(code: u8) -> f64 {
    match code {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        3 => -0.0,
        4 => 0.0,
        c => (c as f64 - 10.0) * 0.25,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn radix_select_matches_sort(rows in 1usize..4, n in 1usize..200, kf in 0.0f64..1.0, codes in prop::collection::vec(0u8..20, 800)) {
        let k = ((kf * n as f64) as usize).clamp(1, n);
        let scores: Vec<f64> = (0..rows * n).map(|i| tie_value(codes[i % codes.len()])).collect();
        let radix = host::topk_sorted_radix(&scores, rows, n, k, false).unwrap();
        let naive = host::topk_sorted_naive(&scores, rows, n, k).unwrap();
        prop_assert_eq!(&radix, &naive);
        let exact = host::topk_sorted_radix(&scores, rows, n, k, true).unwrap();
        prop_assert_eq!(&exact, &naive);
        for r in 0..rows {
            let row = &radix[r * k..(r + 1) * k];
            prop_assert!(row.windows(2).all(|w| w[0] < w[1]), "not strictly ascending: {:?}", row);
        }
    }
}

#[test]
fn radix_select_handles_a_long_row() {
    let mut rng = Rng::new(7);
    let n = 300_000;
    // Few distinct values: long runs of ties cross many chunks.
    let scores: Vec<f64> = (0..n).map(|_| (rng.below(50) as f64) * 0.5).collect();
    for k in [1, 1000, 100_000, n] {
        let radix = host::topk_sorted_radix(&scores, 1, n, k, false).unwrap();
        let naive = host::topk_sorted_naive(&scores, 1, n, k).unwrap();
        assert_eq!(radix, naive, "k = {k}");
    }
}

#[test]
fn topk_op_maps_candidates_to_positions() {
    // Candidates are tokens 1, 3, 5, ... (hierarchical filtering); ties go to the earlier one.
    let scores = Tensor::new(
        &[[0.5f32, 2.0, -1.0, 2.0, 0.1], [3.0, 3.0, 3.0, 3.0, 3.0]],
        &CPU,
    )
    .unwrap();
    let map = u32s((0..10).map(|i| 2 * (i % 5) + 1).collect(), &[2, 5]);
    let t = cuda::topk_sorted(&scores, 3, Some(&map)).unwrap();
    assert_eq!(
        t.keep.to_vec2::<u32>().unwrap(),
        vec![vec![0, 1, 3], vec![0, 1, 2]]
    );
    assert_eq!(
        t.sel.to_vec2::<u32>().unwrap(),
        vec![vec![1, 3, 7], vec![1, 3, 5]]
    );
    let t = cuda::topk_sorted(&scores.to_dtype(DType::BF16).unwrap(), 1, None).unwrap();
    assert_eq!(t.keep.to_vec2::<u32>().unwrap(), vec![vec![1], vec![0]]);
    assert_eq!(
        t.sel.to_vec2::<u32>().unwrap(),
        t.keep.to_vec2::<u32>().unwrap()
    );
}

#[test]
fn topk_matches_plain_sort_on_distinct_scores() {
    let mut rng = Rng::new(11);
    let s = randn(&mut rng, &[4, 300]).to_dtype(DType::F32).unwrap();
    let fused = cuda::topk_sorted(&s, 100, None).unwrap().keep;
    let plain = plain::topk_sorted(&s, 100).unwrap();
    assert_eq!(
        fused.to_vec2::<u32>().unwrap(),
        plain.to_vec2::<u32>().unwrap()
    );
}

#[test]
fn topk_rejects_bad_input() {
    let s = Tensor::zeros((2, 5), DType::F32, &CPU).unwrap();
    for (k, what) in [(0, "k = 0"), (6, "k = 6")] {
        let e = cuda::topk_sorted(&s, k, None).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    let bad_map = Tensor::zeros((2, 5), DType::F32, &CPU).unwrap();
    assert!(cuda::topk_sorted(&s, 2, Some(&bad_map))
        .unwrap_err()
        .to_string()
        .contains("u32"));
    let short_map = u32s(vec![0; 5], &[1, 5]);
    assert!(cuda::topk_sorted(&s, 2, Some(&short_map)).is_err());
    assert!(cuda::topk_sorted(&Tensor::zeros(5, DType::F32, &CPU).unwrap(), 2, None).is_err());
}

// ---------------------------------------------------------------------------------------
// The ops' CPU bodies against plain candle ops (f64), and their gradients against finite
// differences.

#[test]
fn router_scores_match_plain_ops_and_gradients() {
    let mut rng = Rng::new(1);
    for params in [
        RouterParams::default(),
        RouterParams {
            alpha: 1.0,
            temp: 2.0,
            activation: RouterActivation::Tanh,
        },
        RouterParams {
            alpha: 0.5,
            temp: 0.5,
            activation: RouterActivation::None,
        },
    ] {
        let (h, w) = (randn(&mut rng, &[2, 3, 5]), randn(&mut rng, &[5]));
        let (z, g) = cuda::router_scores(&h, &w, params).unwrap();
        let (zp, gp) = plain::router_scores(&h, &w, params).unwrap();
        assert_eq!(z.dims(), &[2, 3]);
        assert_close(&z, &zp, 1e-12);
        assert_close(&g, &gp, 1e-12);
        let (hv, wv) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&w).unwrap());
        let (rz, rg) = (randn(&mut rng, &[2, 3]), randn(&mut rng, &[2, 3]));
        fd_check(
            &[&hv, &wv],
            &|| {
                let (z, g) = cuda::router_scores(hv.as_tensor(), wv.as_tensor(), params).unwrap();
                (weighted_sum(&z, &rz) + weighted_sum(&g, &rg)).unwrap()
            },
            1e-6,
        );
    }
    // The gate of the paper's recipe lies in (0, alpha).
    let (_, g) = cuda::router_scores(
        &randn(&mut rng, &[40, 8]),
        &randn(&mut rng, &[8]),
        RouterParams::default(),
    )
    .unwrap();
    assert!(g
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .all(|&v| v > 0.0 && v < 0.1));
    let e = cuda::router_scores(
        &randn(&mut rng, &[2, 4]),
        &randn(&mut rng, &[5]),
        RouterParams::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("expected [4]"), "{e}");
}

#[test]
fn rms_norm_matches_plain_ops_and_gradients() {
    let mut rng = Rng::new(2);
    let (x, w) = (randn(&mut rng, &[2, 3, 7]), randn(&mut rng, &[7]));
    let y = cuda::rms_norm(&x, &w, 1e-5).unwrap();
    assert_close(&y, &plain::rms_norm(&x, &w, 1e-5).unwrap(), 1e-12);
    let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
    let r = randn(&mut rng, &[2, 3, 7]);
    fd_check(
        &[&xv, &wv],
        &|| {
            weighted_sum(
                &cuda::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5).unwrap(),
                &r,
            )
        },
        1e-6,
    );
    // bf16 rounds once from the exact value.
    let (xb, wb) = (
        x.to_dtype(DType::BF16).unwrap(),
        w.to_dtype(DType::BF16).unwrap(),
    );
    let yb = cuda::rms_norm(&xb, &wb, 1e-5).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    let exact = plain::rms_norm(
        &xb.to_dtype(DType::F64).unwrap(),
        &wb.to_dtype(DType::F64).unwrap(),
        1e-5,
    )
    .unwrap();
    let rel = max_abs_diff(&yb, &exact)
        / exact
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
    assert!(rel < 1.0 / 128.0, "bf16 error {rel}");
    assert!(cuda::rms_norm(&x, &randn(&mut rng, &[6]), 1e-5).is_err());
    assert!(cuda::rms_norm(&x, &w, -1.0).is_err());
}

#[test]
fn rope_matches_plain_ops_and_gradients() {
    let mut rng = Rng::new(3);
    let (cos, sin) = mor_kernels::rope_tables(32, 8, 10_000.0, &CPU).unwrap();
    let (cos, sin) = (
        cos.to_dtype(DType::F64).unwrap(),
        sin.to_dtype(DType::F64).unwrap(),
    );
    let x = randn(&mut rng, &[2, 3, 5, 8]);
    let pos = u32s(vec![0, 4, 9, PAD_POS, 31, 2, 3, 5, 7, 11], &[2, 5]);
    let y = cuda::rope_at(&x, &pos, &cos, &sin).unwrap();
    assert_close(&y, &plain::rope_at(&x, &pos, &cos, &sin).unwrap(), 1e-12);
    // The padded row is returned unchanged; position 0 is the identity.
    assert_close(
        &y.narrow(2, 3, 1).unwrap().get(0).unwrap(),
        &x.narrow(2, 3, 1).unwrap().get(0).unwrap(),
        0.0,
    );
    assert_close(
        &y.narrow(2, 0, 1).unwrap().get(0).unwrap(),
        &x.narrow(2, 0, 1).unwrap().get(0).unwrap(),
        1e-15,
    );
    // A rotation keeps the norm (up to the f32 rounding of the tables).
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!(
        (n(&y) - n(&x)).abs() < 1e-6 * n(&x),
        "{} vs {}",
        n(&y),
        n(&x)
    );
    let xv = Var::from_tensor(&x).unwrap();
    let r = randn(&mut rng, &[2, 3, 5, 8]);
    fd_check(
        &[&xv],
        &|| {
            weighted_sum(
                &cuda::rope_at(xv.as_tensor(), &pos, &cos, &sin).unwrap(),
                &r,
            )
        },
        1e-6,
    );
    let past = u32s(vec![0, 1, 2, 3, 32, 0, 1, 2, 3, 4], &[2, 5]);
    let e = cuda::rope_at(&x, &past, &cos, &sin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("position 32"), "{e}");
    assert!(cuda::rope_at(&x, &pos, &cos.narrow(1, 0, 3).unwrap(), &sin).is_err());
}

#[test]
fn gather_rope_matches_plain_ops_and_gradients() {
    let mut rng = Rng::new(4);
    let (cos, sin) = mor_kernels::rope_tables(16, 6, 10_000.0, &CPU).unwrap();
    let (cos, sin) = (
        cos.to_dtype(DType::F64).unwrap(),
        sin.to_dtype(DType::F64).unwrap(),
    );
    let x = randn(&mut rng, &[2, 2, 9, 6]);
    let idx = u32s(sorted_distinct(&mut rng, 2, 9, 4), &[2, 4]);
    let y = cuda::gather_rope(&x, &idx, &cos, &sin).unwrap();
    assert_eq!(y.dims(), &[2, 2, 4, 6]);
    assert_close(
        &y,
        &plain::gather_rope(&x, &idx, &cos, &sin).unwrap(),
        1e-12,
    );
    // Equal to a gather followed by RoPE at the gathered positions.
    let g = plain::gather_rope(
        &x,
        &idx,
        &cos.ones_like().unwrap(),
        &sin.zeros_like().unwrap(),
    )
    .unwrap();
    assert_close(&y, &cuda::rope_at(&g, &idx, &cos, &sin).unwrap(), 1e-12);
    let xv = Var::from_tensor(&x).unwrap();
    let r = randn(&mut rng, &[2, 2, 4, 6]);
    fd_check(
        &[&xv],
        &|| {
            weighted_sum(
                &cuda::gather_rope(xv.as_tensor(), &idx, &cos, &sin).unwrap(),
                &r,
            )
        },
        1e-6,
    );
    // A padded index gives a zero row; a repeated one accumulates in the backward.
    let idx2 = u32s(vec![1, 1, PAD_POS, 8, 0, 2, 4, 6], &[2, 4]);
    let y2 = cuda::gather_rope(&x, &idx2, &cos, &sin).unwrap();
    assert_eq!(
        y2.narrow(2, 2, 1)
            .unwrap()
            .get(0)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    fd_check(
        &[&xv],
        &|| {
            weighted_sum(
                &cuda::gather_rope(xv.as_tensor(), &idx2, &cos, &sin).unwrap(),
                &r,
            )
        },
        1e-6,
    );
    let e = cuda::gather_rope(&x, &u32s(vec![0, 1, 2, 9, 0, 1, 2, 3], &[2, 4]), &cos, &sin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 9"), "{e}");
}

#[test]
fn swiglu_matches_plain_ops_and_gradients() {
    let mut rng = Rng::new(5);
    let (g, u) = (randn(&mut rng, &[3, 4, 5]), randn(&mut rng, &[3, 4, 5]));
    assert_close(
        &cuda::swiglu(&g, &u).unwrap(),
        &plain::swiglu(&g, &u).unwrap(),
        1e-12,
    );
    let (gv, uv) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
    let r = randn(&mut rng, &[3, 4, 5]);
    fd_check(
        &[&gv, &uv],
        &|| weighted_sum(&cuda::swiglu(gv.as_tensor(), uv.as_tensor()).unwrap(), &r),
        1e-6,
    );
    assert!(cuda::swiglu(&g, &u.narrow(2, 0, 4).unwrap()).is_err());
    assert!(cuda::swiglu(&g, &u.to_dtype(DType::F32).unwrap()).is_err());
}

#[test]
fn gather_and_scatter_match_plain_ops_and_gradients() {
    let mut rng = Rng::new(6);
    let h = randn(&mut rng, &[2, 7, 3]);
    let idx = u32s(sorted_distinct(&mut rng, 2, 7, 4), &[2, 4]);
    let g = cuda::gather_rows(&h, &idx).unwrap();
    assert_close(&g, &plain::gather_rows(&h, &idx).unwrap(), 0.0);
    let (y, w) = (randn(&mut rng, &[2, 4, 3]), randn(&mut rng, &[2, 4]));
    let s = cuda::scatter_add_rows(&h, &idx, &y, Some(&w)).unwrap();
    assert_close(
        &s,
        &plain::scatter_add_rows(&h, &idx, &y, Some(&w)).unwrap(),
        1e-12,
    );
    let s1 = cuda::scatter_add_rows(&h, &idx, &y, None).unwrap();
    assert_close(
        &s1,
        &plain::scatter_add_rows(&h, &idx, &y, None).unwrap(),
        1e-12,
    );
    // Rows that were not selected are untouched.
    let selected: Vec<Vec<u32>> = idx.to_vec2().unwrap();
    for b in 0..2 {
        for t in 0..7u32 {
            if !selected[b].contains(&t) {
                assert_close(
                    &s.get(b).unwrap().get(t as usize).unwrap(),
                    &h.get(b).unwrap().get(t as usize).unwrap(),
                    0.0,
                );
            }
        }
    }

    let hv = Var::from_tensor(&h).unwrap();
    let rg = randn(&mut rng, &[2, 4, 3]);
    fd_check(
        &[&hv],
        &|| weighted_sum(&cuda::gather_rows(hv.as_tensor(), &idx).unwrap(), &rg),
        1e-6,
    );
    // A plain gather may repeat an index: the backward accumulates.
    let rep = u32s(vec![2, 2, 5, 5, 0, 6, 6, 6], &[2, 4]);
    fd_check(
        &[&hv],
        &|| weighted_sum(&cuda::gather_rows(hv.as_tensor(), &rep).unwrap(), &rg),
        1e-6,
    );

    let (yv, wv) = (Var::from_tensor(&y).unwrap(), Var::from_tensor(&w).unwrap());
    let rs = randn(&mut rng, &[2, 7, 3]);
    fd_check(
        &[&hv, &yv, &wv],
        &|| {
            weighted_sum(
                &cuda::scatter_add_rows(hv.as_tensor(), &idx, yv.as_tensor(), Some(wv.as_tensor()))
                    .unwrap(),
                &rs,
            )
        },
        1e-6,
    );

    let oob = u32s(vec![0, 1, 2, 7, 0, 1, 2, 3], &[2, 4]);
    assert!(cuda::gather_rows(&h, &oob)
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    let e = cuda::scatter_add_rows(&h, &rep, &y, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("appears twice"), "{e}");
    assert!(cuda::scatter_add_rows(&h, &idx, &y, Some(&randn(&mut rng, &[2, 3]))).is_err());
    assert!(cuda::gather_rows(&h, &idx.to_dtype(DType::F32).unwrap()).is_err());
}

fn decode_inputs(rng: &mut Rng) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let (b, hq, hkv, dh, bt, nb, mb) = (3, 4, 2, 8, 4, 16, 5);
    let q = randn(rng, &[b, hq, dh]);
    let kc = randn(rng, &[nb, bt, hkv, dh]);
    let vc = randn(rng, &[nb, bt, hkv, dh]);
    let mut blocks: Vec<u32> = (0..nb as u32).collect();
    rng.shuffle(&mut blocks);
    let table = u32s(blocks[..b * mb].to_vec(), &[b, mb]);
    let lens = u32s(vec![1, 13, 20], &[b]);
    (q, kc, vc, table, lens)
}

#[test]
fn paged_decode_attention_matches_plain_ops() {
    let mut rng = Rng::new(8);
    let (q, kc, vc, table, lens) = decode_inputs(&mut rng);
    let fused = cuda::paged_decode_attention(&q, &kc, &vc, &table, &lens, Some(3)).unwrap();
    let plain = plain::paged_decode_attention(&q, &kc, &vc, &table, &lens).unwrap();
    assert_eq!(fused.dims(), &[3, 4, 8]);
    assert_close(&fused, &plain, 1e-12);
    // One cached token: the output is that token's value row (KV head 0 for query heads 0, 1).
    let blk = table
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap() as usize;
    let v0 = vc.get(blk).unwrap().get(0).unwrap().get(0).unwrap();
    assert_close(&fused.get(0).unwrap().get(1).unwrap(), &v0, 1e-12);
    // An empty request gets zeros.
    let empty = u32s(vec![0, 13, 20], &[3]);
    let z = cuda::paged_decode_attention(&q, &kc, &vc, &table, &empty, None).unwrap();
    assert_eq!(
        z.get(0)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    assert_close(
        &z.narrow(0, 1, 2).unwrap(),
        &fused.narrow(0, 1, 2).unwrap(),
        1e-12,
    );
}

#[test]
fn paged_decode_attention_rejects_bad_input_and_backward() {
    let mut rng = Rng::new(9);
    let (q, kc, vc, table, lens) = decode_inputs(&mut rng);
    let bad_table = table.affine(1.0, 100.0).unwrap();
    let e = cuda::paged_decode_attention(&q, &kc, &vc, &bad_table, &lens, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("past the pool"), "{e}");
    let q3 = randn(&mut rng, &[3, 3, 8]);
    assert!(
        cuda::paged_decode_attention(&q3, &kc, &vc, &table, &lens, None)
            .unwrap_err()
            .to_string()
            .contains("multiple")
    );
    assert!(cuda::paged_decode_attention(
        &q,
        &kc,
        &vc,
        &table,
        &lens.to_dtype(DType::F32).unwrap(),
        None
    )
    .is_err());
    let qv = Var::from_tensor(&q).unwrap();
    let out = cuda::paged_decode_attention(qv.as_tensor(), &kc, &vc, &table, &lens, None).unwrap();
    let e = out.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(e.contains("inference-only"), "{e}");
}

// ---------------------------------------------------------------------------------------
// The backend on the CPU bodies.

/// Naive causal attention by positions, written with loops (the contract of
/// `Backend::attention`).
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, qp: &[Vec<u32>], kp: &[Vec<u32>]) -> Tensor {
    let (b, hq, t, dh) = q.dims4().unwrap();
    let (_, hkv, s, _) = k.dims4().unwrap();
    let (q4, k4, v4) = (to_nested(q), to_nested(k), to_nested(v));
    let mut out = vec![0.0; b * hq * t * dh];
    for bb in 0..b {
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            for i in 0..t {
                if qp[bb][i] == PAD_POS {
                    continue;
                }
                let vis: Vec<usize> = (0..s)
                    .filter(|&j| kp[bb][j] != PAD_POS && kp[bb][j] <= qp[bb][i])
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let sc: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        (0..dh)
                            .map(|c| q4[bb][h][i][c] * k4[bb][kvh][j][c])
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (n, &j) in vis.iter().enumerate() {
                    for c in 0..dh {
                        out[((bb * hq + h) * t + i) * dh + c] +=
                            (sc[n] - m).exp() / z * v4[bb][kvh][j][c];
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (b, hq, t, dh), &CPU).unwrap()
}

fn to_nested(t: &Tensor) -> Vec<Vec<Vec<Vec<f64>>>> {
    (0..t.dim(0).unwrap())
        .map(|i| t.get(i).unwrap().to_vec3::<f64>().unwrap())
        .collect()
}

#[test]
fn host_emulation_backend_follows_the_contract() {
    let be = CudaBackend::host_emulation();
    assert_eq!(be.name(), "cuda");
    assert!(be.device().is_cpu());
    let mut rng = Rng::new(10);
    let q = randn(&mut rng, &[2, 4, 5, 4]);
    let k = randn(&mut rng, &[2, 2, 6, 4]);
    let v = randn(&mut rng, &[2, 2, 6, 4]);
    let qp = vec![vec![0, 2, 3, PAD_POS, 9], vec![0, 1, 2, 3, 4]];
    let kp = vec![vec![1, 2, 3, 5, PAD_POS, 7], vec![0, 1, 2, 3, 4, 5]];
    let (qpt, kpt) = (u32s(qp.concat(), &[2, 5]), u32s(kp.concat(), &[2, 6]));
    let out = be.attention(&q, &k, &v, &qpt, &kpt).unwrap();
    assert_close(&out, &naive_attention(&q, &k, &v, &qp, &kp), 1e-12);
    // Query at position 0 in row 0 sees no key (keys start at 1): zeros; so does the pad.
    assert_eq!(
        out.get(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    // Every op is differentiable through the backend.
    let qv = Var::from_tensor(&q).unwrap();
    let r = randn(&mut rng, &[2, 4, 5, 4]);
    fd_check(
        &[&qv],
        &|| {
            weighted_sum(
                &be.attention(qv.as_tensor(), &k, &v, &qpt, &kpt).unwrap(),
                &r,
            )
        },
        1e-6,
    );
    let x = randn(&mut rng, &[3, 6]);
    let w = randn(&mut rng, &[6]);
    assert_close(
        &be.rms_norm(&x, &w, 1e-5).unwrap(),
        &cuda::rms_norm(&x, &w, 1e-5).unwrap(),
        0.0,
    );
    assert_close(
        &be.swiglu(&x, &w.unsqueeze(0).unwrap().repeat((3, 1)).unwrap())
            .unwrap(),
        &plain::swiglu(&x, &w.unsqueeze(0).unwrap().repeat((3, 1)).unwrap()).unwrap(),
        1e-12,
    );
    let h = randn(&mut rng, &[1, 5, 2]);
    let idx = u32s(vec![1, 4], &[1, 2]);
    let y = randn(&mut rng, &[1, 2, 2]);
    assert_close(
        &be.gather_tokens(&h, &idx).unwrap(),
        &plain::gather_rows(&h, &idx).unwrap(),
        0.0,
    );
    assert_close(
        &be.scatter_add_tokens(&h, &idx, &y, None).unwrap(),
        &plain::scatter_add_rows(&h, &idx, &y, None).unwrap(),
        1e-12,
    );
    assert!(be
        .attention(
            &q,
            &k.narrow(1, 0, 1).unwrap().repeat((1, 3, 1, 1)).unwrap(),
            &v,
            &qpt,
            &kpt
        )
        .is_err());
}

#[test]
fn host_emulation_matches_the_reference_backend() {
    use mor_kernels::reference::ReferenceBackend;
    let (fused, oracle) = (CudaBackend::host_emulation(), ReferenceBackend::new(CPU));
    let (mut rng, mut wrng) = (Rng::new(12), Rng::new(13));
    // Each case: the op on both backends, outputs and input gradients compared.
    let mut check =
        |name: &str, inputs: Vec<Tensor>, f: &dyn Fn(&dyn Backend, &[Tensor]) -> Tensor| {
            let run = |be: &dyn Backend| {
                let vars: Vec<Var> = inputs
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                (f(be, &ts), ts)
            };
            let (out_f, ts_f) = run(&fused);
            let (out_o, ts_o) = run(&oracle);
            let d = max_abs_diff(&out_f, &out_o);
            assert!(d < 1e-10, "{name}: outputs differ by {d:e}");
            let w = randn(&mut wrng, out_f.dims());
            let (gf, go) = (
                weighted_sum(&out_f, &w).backward().unwrap(),
                weighted_sum(&out_o, &w).backward().unwrap(),
            );
            for (i, (a, b)) in ts_f.iter().zip(&ts_o).enumerate() {
                let (ga, gb) = (
                    gf.get(a).expect("fused gradient"),
                    go.get(b).expect("reference gradient"),
                );
                let d = max_abs_diff(ga, gb);
                assert!(d < 1e-10, "{name}: gradient of input {i} differs by {d:e}");
            }
        };
    let (cos, sin) = mor_kernels::rope_tables(16, 4, 10_000.0, &CPU).unwrap();
    let pos = u32s(vec![0, 3, PAD_POS, 15, 1, 2, 7, 8], &[2, 4]);
    let idx = u32s(vec![0, 2, 5, 1, 3, 4], &[2, 3]);
    let qp = u32s(vec![0, 2, 3, PAD_POS, 1, 2, 3, 4], &[2, 4]);
    let kp = u32s(vec![1, 2, 3, 5, PAD_POS, 0, 1, 2, 3, 4], &[2, 5]);
    let (x, w) = (randn(&mut rng, &[2, 3, 6]), randn(&mut rng, &[6]));
    check("rms_norm", vec![x, w], &|be, t| {
        be.rms_norm(&t[0], &t[1], 1e-5).unwrap()
    });
    let x = randn(&mut rng, &[2, 2, 4, 4]);
    check("rope", vec![x], &|be, t| {
        be.rope(&t[0], &pos, &cos, &sin).unwrap()
    });
    let (q, k, v) = (
        randn(&mut rng, &[2, 4, 4, 4]),
        randn(&mut rng, &[2, 2, 5, 4]),
        randn(&mut rng, &[2, 2, 5, 4]),
    );
    check("attention", vec![q, k, v], &|be, t| {
        be.attention(&t[0], &t[1], &t[2], &qp, &kp).unwrap()
    });
    let (g, u) = (randn(&mut rng, &[3, 5]), randn(&mut rng, &[3, 5]));
    check("swiglu", vec![g, u], &|be, t| {
        be.swiglu(&t[0], &t[1]).unwrap()
    });
    let h = randn(&mut rng, &[2, 6, 3]);
    check("gather_tokens", vec![h.clone()], &|be, t| {
        be.gather_tokens(&t[0], &idx).unwrap()
    });
    let (y, wt) = (randn(&mut rng, &[2, 3, 3]), randn(&mut rng, &[2, 3]));
    check("scatter_add_tokens", vec![h, y, wt], &|be, t| {
        be.scatter_add_tokens(&t[0], &idx, &t[1], Some(&t[2]))
            .unwrap()
    });
}

#[test]
fn gpu_check_comparison_rule_and_json() {
    use cuda::gpu_check::{compare, json_num, json_str, RTOL_BF16, RTOL_F32};
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &CPU).unwrap();
    let reference = t(vec![1.0, -2.0, 100.0, 0.0]);
    // Equal: passes with zero error.
    let c = compare("k", DType::F32, "[4]", &reference, &reference).unwrap();
    assert!(c.passed && c.max_abs_err == 0.0 && c.rtol == RTOL_F32);
    // 5e-6 relative on the largest entry passes; 2e-5 fails.
    let c = compare(
        "k",
        DType::F32,
        "[4]",
        &t(vec![1.0, -2.0, 100.0005, 0.0]),
        &reference,
    )
    .unwrap();
    assert!(c.passed, "{c:?}");
    let c = compare(
        "k",
        DType::F32,
        "[4]",
        &t(vec![1.0, -2.0, 100.002, 0.0]),
        &reference,
    )
    .unwrap();
    assert!(!c.passed && (c.max_rel_err - 2e-5).abs() < 1e-6, "{c:?}");
    // Near zero the error is judged against 1% of the largest magnitude (here 1.0).
    let c = compare(
        "k",
        DType::F32,
        "[4]",
        &t(vec![1.0, -2.0, 100.0, 5e-6]),
        &reference,
    )
    .unwrap();
    assert!(c.passed && (c.max_rel_err - 5e-6).abs() < 1e-9, "{c:?}");
    // bf16: one unit in the last place (2^-7 relative at 1.0) is within 1.6e-2.
    let c = compare(
        "k",
        DType::BF16,
        "[4]",
        &t(vec![1.0078125, -2.0, 100.0, 0.0]),
        &reference,
    )
    .unwrap();
    assert!(c.passed && c.rtol == RTOL_BF16, "{c:?}");
    // NaN must match NaN.
    let nan = t(vec![f32::NAN, -2.0, 100.0, 0.0]);
    assert!(compare("k", DType::F32, "[4]", &nan, &nan).unwrap().passed);
    assert!(
        !compare("k", DType::F32, "[4]", &nan, &reference)
            .unwrap()
            .passed
    );
    // Integer outputs must be equal.
    let idx = u32s(vec![1, 2, 3], &[3]);
    assert!(compare("k", DType::F32, "[3]", &idx, &idx).unwrap().passed);
    assert!(
        !compare("k", DType::F32, "[3]", &u32s(vec![1, 2, 4], &[3]), &idx)
            .unwrap()
            .passed
    );
    // JSON escaping and non-finite numbers.
    assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    assert_eq!(json_num(f64::NAN), "null");
    assert_eq!(json_num(1.5), "1.5");
    let report = cuda::GpuCheckReport {
        device: "GPU \"x\"".into(),
        checks: vec![c_ok()],
        ..Default::default()
    };
    let j = report.to_json();
    assert!(report.passed());
    assert!(
        j.contains("\"device\": \"GPU \\\"x\\\"\"")
            && j.contains("\"passed\": true")
            && j.contains("\"compute_capability\": null"),
        "{j}"
    );
    assert!(
        !cuda::GpuCheckReport::default().passed(),
        "an empty report does not pass"
    );
    // A memory check that grows quadratically fails the report.
    let quadratic = cuda::MemoryCheck {
        op: "flash_attention.fwd+bwd".into(),
        dtype: "f32".into(),
        lens: vec![1024, 2048, 4096],
        peak_bytes: vec![100, 400, 1600],
        growth: 4.0,
        passed: false,
    };
    let report = cuda::GpuCheckReport {
        checks: vec![c_ok()],
        memory: vec![quadratic],
        ..Default::default()
    };
    assert!(!report.passed());
    let j = report.to_json();
    assert!(
        j.contains("\"lens\": [1024, 2048, 4096], \"peak_bytes\": [100, 400, 1600], \"growth\": 4"),
        "{j}"
    );
}

fn c_ok() -> cuda::KernelCheck {
    cuda::KernelCheck {
        kernel: "rms_norm.fwd".into(),
        dtype: "f32".into(),
        shape: "[1]".into(),
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        rtol: 1e-5,
        passed: true,
    }
}

// ---------------------------------------------------------------------------------------
// Flash attention by positions.

/// Attention inputs of one case: `q [b, hq, t, dh]`, `k, v [b, hkv, s, dh]`, positions.
struct AttnCase {
    name: &'static str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qp: Tensor,
    kp: Tensor,
}

fn attn_cases(rng: &mut Rng, dtype: DType) -> Vec<AttnCase> {
    let mut case = |name,
                    (b, hq, hkv, t, s, dh): (usize, usize, usize, usize, usize, usize),
                    qp: Vec<u32>,
                    kp: Vec<u32>| {
        AttnCase {
            name,
            q: randn(rng, &[b, hq, t, dh]).to_dtype(dtype).unwrap(),
            k: randn(rng, &[b, hkv, s, dh]).to_dtype(dtype).unwrap(),
            v: randn(rng, &[b, hkv, s, dh]).to_dtype(dtype).unwrap(),
            qp: u32s(qp, &[b, t]),
            kp: u32s(kp, &[b, s]),
        }
    };
    // Recursion-wise: the selected tokens attend among themselves at their original
    // (gathered, ascending, gapped) positions; a padded query and a padded key; more than
    // one key tile (s > 32) and a head dimension that is not a multiple of 32.
    let sel: Vec<u32> = (0..40u32).map(|i| 3 * i + i % 2).collect();
    let mut qp = sel.clone();
    qp[7] = PAD_POS;
    qp.extend(sel.iter().map(|p| p + 1));
    let mut kp = sel.clone();
    kp[11] = PAD_POS;
    kp.extend(sel.iter().map(|p| p + 1));
    let mut out = vec![case("recursion-wise", (2, 4, 2, 40, 40, 20), qp, kp)];
    // Shared step-1 K/V: a few gathered queries attend to every step-1 key (s > t, keys
    // of all positions 0..70), one query before every key it could see.
    let qp: Vec<u32> = [0u32, 5, 9, 33, 34, 60, 69].repeat(2);
    let mut kp: Vec<u32> = (1..71u32).collect();
    kp.extend(0..70u32);
    out.push(case("shared step-1", (2, 6, 3, 7, 70, 8), qp, kp));
    // MHA with keys in any order (not sorted by position) and a query seeing none.
    let qp = vec![4u32, 0, 2, PAD_POS, 9];
    let kp = vec![3u32, 1, PAD_POS, 8, 2, 5];
    out.push(case("unsorted keys", (1, 2, 2, 5, 6, 4), qp, kp));
    out
}

#[test]
fn flash_attention_matches_the_cpu_backend_forward_and_backward() {
    use mor_kernels::cpu::CpuBackend;
    let oracle = CpuBackend::new();
    let mut rng = Rng::new(21);
    for case in attn_cases(&mut rng, DType::F32) {
        let run = |flash: bool| {
            let vars: Vec<Var> = [&case.q, &case.k, &case.v]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let out = if flash {
                cuda::flash_attention(q, k, v, &case.qp, &case.kp).unwrap()
            } else {
                oracle.attention(q, k, v, &case.qp, &case.kp).unwrap()
            };
            let r = Tensor::arange(0f32, out.elem_count() as f32, &CPU)
                .unwrap()
                .reshape(out.shape())
                .unwrap()
                .affine(0.37, 0.0)
                .unwrap()
                .sin()
                .unwrap();
            let g = weighted_sum(&out, &r).backward().unwrap();
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).unwrap().clone())
                .collect();
            (out, grads)
        };
        let (of, gf) = run(true);
        let (oc, gc) = run(false);
        assert_eq!(of.dtype(), DType::F32);
        let d = max_abs_diff(&of, &oc);
        assert!(d < 2e-5, "{}: outputs differ by {d:e}", case.name);
        assert!(
            of.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1.0
        );
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(d < 5e-5, "{}: gradient {i} differs by {d:e}", case.name);
        }
    }
}

#[test]
fn flash_attention_gradients_match_finite_differences() {
    let mut rng = Rng::new(22);
    let cases = attn_cases(&mut rng, DType::F64);
    // The small MHA case and a cut of the shared step-1 case (GQA, s > t).
    for case in [&cases[2], &cases[1]] {
        let cut = |t: &Tensor, dim: usize, n: usize| {
            t.narrow(dim, 0, n.min(t.dim(dim).unwrap())).unwrap()
        };
        let (q, k, v) = (cut(&case.q, 2, 4), cut(&case.k, 2, 12), cut(&case.v, 2, 12));
        let (qp, kp) = (cut(&case.qp, 1, 4), cut(&case.kp, 1, 12));
        let vars = [q, k, v].map(|t| Var::from_tensor(&t.contiguous().unwrap()).unwrap());
        let r = randn(&mut rng, vars[0].dims());
        let worst = fd_check(
            &[&vars[0], &vars[1], &vars[2]],
            &|| {
                let out = cuda::flash_attention(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                    &qp,
                    &kp,
                )
                .unwrap();
                weighted_sum(&out, &r)
            },
            1e-6,
        );
        assert!(worst < 1e-6, "{}: {worst:e}", case.name);
    }
}

#[test]
fn flash_attention_plan_is_linear_in_the_sequence_length() {
    use launch::{FlashPlan, FlashShape};
    // Device memory of one forward + backward: every buffer the plans allocate, plus the
    // statistics and output gradient the backward pass builds. No [t, s] matrix: doubling L
    // doubles the total.
    let bytes = |l: usize| -> usize {
        let s = FlashShape {
            batch: 2,
            q_heads: 8,
            kv_heads: 2,
            t: l,
            s: l,
            head_dim: 64,
        };
        let p = FlashPlan::new(s).unwrap();
        // The grids cover every query row and every key exactly once per head.
        let rows = |d: launch::LaunchDims, per: usize| d.grid.0 as usize * per;
        assert!(rows(p.fwd, 16) >= l && rows(p.fwd, 16) < l + 16);
        assert!(rows(p.dq, 12) >= l && rows(p.dq, 12) < l + 12);
        assert!(rows(p.dkv, 12) >= l && rows(p.dkv, 12) < l + 12);
        assert_eq!((p.fwd.grid.1, p.fwd.grid.2), (8, 2));
        assert_eq!((p.dkv.grid.1, p.dkv.grid.2), (2, 2));
        let (nq, nkv) = (2 * 8 * l * 64, 2 * 2 * l * 64);
        let fwd_out = 2 * 8 * l * 65;
        let bwd_out = nq + 2 * nkv;
        let stats = 2 * 8 * l * 2 + nq; // (lse, D) and the f32 output gradient
        4 * (fwd_out + bwd_out + stats)
    };
    assert_eq!(bytes(4096), 2 * bytes(2048));
    assert_eq!(bytes(2048), 2 * bytes(1024));
    // Shared memory stays within the default limit up to the largest head dimension.
    for dh in [1, 32, 64, 100, launch::FLASH_MAX_HEAD_DIM] {
        let p = FlashPlan::new(FlashShape {
            batch: 1,
            q_heads: 4,
            kv_heads: 1,
            t: 5,
            s: 9,
            head_dim: dh,
        })
        .unwrap();
        for d in [p.fwd, p.dq, p.dkv] {
            assert!(
                d.shared_mem_bytes <= launch::SHARED_MEM_LIMIT,
                "dh {dh}: {d:?}"
            );
            assert_eq!(d.block, (128, 1, 1));
        }
    }
    let bad = |f: &dyn Fn(&mut FlashShape)| {
        let mut s = FlashShape {
            batch: 1,
            q_heads: 4,
            kv_heads: 2,
            t: 5,
            s: 9,
            head_dim: 64,
        };
        f(&mut s);
        FlashPlan::new(s).unwrap_err().to_string()
    };
    assert!(bad(&|s| s.head_dim = 129).contains("head_dim = 129"));
    assert!(bad(&|s| s.kv_heads = 3).contains("not a multiple"));
    assert!(bad(&|s| s.t = 0).contains("empty"));
    assert!(bad(&|s| s.batch = 70_000).contains("batch = 70000"));
}

#[test]
fn flash_attention_rejects_bad_input_and_handles_empty_sequences() {
    let mut rng = Rng::new(23);
    let q = randn(&mut rng, &[1, 4, 3, 8]);
    let k = randn(&mut rng, &[1, 2, 5, 8]);
    let qp = u32s(vec![0, 1, 2], &[1, 3]);
    let kp = u32s(vec![0, 1, 2, 3, 4], &[1, 5]);
    let err = |r: mor_kernels::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(cuda::flash_attention(&q, &k, &k, &kp, &kp)).contains("q_pos has shape [1, 5]"));
    assert!(err(cuda::flash_attention(
        &q,
        &k,
        &k.narrow(2, 0, 4).unwrap(),
        &qp,
        &kp
    ))
    .contains("v shaped as k"));
    let k3 = randn(&mut rng, &[1, 3, 5, 8]);
    assert!(err(cuda::flash_attention(&q, &k3, &k3, &qp, &kp)).contains("not a multiple"));
    let wide = randn(&mut rng, &[1, 1, 2, 130]);
    let p2 = u32s(vec![0, 1], &[1, 2]);
    assert!(err(cuda::flash_attention(&wide, &wide, &wide, &p2, &p2)).contains("head_dim = 130"));
    // The backend takes plain ops past the kernels' head dimension.
    let be = CudaBackend::host_emulation();
    let out = be.attention(&wide, &wide, &wide, &p2, &p2).unwrap();
    assert_close(
        &out,
        &plain::attention(&wide, &wide, &wide, &p2, &p2).unwrap(),
        0.0,
    );
    // No key: zeros.
    let none = Tensor::zeros((1, 2, 0, 8), DType::F64, &CPU).unwrap();
    let out = cuda::flash_attention(&q, &none, &none, &qp, &u32s(vec![], &[1, 0])).unwrap();
    assert_eq!(out.dims(), [1, 4, 3, 8]);
    assert_eq!(
        out.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
}

// ---------------------------------------------------------------------------------------
// LM head + cross-entropy in vocabulary chunks.

#[test]
fn chunked_cross_entropy_matches_the_cpu_backend_forward_and_backward() {
    use mor_kernels::cpu::CpuBackend;
    let oracle = CpuBackend::new();
    let mut rng = Rng::new(31);
    let (b, t, d, vocab) = (2usize, 9usize, 24usize, 1000usize);
    let x = randn(&mut rng, &[b, t, d]).to_dtype(DType::F32).unwrap();
    let w = (randn(&mut rng, &[vocab, d]) * 0.5)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    // Targets in the first, a middle and the last chunk, and the last column.
    let targets: Vec<u32> = (0..b * t).map(|i| ((i * 389) % vocab) as u32).collect();
    let mut targets = targets;
    targets[3] = vocab as u32 - 1;
    let targets = u32s(targets, &[b, t]);
    let run = |chunk: Option<usize>| {
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let loss = match chunk {
            Some(c) => {
                cuda::linear_cross_entropy(xv.as_tensor(), wv.as_tensor(), &targets, Some(c))
            }
            None => oracle.linear_cross_entropy(xv.as_tensor(), wv.as_tensor(), &targets),
        }
        .unwrap();
        // A scaled loss, as with gradient accumulation: the upstream gradient is not 1.
        let g = (&loss * 0.25).unwrap().backward().unwrap();
        (
            loss.to_scalar::<f32>().unwrap(),
            g.get(xv.as_tensor()).unwrap().clone(),
            g.get(wv.as_tensor()).unwrap().clone(),
        )
    };
    let (lc, dxc, dwc) = run(None);
    assert!(lc > 1.0, "{lc}");
    // Chunks that do not divide the vocabulary, one chunk, and one column per chunk.
    for chunk in [96, 1000, 7, 4096] {
        let (l, dx, dw) = run(Some(chunk));
        assert!(
            (l - lc).abs() < 2e-5 * lc,
            "chunk {chunk}: loss {l} vs {lc}"
        );
        assert_eq!(dx.dims(), [b, t, d]);
        assert_close(&dx, &dxc, 2e-6);
        assert_close(&dw, &dwc, 2e-6);
    }
    // The backend takes the chunked path (its default chunk covers this vocabulary once).
    let be = CudaBackend::host_emulation();
    let l = be
        .linear_cross_entropy(&x, &w, &targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((l - lc).abs() < 2e-5 * lc);
}

#[test]
fn chunked_cross_entropy_gradients_match_finite_differences() {
    let mut rng = Rng::new(32);
    let x = Var::from_tensor(&randn(&mut rng, &[5, 4])).unwrap();
    let w = Var::from_tensor(&randn(&mut rng, &[11, 4])).unwrap();
    let targets = u32s(vec![0, 10, 3, 3, 7], &[5]);
    let worst = fd_check(
        &[&x, &w],
        &|| {
            let l = cuda::linear_cross_entropy(x.as_tensor(), w.as_tensor(), &targets, Some(4))
                .unwrap();
            (l * 3.0).unwrap()
        },
        1e-6,
    );
    assert!(worst < 1e-6, "{worst:e}");
    // The closed form of one row: with w = 0 every logit is 0, the loss is ln(vocab).
    let zero = Tensor::zeros((11, 4), DType::F64, &CPU).unwrap();
    let l = cuda::linear_cross_entropy(x.as_tensor(), &zero, &targets, Some(3))
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((l - 11f64.ln()).abs() < 1e-12, "{l}");
}

#[test]
fn chunked_cross_entropy_rejects_bad_input() {
    let mut rng = Rng::new(33);
    let x = randn(&mut rng, &[3, 4]);
    let w = randn(&mut rng, &[6, 4]);
    let err = |r: mor_kernels::Result<Tensor>| r.unwrap_err().to_string();
    let t = u32s(vec![0, 6, 1], &[3]);
    assert!(err(cuda::linear_cross_entropy(&x, &w, &t, None)).contains("target 6 is outside"));
    let t = u32s(vec![0, 1], &[2]);
    assert!(err(cuda::linear_cross_entropy(&x, &w, &t, None)).contains("targets has shape [2]"));
    let t = u32s(vec![0, 1, 2], &[3]);
    assert!(err(cuda::linear_cross_entropy(&x, &w, &t, Some(0))).contains("chunk_cols"));
    assert!(err(cuda::linear_cross_entropy(
        &x,
        &w.narrow(1, 0, 3).unwrap(),
        &t,
        None
    ))
    .contains("does not end in d = 3"));
    // The default chunk bounds the logits of one chunk.
    assert_eq!(cuda::ce_chunk_cols(16_384, 49_152), 4096);
    assert_eq!(cuda::ce_chunk_cols(8, 49_152), 49_152);
    assert_eq!(cuda::ce_chunk_cols(1 << 20, 100), 100);
    assert!(cuda::ce_chunk_cols(1 << 20, 1 << 20) == 1024);
}

// ---------------------------------------------------------------------------------------
// Fused AdamW.

/// The trainer's host update (mor-models' `adamw_host`), written out independently: f32
/// values, f64 arithmetic, one rounding per output.
fn adamw_reference(
    w: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    h: &cuda::AdamwHyper,
) -> [Vec<f32>; 3] {
    let (b1, b2) = (h.beta1, h.beta2);
    let (mut wo, mut mo, mut vo) = (vec![], vec![], vec![]);
    for i in 0..w.len() {
        let gi = g[i] as f64;
        let mi = b1 * m[i] as f64 + (1.0 - b1) * gi;
        let vi = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
        mo.push(mi as f32);
        vo.push(vi as f32);
        let upd = h.lr * (mi / h.bc1) / ((vi / h.bc2).sqrt() + h.eps);
        wo.push((w[i] as f64 * (1.0 - h.decay) - upd) as f32);
    }
    [wo, mo, vo]
}

#[test]
fn adamw_step_equals_the_host_update_bit_for_bit() {
    let mut rng = Rng::new(41);
    let f32s = |rng: &mut Rng, n: usize, s: f64| -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * s) as f32).collect()
    };
    // Enough elements that a reordered product or sum would change some rounded result.
    let shape = [120usize, 250];
    let n = 30_000;
    let w = f32s(&mut rng, n, 1.0);
    let g = f32s(&mut rng, n, 1e-2);
    let m = f32s(&mut rng, n, 1e-3);
    let v: Vec<f32> = f32s(&mut rng, n, 1e-4).iter().map(|x| x * x).collect();
    for (t, decay) in [(1i32, 0.0), (7, 3e-4 * 0.1)] {
        let h = cuda::AdamwHyper {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay,
            bc1: 1.0 - 0.9f64.powi(t),
            bc2: 1.0 - 0.95f64.powi(t),
        };
        let ts = [&w, &g, &m, &v].map(|x| Tensor::from_vec(x.clone(), &shape[..], &CPU).unwrap());
        let (wn, mn, vn) = cuda::adamw_step(&ts[0], &ts[1], &ts[2], &ts[3], &h).unwrap();
        let want = adamw_reference(&w, &g, &m, &v, &h);
        for (got, want, name) in [
            (wn, &want[0], "w"),
            (mn, &want[1], "m"),
            (vn, &want[2], "v"),
        ] {
            assert_eq!(got.dims(), shape, "{name}");
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(want), "{name} at t = {t}");
        }
    }
    // Bad input is an error, not a panic.
    let a = Tensor::zeros(4, DType::F32, &CPU).unwrap();
    let b = Tensor::zeros(5, DType::F32, &CPU).unwrap();
    let h = cuda::AdamwHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 0.0,
        bc1: 0.1,
        bc2: 0.05,
    };
    let e = cuda::adamw_step(&a, &b, &a, &a, &h)
        .unwrap_err()
        .to_string();
    assert!(e.contains("g has shape [5]"), "{e}");
    let e = cuda::adamw_step(&a, &a.to_dtype(DType::F64).unwrap(), &a, &a, &h)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F64"), "{e}");
}
