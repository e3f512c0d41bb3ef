//! The GPU check behind `cargo xtask gpu-check`: every kernel, forward and backward, in f32
//! and bf16, against its CPU body on the same inputs, then a short benchmark of each fused
//! kernel against the same computation in plain candle CUDA ops. Writes a JSON report.
//!
//! Tolerances (elementwise, `|gpu − cpu| <= rtol · max(|cpu|, floor)` with `floor` =
//! 1% of the largest `|cpu|` of the tensor, so entries that cancel to near zero are judged
//! on the tensor's scale): f32 `rtol` = 1e-5, bf16 `rtol` = 1.6e-2. Top-k indices must be
//! equal. The CPU side computes in f64 and rounds once; the kernels compute in f32.
//!
//! The shapes are small, so the whole check takes seconds plus module loading; each bench
//! runs 3 warm-up and 20 timed iterations between device synchronisations.

use super::host::RouterActivation;
use super::ops::{self, RouterParams};
use super::{imp, plain};
use crate::{Error, Result, PAD_POS};
use candle_core::{DType, Device, Tensor, Var};
use mor_core::rng::Rng;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// Relative tolerance of f32 results.
pub const RTOL_F32: f64 = 1e-5;
/// Relative tolerance of bf16 results.
pub const RTOL_BF16: f64 = 1.6e-2;
/// The floor of the relative error, as a fraction of the largest reference magnitude.
pub const REL_FLOOR: f64 = 1e-2;

/// One kernel output compared with its CPU reference.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelCheck {
    /// Kernel and output, e.g. `rms_norm.bwd.dx`.
    pub kernel: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// The input shapes.
    pub shape: String,
    /// Largest `|gpu − cpu|`.
    pub max_abs_err: f64,
    /// Largest `|gpu − cpu| / max(|cpu|, floor)`.
    pub max_rel_err: f64,
    /// The tolerance on `max_rel_err` (0 for exact integer outputs).
    pub rtol: f64,
    /// Whether the output is within tolerance.
    pub passed: bool,
}

/// One fused kernel timed against plain candle ops on the GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// The op (and direction).
    pub op: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// The input shapes.
    pub shape: String,
    /// Mean time of the fused kernel, in microseconds.
    pub fused_us: f64,
    /// Mean time of the plain candle version, when it runs at this size.
    pub plain_us: Option<f64>,
    /// `plain_us / fused_us`.
    pub speedup: Option<f64>,
    /// Timed iterations.
    pub iters: usize,
}

/// Peak device memory of one op at growing sequence lengths: linear in `L` when the
/// growth from `L` to `2L` is about the growth from `L/2` to `L` (a `[L, L]` matrix would
/// make it 4 times as large).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryCheck {
    /// The op (and direction).
    pub op: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// The sequence lengths, ascending.
    pub lens: Vec<usize>,
    /// Peak whole-device used memory (`total − free`) while running at each length, minus
    /// the used memory before the first run, in bytes.
    pub peak_bytes: Vec<u64>,
    /// `(peak[2] − peak[1]) / (peak[1] − peak[0])`: 2 for memory linear in `L`, 4 for
    /// quadratic.
    pub growth: f64,
    /// `growth <` [`MEMORY_GROWTH_MAX`].
    pub passed: bool,
}

/// The largest accepted [`MemoryCheck::growth`] (between linear, 2, and quadratic, 4).
pub const MEMORY_GROWTH_MAX: f64 = 3.0;

/// The outcome of [`gpu_check`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuCheckReport {
    /// Device name.
    pub device: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: Option<(i32, i32)>,
    /// The modules loaded, with where each came from (`BuildTimePtx`, `RuntimeNvrtc`).
    pub modules: Vec<(String, String)>,
    /// Every comparison.
    pub checks: Vec<KernelCheck>,
    /// Every benchmark.
    pub benches: Vec<BenchResult>,
    /// Memory growth checks (absent when the driver reports no memory).
    pub memory: Vec<MemoryCheck>,
    /// Wall time of the whole check in seconds.
    pub elapsed_s: f64,
}

impl GpuCheckReport {
    /// Whether every comparison passed.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty()
            && self.checks.iter().all(|c| c.passed)
            && self.memory.iter().all(|m| m.passed)
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"device\": {},", json_str(&self.device));
        let cc = match self.compute_capability {
            Some((a, b)) => format!("\"{a}.{b}\""),
            None => "null".into(),
        };
        let _ = writeln!(s, "  \"compute_capability\": {cc},");
        let _ = writeln!(s, "  \"passed\": {},", self.passed());
        let _ = writeln!(s, "  \"elapsed_s\": {},", json_num(self.elapsed_s));
        let modules: Vec<String> = self
            .modules
            .iter()
            .map(|(m, o)| {
                format!(
                    "    {{\"module\": {}, \"origin\": {}}}",
                    json_str(m),
                    json_str(o)
                )
            })
            .collect();
        let _ = writeln!(s, "  \"modules\": [\n{}\n  ],", modules.join(",\n"));
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|c| {
                format!(
                    "    {{\"kernel\": {}, \"dtype\": {}, \"shape\": {}, \"max_abs_err\": {}, \"max_rel_err\": {}, \"rtol\": {}, \"passed\": {}}}",
                    json_str(&c.kernel),
                    json_str(&c.dtype),
                    json_str(&c.shape),
                    json_num(c.max_abs_err),
                    json_num(c.max_rel_err),
                    json_num(c.rtol),
                    c.passed
                )
            })
            .collect();
        let _ = writeln!(s, "  \"checks\": [\n{}\n  ],", checks.join(",\n"));
        let benches: Vec<String> = self
            .benches
            .iter()
            .map(|b| {
                format!(
                    "    {{\"op\": {}, \"dtype\": {}, \"shape\": {}, \"fused_us\": {}, \"plain_us\": {}, \"speedup\": {}, \"iters\": {}}}",
                    json_str(&b.op),
                    json_str(&b.dtype),
                    json_str(&b.shape),
                    json_num(b.fused_us),
                    b.plain_us.map_or("null".into(), json_num),
                    b.speedup.map_or("null".into(), json_num),
                    b.iters
                )
            })
            .collect();
        let _ = writeln!(s, "  \"benches\": [\n{}\n  ],", benches.join(",\n"));
        let memory: Vec<String> = self
            .memory
            .iter()
            .map(|m| {
                format!(
                    "    {{\"op\": {}, \"dtype\": {}, \"lens\": {:?}, \"peak_bytes\": {:?}, \"growth\": {}, \"passed\": {}}}",
                    json_str(&m.op),
                    json_str(&m.dtype),
                    m.lens,
                    m.peak_bytes,
                    json_num(m.growth),
                    m.passed
                )
            })
            .collect();
        let _ = writeln!(s, "  \"memory\": [\n{}\n  ]", memory.join(",\n"));
        s.push_str("}\n");
        s
    }
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for ch in v.chars() {
        match ch {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A JSON number; `null` for NaN and infinities.
pub fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// Compares two outputs elementwise (see the module docs for the rule).
pub fn compare(
    kernel: &str,
    dtype: DType,
    shape: &str,
    gpu: &Tensor,
    cpu: &Tensor,
) -> Result<KernelCheck> {
    let a = gpu
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let b = cpu.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let exact = matches!(gpu.dtype(), DType::U32 | DType::U8 | DType::I64);
    let rtol = if exact {
        0.0
    } else if dtype == DType::BF16 {
        RTOL_BF16
    } else {
        RTOL_F32
    };
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    let floor = (REL_FLOOR * scale).max(f64::MIN_POSITIVE);
    let (mut max_abs, mut max_rel, mut ok) = (0f64, 0f64, a.len() == b.len());
    for (x, y) in a.iter().zip(&b) {
        if x.is_nan() || y.is_nan() {
            ok &= x.is_nan() && y.is_nan();
            continue;
        }
        let e = (x - y).abs();
        max_abs = max_abs.max(e);
        max_rel = max_rel.max(e / y.abs().max(floor));
    }
    ok &= max_rel <= rtol;
    Ok(KernelCheck {
        kernel: kernel.to_string(),
        dtype: dtype_name(dtype).into(),
        shape: shape.to_string(),
        max_abs_err: max_abs,
        max_rel_err: max_rel,
        rtol,
        passed: ok,
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Inputs made once on the CPU and copied to the GPU, so both sides see the same values.
struct Pair {
    cpu: Tensor,
    gpu: Tensor,
}

struct Ctx {
    gpu: Device,
    rng: Rng,
    report: GpuCheckReport,
}

impl Ctx {
    fn randn(&mut self, shape: &[usize], dtype: DType) -> Result<Pair> {
        let n = shape.iter().product();
        let cpu =
            Tensor::from_vec(self.rng.normal_vec(n, 1.0), shape, &Device::Cpu)?.to_dtype(dtype)?;
        let gpu = cpu.to_device(&self.gpu)?;
        Ok(Pair { cpu, gpu })
    }

    fn u32s(&mut self, v: Vec<u32>, shape: &[usize]) -> Result<Pair> {
        let cpu = Tensor::from_vec(v, shape, &Device::Cpu)?;
        let gpu = cpu.to_device(&self.gpu)?;
        Ok(Pair { cpu, gpu })
    }

    fn check(
        &mut self,
        kernel: &str,
        dtype: DType,
        shape: &str,
        gpu: &Tensor,
        cpu: &Tensor,
    ) -> Result<()> {
        let c = compare(kernel, dtype, shape, gpu, cpu)?;
        self.report.checks.push(c);
        Ok(())
    }

    /// Runs `f` on both devices with gradients for `inputs`, and compares the outputs and
    /// the gradient of `sum(out · r)` for a fixed random `r` with respect to each input.
    fn check_fwd_bwd(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &str,
        inputs: &[(&str, &Pair)],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let run = |dev_gpu: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|(_, p)| Var::from_tensor(if dev_gpu { &p.gpu } else { &p.cpu }))
                .collect::<candle_core::Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let out = f(&ts)?;
            Ok((out, ts))
        };
        let (out_c, ts_c) = run(false)?;
        let (out_g, ts_g) = run(true)?;
        self.check(&format!("{name}.fwd"), dtype, shape, &out_g, &out_c)?;
        let r = self.randn(out_c.dims(), out_c.dtype())?;
        let gc = (&out_c * &r.cpu)?.sum_all()?.backward()?;
        let gg = (&out_g * &r.gpu)?.sum_all()?.backward()?;
        for (i, (label, _)) in inputs.iter().enumerate() {
            let (Some(a), Some(b)) = (gg.get(&ts_g[i]), gc.get(&ts_c[i])) else {
                return Err(Error::Invalid {
                    op: "gpu_check",
                    msg: format!("{name}: no gradient for {label}"),
                });
            };
            self.check(&format!("{name}.bwd.d{label}"), dtype, shape, a, b)?;
        }
        Ok(())
    }
}

/// Runs the GPU check on CUDA device 0 and writes the JSON report to `out` (a file path;
/// its parent folders are created). The report is returned even when a comparison
/// fails: [`GpuCheckReport::passed`] tells.
///
/// # Errors
/// [`Error::NotCompiledWithCuda`] without the `cuda` feature; [`Error::Cuda`] when no
/// CUDA driver or device is available; an op error or an I/O error.
pub fn gpu_check(out: &Path) -> Result<GpuCheckReport> {
    let t0 = Instant::now();
    let gpu = imp::open_device(0)?;
    let (device, cc) = match imp::device_info(&gpu) {
        Some((n, cc)) => (n, Some(cc)),
        None => (format!("{gpu:?}"), None),
    };
    let mut cx = Ctx {
        gpu,
        rng: Rng::new(0x6d6f_725f_6375),
        report: GpuCheckReport {
            device,
            compute_capability: cc,
            ..Default::default()
        },
    };
    for dtype in [DType::F32, DType::BF16] {
        check_all(&mut cx, dtype)?;
    }
    for dtype in [DType::F32, DType::BF16] {
        bench_all(&mut cx, dtype)?;
    }
    cx.report.modules = imp::loaded_modules()
        .into_iter()
        .map(|(k, o)| (k.to_string(), format!("{o:?}")))
        .collect();
    cx.report.elapsed_s = t0.elapsed().as_secs_f64();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| mor_core::Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(out, cx.report.to_json()).map_err(|source| mor_core::Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(cx.report)
}

fn sorted_distinct(rng: &mut Rng, rows: usize, l: usize, k: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let mut all: Vec<u32> = (0..l as u32).collect();
        rng.shuffle(&mut all);
        let mut row = all[..k].to_vec();
        row.sort_unstable();
        v.extend(row);
    }
    v
}

fn check_all(cx: &mut Ctx, dt: DType) -> Result<()> {
    // Router score and gate.
    let (h, w) = (cx.randn(&[64, 96], dt)?, cx.randn(&[96], dt)?);
    let p = RouterParams {
        alpha: 0.1,
        temp: 1.0,
        activation: RouterActivation::Sigmoid,
    };
    cx.check_fwd_bwd(
        "router_scores.z+g",
        dt,
        "h [64, 96]",
        &[("h", &h), ("w", &w)],
        &|t| {
            let (z, g) = ops::router_scores(&t[0], &t[1], p)?;
            Ok(Tensor::cat(&[z, g], 0)?)
        },
    )?;
    let pt = RouterParams {
        alpha: 1.0,
        temp: 2.0,
        activation: RouterActivation::Tanh,
    };
    cx.check_fwd_bwd(
        "router_scores.tanh",
        dt,
        "h [64, 96]",
        &[("h", &h), ("w", &w)],
        &|t| Ok(ops::router_scores(&t[0], &t[1], pt)?.1),
    )?;

    // Top-k with ties (values rounded to one decimal), a candidate map, and one long row.
    for (rows, n, k) in [
        (3usize, 5000usize, 1234usize),
        (2, 257, 1),
        (1, 300_000, 100_000),
    ] {
        let raw = cx.randn(&[rows, n], DType::F32)?;
        let scores = (raw.cpu * 10.0)?.round()?.affine(0.1, 0.0)?.to_dtype(dt)?;
        let map: Vec<u32> = (0..rows * n).map(|i| 2 * (i % n) as u32 + 1).collect();
        let map = cx.u32s(map, &[rows, n])?;
        let c = ops::topk_sorted(&scores, k, Some(&map.cpu))?;
        let g = ops::topk_sorted(&scores.to_device(&cx.gpu)?, k, Some(&map.gpu))?;
        let shape = format!("scores [{rows}, {n}], k = {k}");
        cx.check("topk_sorted.keep", dt, &shape, &g.keep, &c.keep)?;
        cx.check("topk_sorted.sel", dt, &shape, &g.sel, &c.sel)?;
    }

    // RMSNorm: a row narrower than a warp multiple, and one wider than a block.
    for (n, d) in [(33usize, 257usize), (5, 2050)] {
        let (x, w) = (cx.randn(&[n, d], dt)?, cx.randn(&[d], dt)?);
        cx.check_fwd_bwd(
            "rms_norm",
            dt,
            &format!("x [{n}, {d}]"),
            &[("x", &x), ("w", &w)],
            &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
        )?;
    }

    // RoPE at positions (with padding), and fused gather + RoPE.
    let (cos, sin) = crate::rope_tables(128, 64, 10_000.0, &Device::Cpu)?;
    let (cos, sin) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
    let (cos_g, sin_g) = (cos.to_device(&cx.gpu)?, sin.to_device(&cx.gpu)?);
    let x = cx.randn(&[2, 3, 17, 64], dt)?;
    let mut pos: Vec<u32> = (0..34).map(|i| (i * 7 % 128) as u32).collect();
    pos[5] = PAD_POS;
    let pos = cx.u32s(pos, &[2, 17])?;
    {
        let (cc, sc, cg, sg, pc, pg) = (
            cos.clone(),
            sin.clone(),
            cos_g.clone(),
            sin_g.clone(),
            pos.cpu.clone(),
            pos.gpu.clone(),
        );
        cx.check_fwd_bwd("rope_at", dt, "x [2, 3, 17, 64]", &[("x", &x)], &move |t| {
            if t[0].device().is_cuda() {
                ops::rope_at(&t[0], &pg, &cg, &sg)
            } else {
                ops::rope_at(&t[0], &pc, &cc, &sc)
            }
        })?;
    }
    let x = cx.randn(&[2, 3, 40, 64], dt)?;
    let mut idx = sorted_distinct(&mut cx.rng, 2, 40, 11);
    idx[21] = PAD_POS;
    let idx = cx.u32s(idx, &[2, 11])?;
    {
        let (cc, sc, cg, sg, ic, ig) = (
            cos.clone(),
            sin.clone(),
            cos_g.clone(),
            sin_g.clone(),
            idx.cpu.clone(),
            idx.gpu.clone(),
        );
        cx.check_fwd_bwd(
            "gather_rope",
            dt,
            "x [2, 3, 40, 64], idx [2, 11]",
            &[("x", &x)],
            &move |t| {
                if t[0].device().is_cuda() {
                    ops::gather_rope(&t[0], &ig, &cg, &sg)
                } else {
                    ops::gather_rope(&t[0], &ic, &cc, &sc)
                }
            },
        )?;
    }

    // SwiGLU.
    let (g, u) = (cx.randn(&[37, 130], dt)?, cx.randn(&[37, 130], dt)?);
    cx.check_fwd_bwd(
        "swiglu",
        dt,
        "[37, 130]",
        &[("gate", &g), ("up", &u)],
        &|t| ops::swiglu(&t[0], &t[1]),
    )?;

    // Gather (with a repeated index, exercising the atomic backward) and scatter-add.
    let h = cx.randn(&[2, 50, 72], dt)?;
    let mut gidx = sorted_distinct(&mut cx.rng, 2, 50, 13);
    gidx[3] = gidx[4];
    let gidx = cx.u32s(gidx, &[2, 13])?;
    {
        let (ic, ig) = (gidx.cpu.clone(), gidx.gpu.clone());
        cx.check_fwd_bwd(
            "gather_rows",
            dt,
            "h [2, 50, 72], idx [2, 13]",
            &[("h", &h)],
            &move |t| ops::gather_rows(&t[0], if t[0].device().is_cuda() { &ig } else { &ic }),
        )?;
    }
    let sidx = sorted_distinct(&mut cx.rng, 2, 50, 13);
    let sidx = cx.u32s(sidx, &[2, 13])?;
    let (y, wt) = (cx.randn(&[2, 13, 72], dt)?, cx.randn(&[2, 13], dt)?);
    {
        let (ic, ig) = (sidx.cpu.clone(), sidx.gpu.clone());
        cx.check_fwd_bwd(
            "scatter_add_rows",
            dt,
            "h [2, 50, 72], idx [2, 13]",
            &[("h", &h), ("y", &y), ("w", &wt)],
            &move |t| {
                ops::scatter_add_rows(
                    &t[0],
                    if t[0].device().is_cuda() { &ig } else { &ic },
                    &t[1],
                    Some(&t[2]),
                )
            },
        )?;
    }

    // Paged decode attention: GQA, an empty request, partial blocks, several parts.
    let (b, hq, hkv, dh, bt, nb, mb) = (3usize, 8usize, 2usize, 64usize, 16usize, 20usize, 6usize);
    let q = cx.randn(&[b, hq, dh], dt)?;
    let kc = cx.randn(&[nb, bt, hkv, dh], dt)?;
    let vc = cx.randn(&[nb, bt, hkv, dh], dt)?;
    let mut blocks: Vec<u32> = (0..nb as u32).collect();
    cx.rng.shuffle(&mut blocks);
    let table = cx.u32s(blocks[..b * mb].to_vec(), &[b, mb])?;
    let lens = cx.u32s(vec![0, 37, 96], &[b])?;
    let c = ops::paged_decode_attention(&q.cpu, &kc.cpu, &vc.cpu, &table.cpu, &lens.cpu, Some(32))?;
    let g = ops::paged_decode_attention(&q.gpu, &kc.gpu, &vc.gpu, &table.gpu, &lens.gpu, Some(32))?;
    cx.check(
        "paged_decode_attention",
        dt,
        "q [3, 8, 64], cache [20, 16, 2, 64], 6 blocks/request",
        &g,
        &c,
    )?;
    check_flash_attention(cx, dt)?;
    check_cross_entropy(cx, dt)?;
    if dt == DType::F32 {
        check_adamw(cx)?;
        check_mixed_precision(cx)?;
    }
    Ok(())
}

/// bf16 mixed precision (`train.precision = "bf16"`): the `cuda` backend's products on the
/// device (cuBLAS in bf16, the flash-attention kernels on bf16 `q, k, v`, the chunked
/// cross-entropy with bf16 chunk products) against the same backend's host emulation
/// (the CPU bodies and the host arithmetic of a bf16 GEMM), on f32 inputs, outputs and
/// gradients at the bf16 tolerance. Both sides compute the same function up to the order
/// of f32 sums, which can move a bf16-rounded result by one bf16 step.
fn check_mixed_precision(cx: &mut Ctx) -> Result<()> {
    use crate::Backend;
    use mor_core::config::Precision;
    let on_gpu = super::CudaBackend::on_device(cx.gpu.clone())?.with_precision(Precision::Bf16);
    let on_cpu = super::CudaBackend::host_emulation().with_precision(Precision::Bf16);
    let be = |t: &Tensor| {
        if t.device().is_cuda() {
            &on_gpu
        } else {
            &on_cpu
        }
    };
    let bf = DType::BF16; // the tolerance of bf16 results; the tensors are f32
    let x = cx.randn(&[64, 96], DType::F32)?;
    let w = cx.randn(&[80, 96], DType::F32)?;
    cx.check_fwd_bwd(
        "mixed_bf16.linear",
        bf,
        "x [64, 96] f32, w [80, 96] f32",
        &[("x", &x), ("w", &w)],
        &|t| be(&t[0]).linear(&t[0], &t[1]),
    )?;
    let (b, hq, hkv, t, dh) = (2usize, 8usize, 2usize, 70usize, 64usize);
    let q = cx.randn(&[b, hq, t, dh], DType::F32)?;
    let k = cx.randn(&[b, hkv, t, dh], DType::F32)?;
    let v = cx.randn(&[b, hkv, t, dh], DType::F32)?;
    let mut pos: Vec<u32> = (0..t as u32)
        .map(|i| 2 * i + i % 3)
        .collect::<Vec<_>>()
        .repeat(b);
    pos[9] = PAD_POS;
    pos[t + 40] = PAD_POS;
    let pos = cx.u32s(pos, &[b, t])?;
    cx.check_fwd_bwd(
        "mixed_bf16.attention",
        bf,
        &format!("q [{b}, {hq}, {t}, {dh}] f32, k/v [{b}, {hkv}, {t}, {dh}] f32"),
        &[("q", &q), ("k", &k), ("v", &v)],
        &|x| {
            let p = if x[0].device().is_cuda() {
                &pos.gpu
            } else {
                &pos.cpu
            };
            be(&x[0]).attention(&x[0], &x[1], &x[2], p, p)
        },
    )?;
    let (n, d, vocab) = (37usize, 64usize, 1000usize);
    let x = cx.randn(&[n, d], DType::F32)?;
    let w = cx.randn(&[vocab, d], DType::F32)?;
    let targets: Vec<u32> = (0..n).map(|i| ((i * 389 + 7) % vocab) as u32).collect();
    let targets = cx.u32s(targets, &[n])?;
    cx.check_fwd_bwd(
        "mixed_bf16.linear_cross_entropy",
        bf,
        &format!("x [{n}, {d}] f32, w [{vocab}, {d}] f32, chunks of 96"),
        &[("x", &x), ("w", &w)],
        &|t| {
            let tg = if t[0].device().is_cuda() {
                &targets.gpu
            } else {
                &targets.cpu
            };
            ops::linear_cross_entropy_with(&t[0], &t[1], tg, Some(96), Precision::Bf16)
        },
    )?;
    Ok(())
}

/// The chunked LM-head cross-entropy (loss, `dx`, `dw`) against its CPU body: a vocabulary
/// of 1000 in chunks of 96 (the last one partial), targets in several chunks.
fn check_cross_entropy(cx: &mut Ctx, dt: DType) -> Result<()> {
    let (n, d, vocab) = (37usize, 64usize, 1000usize);
    let x = cx.randn(&[n, d], dt)?;
    let w = cx.randn(&[vocab, d], dt)?;
    let targets: Vec<u32> = (0..n).map(|i| ((i * 389 + 7) % vocab) as u32).collect();
    let targets = cx.u32s(targets, &[n])?;
    cx.check_fwd_bwd(
        "linear_cross_entropy.chunked",
        dt,
        &format!("x [{n}, {d}], w [{vocab}, {d}], chunks of 96"),
        &[("x", &x), ("w", &w)],
        &move |t| {
            let tg = if t[0].device().is_cuda() {
                &targets.gpu
            } else {
                &targets.cpu
            };
            ops::linear_cross_entropy(&t[0], &t[1], tg, Some(96))
        },
    )
}

/// The fused AdamW step against the host arithmetic: f32 results must be equal bit for bit
/// (`rtol` 0).
fn check_adamw(cx: &mut Ctx) -> Result<()> {
    let n = 100_003;
    let w = cx.randn(&[n], DType::F32)?;
    let g = cx.randn(&[n], DType::F32)?;
    let m = cx.randn(&[n], DType::F32)?;
    let v = cx.randn(&[n], DType::F32)?;
    let (vc, vg) = (v.cpu.sqr()?, v.gpu.sqr()?);
    let h = ops::AdamwHyper {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 3e-5,
        bc1: 1.0 - 0.9f64.powi(3),
        bc2: 1.0 - 0.95f64.powi(3),
    };
    let c = ops::adamw_step(&w.cpu, &g.cpu, &m.cpu, &vc, &h)?;
    let r = ops::adamw_step(&w.gpu, &g.gpu, &m.gpu, &vg, &h)?;
    for (name, a, b) in [("w", &r.0, &c.0), ("m", &r.1, &c.1), ("v", &r.2, &c.2)] {
        let mut k = compare(
            &format!("adamw_step.{name}"),
            DType::F32,
            &format!("[{n}]"),
            a,
            b,
        )?;
        k.rtol = 0.0;
        k.passed = k.max_abs_err == 0.0;
        cx.report.checks.push(k);
    }
    Ok(())
}

/// Flash attention forward and backward against its CPU body: recursion-wise (gathered,
/// gapped positions with a padded query and key, several key tiles, GQA 8/2, dh = 64),
/// shared step-1 K/V (a few queries against every step-1 key, s > t, dh = 40), and keys
/// in no particular order (dh = 128).
fn check_flash_attention(cx: &mut Ctx, dt: DType) -> Result<()> {
    let sel: Vec<u32> = (0..100u32).map(|i| 3 * i + i % 2).collect();
    let mut qp = sel.repeat(2);
    qp[7] = PAD_POS;
    let mut kp = sel.repeat(2);
    kp[111] = PAD_POS;
    let mut shuffled: Vec<u32> = (0..45u32).collect();
    cx.rng.shuffle(&mut shuffled);
    let cases: [(&str, [usize; 6], Vec<u32>, Vec<u32>); 3] = [
        ("recursion-wise", [2, 8, 2, 100, 100, 64], qp, kp),
        (
            "shared step-1",
            [2, 6, 3, 9, 150, 40],
            [0u32, 5, 9, 33, 34, 60, 99, 120, 149].repeat(2),
            (0..150u32).chain(1..151).collect(),
        ),
        (
            "unsorted keys",
            [1, 4, 4, 13, 45, 128],
            (0..13u32).map(|i| 3 * i).collect(),
            shuffled,
        ),
    ];
    for (name, [b, hq, hkv, t, s, dh], qp, kp) in cases {
        let q = cx.randn(&[b, hq, t, dh], dt)?;
        let k = cx.randn(&[b, hkv, s, dh], dt)?;
        let v = cx.randn(&[b, hkv, s, dh], dt)?;
        let (qp, kp) = (cx.u32s(qp, &[b, t])?, cx.u32s(kp, &[b, s])?);
        cx.check_fwd_bwd(
            &format!("flash_attention.{name}"),
            dt,
            &format!("q [{b}, {hq}, {t}, {dh}], k/v [{b}, {hkv}, {s}, {dh}]"),
            &[("q", &q), ("k", &k), ("v", &v)],
            &move |x| {
                let (qp, kp) = if x[0].device().is_cuda() {
                    (&qp.gpu, &kp.gpu)
                } else {
                    (&qp.cpu, &kp.cpu)
                };
                ops::flash_attention(&x[0], &x[1], &x[2], qp, kp)
            },
        )?;
    }
    Ok(())
}

fn time_us(dev: &Device, iters: usize, f: &mut dyn FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
}

fn bench(
    cx: &mut Ctx,
    op: &str,
    dt: DType,
    shape: &str,
    fused: &mut dyn FnMut() -> Result<Tensor>,
    plain: Option<&mut dyn FnMut() -> Result<Tensor>>,
) -> Result<()> {
    const ITERS: usize = 20;
    let fused_us = time_us(&cx.gpu, ITERS, fused)?;
    // A plain version that cannot run at this size (e.g. a sort over a long row) is
    // reported as missing rather than failing the check.
    let plain_us = match plain {
        Some(p) => time_us(&cx.gpu, ITERS, p).ok(),
        None => None,
    };
    cx.report.benches.push(BenchResult {
        op: op.into(),
        dtype: dtype_name(dt).into(),
        shape: shape.into(),
        fused_us,
        plain_us,
        speedup: plain_us.map(|p| p / fused_us),
        iters: ITERS,
    });
    Ok(())
}

fn bench_all(cx: &mut Ctx, dt: DType) -> Result<()> {
    let dev = cx.gpu.clone();
    let randn = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dt)?)
    };

    let (x, w) = (randn(&[4096, 1024])?, randn(&[1024])?);
    bench(
        cx,
        "rms_norm.fwd",
        dt,
        "x [4096, 1024]",
        &mut || ops::rms_norm(&x, &w, 1e-5),
        Some(&mut || plain::rms_norm(&x, &w, 1e-5)),
    )?;
    let xv = Var::from_tensor(&x)?;
    let r = randn(&[4096, 1024])?;
    bench(
        cx,
        "rms_norm.fwd+bwd",
        dt,
        "x [4096, 1024]",
        &mut || {
            Ok((ops::rms_norm(xv.as_tensor(), &w, 1e-5)? * &r)?
                .sum_all()?
                .backward()?
                .get(xv.as_tensor())
                .cloned()
                .unwrap_or(r.clone()))
        },
        Some(&mut || {
            Ok((plain::rms_norm(xv.as_tensor(), &w, 1e-5)? * &r)?
                .sum_all()?
                .backward()?
                .get(xv.as_tensor())
                .cloned()
                .unwrap_or(r.clone()))
        }),
    )?;

    let (g, u) = (randn(&[4096, 2816])?, randn(&[4096, 2816])?);
    bench(
        cx,
        "swiglu.fwd",
        dt,
        "[4096, 2816]",
        &mut || ops::swiglu(&g, &u),
        Some(&mut || plain::swiglu(&g, &u)),
    )?;

    let hs = randn(&[8 * 2048, 1024])?;
    let wr = randn(&[1024])?;
    let p = RouterParams::default();
    bench(
        cx,
        "router_scores.fwd",
        dt,
        "h [16384, 1024]",
        &mut || Ok(ops::router_scores(&hs, &wr, p)?.1),
        Some(&mut || Ok(plain::router_scores(&hs, &wr, p)?.1)),
    )?;

    let scores = randn(&[8, 2048])?;
    bench(
        cx,
        "topk_sorted",
        dt,
        "scores [8, 2048], k = 1365",
        &mut || Ok(ops::topk_sorted(&scores, 1365, None)?.keep),
        Some(&mut || plain::topk_sorted(&scores, 1365)),
    )?;
    let long = randn(&[1, 1 << 20])?;
    bench(
        cx,
        "topk_sorted",
        dt,
        "scores [1, 1048576], k = 349525",
        &mut || Ok(ops::topk_sorted(&long, 349_525, None)?.keep),
        None,
    )?;

    let (cos, sin) = crate::rope_tables(2048, 64, 10_000.0, &dev)?;
    let (cos, sin) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
    let xr = randn(&[4, 16, 2048, 64])?;
    let pos = Tensor::arange(0u32, 2048, &dev)?
        .unsqueeze(0)?
        .repeat((4, 1))?;
    bench(
        cx,
        "rope_at.fwd",
        dt,
        "x [4, 16, 2048, 64]",
        &mut || ops::rope_at(&xr, &pos, &cos, &sin),
        Some(&mut || plain::rope_at(&xr, &pos, &cos, &sin)),
    )?;
    let sel: Vec<u32> = (0..4)
        .flat_map(|_| (0..2048u32).filter(|i| i % 3 != 2))
        .collect();
    let k = sel.len() / 4;
    let sel = Tensor::from_vec(sel, (4, k), &Device::Cpu)?.to_device(&dev)?;
    bench(
        cx,
        "gather_rope.fwd",
        dt,
        "x [4, 16, 2048, 64], idx [4, 1366]",
        &mut || ops::gather_rope(&xr, &sel, &cos, &sin),
        Some(&mut || plain::gather_rope(&xr, &sel, &cos, &sin)),
    )?;

    let h = randn(&[4, 2048, 1024])?;
    bench(
        cx,
        "gather_rows.fwd",
        dt,
        "h [4, 2048, 1024], idx [4, 1366]",
        &mut || ops::gather_rows(&h, &sel),
        Some(&mut || plain::gather_rows(&h, &sel)),
    )?;
    let (y, wg) = (randn(&[4, k, 1024])?, randn(&[4, k])?);
    bench(
        cx,
        "scatter_add_rows.fwd",
        dt,
        "h [4, 2048, 1024], idx [4, 1366]",
        &mut || ops::scatter_add_rows(&h, &sel, &y, Some(&wg)),
        Some(&mut || plain::scatter_add_rows(&h, &sel, &y, Some(&wg))),
    )?;

    let (b, hq, hkv, dh, bt, ctx) = (32usize, 16usize, 4usize, 64usize, 16usize, 2048usize);
    let mb = ctx / bt;
    let q = randn(&[b, hq, dh])?;
    let kc = randn(&[b * mb, bt, hkv, dh])?;
    let vc = randn(&[b * mb, bt, hkv, dh])?;
    let table = Tensor::arange(0u32, (b * mb) as u32, &dev)?.reshape((b, mb))?;
    let lens = Tensor::from_vec(
        (0..b as u32)
            .map(|i| ctx as u32 - 37 * i)
            .collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )?
    .to_device(&dev)?;
    bench(
        cx,
        "paged_decode_attention",
        dt,
        "b = 32, hq = 16, hkv = 4, dh = 64, up to 2048 tokens in blocks of 16",
        &mut || ops::paged_decode_attention(&q, &kc, &vc, &table, &lens, None),
        Some(&mut || plain::paged_decode_attention(&q, &kc, &vc, &table, &lens)),
    )?;
    bench_flash_attention(cx, dt)?;

    // The LM head + cross-entropy: 8 × 1024 tokens, d = 576, vocabulary 49152 (the 135m
    // preset's head), forward + backward, against the full logits in plain candle ops.
    let (n, d, vocab) = (8192usize, 576usize, 49_152usize);
    let xh = Var::from_tensor(&randn(&[n, d])?)?;
    let wh = Var::from_tensor(&(randn(&[vocab, d])? * 0.05)?)?;
    let targets = Tensor::arange(0u32, n as u32, &dev)?;
    let ce_plain = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
        let logits = x.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        Ok(crate::loss::cross_entropy(&logits, &targets)?)
    };
    let shape = format!("x [{n}, {d}], w [{vocab}, {d}]");
    bench(
        cx,
        "linear_cross_entropy.fwd+bwd",
        dt,
        &shape,
        &mut || {
            let l = ops::linear_cross_entropy(xh.as_tensor(), wh.as_tensor(), &targets, None)?;
            grad_of(&l, wh.as_tensor())
        },
        Some(&mut || {
            let l = ce_plain(xh.as_tensor(), wh.as_tensor())?;
            grad_of(&l, wh.as_tensor())
        }),
    )?;

    // AdamW over one 16M-element parameter: the fused kernel against tensor ops.
    if dt == DType::F32 {
        let n = 1 << 24;
        let (w, g, m) = (randn(&[n])?, randn(&[n])?, randn(&[n])?);
        let v = m.sqr()?;
        let h = ops::AdamwHyper {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 3e-5,
            bc1: 0.271,
            bc2: 0.142_625,
        };
        bench(
            cx,
            "adamw_step",
            dt,
            "[16777216]",
            &mut || Ok(ops::adamw_step(&w, &g, &m, &v, &h)?.0),
            Some(&mut || {
                let m2 = ((&m * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
                let v2 = ((&v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
                let den = ((&v2 / h.bc2)?.sqrt()? + h.eps)?;
                let upd = (((&m2 / h.bc1)? / den)? * h.lr)?;
                Ok(((&w * (1.0 - h.decay))? - upd)?)
            }),
        )?;
    }
    Ok(())
}

/// The gradient of `loss` with respect to `x`.
fn grad_of(loss: &Tensor, x: &Tensor) -> Result<Tensor> {
    loss.backward()?
        .get(x)
        .cloned()
        .ok_or_else(|| Error::Invalid {
            op: "gpu_check",
            msg: "no gradient".into(),
        })
}

/// Causal self-attention inputs `(q, k, v, pos)` at sequence length `l`: batch 4, 16 query
/// heads, 4 key/value heads, dh = 64, positions `0..l`.
fn attention_inputs(dev: &Device, dt: DType, l: usize) -> Result<[Tensor; 4]> {
    let randn = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dt)?)
    };
    let pos = Tensor::arange(0u32, l as u32, dev)?
        .unsqueeze(0)?
        .repeat((4, 1))?;
    Ok([
        randn(&[4, 16, l, 64])?,
        randn(&[4, 4, l, 64])?,
        randn(&[4, 4, l, 64])?,
        pos,
    ])
}

type AttnFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// Forward and backward of `f`: the gradients of `sum(out · r)` with respect to q, k, v.
fn attention_fwd_bwd(f: AttnFn, x: &[Tensor; 4], r: &Tensor) -> Result<Tensor> {
    let vars = [&x[0], &x[1], &x[2]].map(Var::from_tensor);
    let [q, k, v] = vars;
    let (q, k, v) = (q?, k?, v?);
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &x[3], &x[3])?;
    let g = (out * r)?.sum_all()?.backward()?;
    g.get(q.as_tensor()).cloned().ok_or_else(|| Error::Invalid {
        op: "gpu_check",
        msg: "attention: no gradient for q".into(),
    })
}

/// Flash attention against plain candle ops at L = 2048 (forward, and forward + backward),
/// and the growth of its peak memory from L = 1024 to 2048 to 4096 (the plain ops' too).
fn bench_flash_attention(cx: &mut Ctx, dt: DType) -> Result<()> {
    let dev = cx.gpu.clone();
    let l = 2048;
    let x = attention_inputs(&dev, dt, l)?;
    let shape = format!("q [4, 16, {l}, 64], k/v [4, 4, {l}, 64], causal");
    bench(
        cx,
        "flash_attention.fwd",
        dt,
        &shape,
        &mut || ops::flash_attention(&x[0], &x[1], &x[2], &x[3], &x[3]),
        Some(&mut || plain::attention(&x[0], &x[1], &x[2], &x[3], &x[3])),
    )?;
    let r = Tensor::randn(0f32, 1.0, x[0].dims(), &dev)?.to_dtype(dt)?;
    bench(
        cx,
        "flash_attention.fwd+bwd",
        dt,
        &shape,
        &mut || attention_fwd_bwd(ops::flash_attention, &x, &r),
        Some(&mut || attention_fwd_bwd(plain::attention, &x, &r)),
    )?;
    drop((x, r));
    for (op, f) in [
        ("flash_attention.fwd+bwd", ops::flash_attention as AttnFn),
        ("plain attention.fwd+bwd", plain::attention as AttnFn),
    ] {
        if let Some(m) = memory_growth(&dev, dt, op, f)? {
            // Only the fused op is held to linear growth; the plain ops are the contrast.
            let m = if op.starts_with("plain") {
                MemoryCheck { passed: true, ..m }
            } else {
                m
            };
            cx.report.memory.push(m);
        }
    }
    Ok(())
}

/// Peak used memory of one forward + backward of `f` at L = 1024, 2048, 4096 (in this
/// order, so memory cached by a shorter run cannot hide the growth of a longer one).
fn memory_growth(dev: &Device, dt: DType, op: &str, f: AttnFn) -> Result<Option<MemoryCheck>> {
    let lens = vec![1024usize, 2048, 4096];
    dev.synchronize()?;
    let Some((free, total)) = imp::memory_info(dev) else {
        return Ok(None);
    };
    let base = total.saturating_sub(free) as u64;
    let mut peaks = Vec::with_capacity(lens.len());
    for &l in &lens {
        let x = attention_inputs(dev, dt, l)?;
        let r = Tensor::randn(0f32, 1.0, x[0].dims(), dev)?.to_dtype(dt)?;
        dev.synchronize()?;
        let sampler = super::PeakMemory::start(dev, std::time::Duration::from_micros(200));
        let g = attention_fwd_bwd(f, &x, &r)?;
        dev.synchronize()?;
        drop(g);
        let Some(peak) = sampler.finish() else {
            return Ok(None);
        };
        peaks.push(peak.saturating_sub(base));
    }
    let growth = (peaks[2] as f64 - peaks[1] as f64) / (peaks[1] as f64 - peaks[0] as f64);
    Ok(Some(MemoryCheck {
        op: op.into(),
        dtype: dtype_name(dt).into(),
        lens,
        peak_bytes: peaks,
        growth,
        passed: growth.is_finite() && growth < MEMORY_GROWTH_MAX,
    }))
}
