//! The CUDA side of the fused ops (feature `cuda`): loading the kernel modules once per
//! device, and the `cuda_fwd` body of every op. Uses the cudarc that candle re-exports, so
//! buffers are candle's own.
//!
//! Modules come from the PTX that nvcc made at build time; when nvcc was absent at build
//! time, or the driver refuses that PTX (e.g. a PTX ISA newer than the driver), the
//! embedded source is compiled with NVRTC for the device's architecture instead.

use super::launch::{self, LaunchDims};
use super::module::{
    kernel_name, nvrtc_arch, EmbeddedModule, KernelDType, KernelModule, ModuleKey, ModuleOrigin,
};
use super::ops::{
    GatherRopeBwdOp, GatherRopeOp, GatherRowsOp, IndexAddOp, PagedDecodeOp, RmsNormBwdOp,
    RmsNormOp, RopeOp, RouterScoreOp, ScatterAddBwdOp, ScatterAddOp, TopkOp,
};
use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{self, Ptx};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Device, Layout, Shape, Storage, Tensor, WithDType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

type CResult<T> = candle_core::Result<T>;

include!(concat!(env!("OUT_DIR"), "/mor_cuda_modules.rs"));

/// The embedded text of a module.
pub(crate) fn embedded(module: KernelModule) -> Option<&'static EmbeddedModule> {
    EMBEDDED_MODULES.iter().find(|e| e.name == module.name())
}

struct Loaded {
    module: Arc<CudaModule>,
    origin: ModuleOrigin,
}

fn cache() -> &'static Mutex<HashMap<ModuleKey, Loaded>> {
    static CACHE: OnceLock<Mutex<HashMap<ModuleKey, Loaded>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cuda_err(msg: String) -> candle_core::Error {
    candle_core::Error::Cuda(msg.into())
}

fn load(ctx: &Arc<CudaContext>, emb: &EmbeddedModule) -> CResult<Loaded> {
    let mut ptx_error = None;
    if let Some(ptx) = emb.ptx {
        match ctx.load_module(Ptx::from_src(ptx)) {
            Ok(module) => {
                return Ok(Loaded {
                    module,
                    origin: ModuleOrigin::BuildTimePtx,
                })
            }
            Err(e) => ptx_error = Some(e.to_string()),
        }
    }
    let (major, minor) = ctx.compute_capability().w()?;
    let arch = nvrtc_arch(major.max(0) as u32, minor.max(0) as u32);
    let opts = nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".to_string()],
        name: Some(format!("{}.cu", emb.name)),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(emb.source, opts).map_err(|e| {
        cuda_err(format!(
            "NVRTC could not compile module `{}` for {arch}: {e}{}",
            emb.name,
            ptx_error
                .as_deref()
                .map(|p| format!(" (the build-time PTX was refused too: {p})"))
                .unwrap_or_default()
        ))
    })?;
    let module = ctx.load_module(ptx).w()?;
    Ok(Loaded {
        module,
        origin: ModuleOrigin::RuntimeNvrtc,
    })
}

/// The module on the device of `dev`, loaded on first use and cached by
/// (ordinal, module).
fn module(dev: &CudaDevice, m: KernelModule) -> CResult<Arc<CudaModule>> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key = ModuleKey {
        ordinal: ctx.ordinal(),
        module: m,
    };
    let mut cache = cache()
        .lock()
        .map_err(|_| cuda_err("the module cache lock is poisoned".into()))?;
    if let Some(l) = cache.get(&key) {
        return Ok(l.module.clone());
    }
    let emb = embedded(m)
        .ok_or_else(|| cuda_err(format!("module `{m}` is not embedded in this build")))?;
    let loaded = load(ctx, emb)?;
    let module = loaded.module.clone();
    cache.insert(key, loaded);
    Ok(module)
}

/// Every module loaded so far, with where it came from.
pub(crate) fn loaded_modules() -> Vec<(ModuleKey, ModuleOrigin)> {
    let Ok(cache) = cache().lock() else {
        return Vec::new();
    };
    let mut v: Vec<_> = cache.iter().map(|(k, l)| (*k, l.origin)).collect();
    v.sort_by_key(|(k, _)| *k);
    v
}

fn function<T: WithDType>(dev: &CudaDevice, m: KernelModule, base: &str) -> CResult<CudaFunction> {
    let dt = KernelDType::of(T::DTYPE).ok_or_else(|| {
        cuda_err(format!(
            "{base}: the CUDA kernels support f32 and bf16, not {:?}",
            T::DTYPE
        ))
    })?;
    module(dev, m)?.load_function(&kernel_name(base, dt)).w()
}

fn cfg(d: LaunchDims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: d.grid,
        block_dim: d.block,
        shared_mem_bytes: d.shared_mem_bytes,
    }
}

fn lerr(e: Error) -> candle_core::Error {
    candle_core::Error::msg(e)
}

fn u32_arg(op: &'static str, what: &str, v: usize) -> CResult<u32> {
    launch::to_u32(op, what, v).map_err(lerr)
}

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> CResult<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((o1, o2)) => Ok(s.slice(o1..o2)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Runs `f` on the u32 device buffer of an index tensor.
fn with_u32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(CudaView<'_, u32>) -> CResult<R>,
) -> CResult<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(cs) => f(view(cs.as_cuda_slice::<u32>()?, l, what)?),
        _ => candle_core::bail!("{what} must be a CUDA tensor"),
    }
}

fn wrap<T: candle_core::cuda_backend::CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

// The generic bodies take the element type from their slice arguments, so each op is one
// generic function plus a dispatch over the two dtypes.

fn router_score_t<T: DeviceRepr + WithDType>(
    op: &RouterScoreOp,
    h: &CudaSlice<T>,
    hl: &Layout,
    w: &CudaSlice<T>,
    wl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<f32>> {
    const OP: &str = "router_scores";
    let (n, d) = hl.shape().dims2()?;
    let (h, w) = (view(h, hl, "h")?, view(w, wl, "w")?);
    let dims = launch::warp_per_row(n as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Router, "mor_router_score")?;
    let out = dev.alloc_zeros::<f32>(2 * n)?;
    let (n32, d32) = (u32_arg(OP, "n", n)?, u32_arg(OP, "d", d)?);
    let (act, alpha, inv_temp) = (op.act.code(), op.alpha as f32, op.inv_temp as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&h)
        .arg(&w)
        .arg(&out)
        .arg(&n32)
        .arg(&d32)
        .arg(&alpha)
        .arg(&inv_temp)
        .arg(&act);
    // SAFETY: the arguments match the kernel's signature; the buffers hold n*d, d and 2n
    // elements, and the launch covers n rows (one warp each).
    unsafe { b.launch(cfg(dims)) }.w()?;
    Ok(out)
}

pub(crate) fn router_score(
    op: &RouterScoreOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let n = l1.shape().dims2()?.0;
    let out = match (&s1.slice, &s2.slice) {
        (CudaStorageSlice::F32(h), CudaStorageSlice::F32(w)) => {
            router_score_t(op, h, l1, w, l2, dev)?
        }
        (CudaStorageSlice::BF16(h), CudaStorageSlice::BF16(w)) => {
            router_score_t(op, h, l1, w, l2, dev)?
        }
        _ => candle_core::bail!(
            "router_scores: the CUDA kernel takes f32 or bf16 h and w of one dtype"
        ),
    };
    Ok((wrap(out, dev), Shape::from((n, 2))))
}

fn topk_t<T: DeviceRepr + WithDType>(
    op: &TopkOp,
    s: &CudaSlice<T>,
    l: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<u32>> {
    const OP: &str = "topk_sorted";
    let (rows, n) = l.shape().dims2()?;
    let plan = launch::TopkPlan::new(rows as u64, n as u64, op.k as u64).map_err(lerr)?;
    let scores = view(s, l, "scores")?;
    let f = function::<T>(dev, KernelModule::Router, "mor_topk_sorted")?;
    let mut out = dev.alloc_zeros::<u32>(2 * rows * op.k)?;
    let (n32, k32) = (u32_arg(OP, "n", n)?, u32_arg(OP, "k", op.k)?);
    let null = 0u64;
    let stream = dev.cuda_stream();
    let map_tensor = op.map.clone();
    {
        let (mut keep, mut sel) = out.split_at_mut(rows * op.k);
        let mut launch_with = |map: Option<CudaView<'_, u32>>| -> CResult<()> {
            let mut b = stream.launch_builder(&f);
            b.arg(&scores);
            match &map {
                Some(m) => b.arg(m),
                None => b.arg(&null),
            };
            b.arg(&mut keep).arg(&mut sel).arg(&n32).arg(&k32);
            // SAFETY: arguments match `mor_topk_sorted_*`; scores and map hold rows*n
            // elements, keep and sel rows*k; one block per row (TopkPlan).
            unsafe { b.launch(cfg(plan.dims)) }.w()?;
            Ok(())
        };
        match &map_tensor {
            Some(map) => with_u32(map, "map", |m| launch_with(Some(m)))?,
            None => launch_with(None)?,
        }
    }
    Ok(out)
}

pub(crate) fn topk_sorted(
    op: &TopkOp,
    s: &CudaStorage,
    l: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s.device();
    let rows = l.shape().dims2()?.0;
    let out = match &s.slice {
        CudaStorageSlice::F32(x) => topk_t(op, x, l, dev)?,
        CudaStorageSlice::BF16(x) => topk_t(op, x, l, dev)?,
        _ => candle_core::bail!("topk_sorted: the CUDA kernel takes f32 or bf16 scores"),
    };
    Ok((wrap(out, dev), Shape::from((2, rows, op.k))))
}

fn rms_fwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &RmsNormOp,
    x: &CudaSlice<T>,
    xl: &Layout,
    w: &CudaSlice<T>,
    wl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    const OP: &str = "rms_norm";
    let (n, d) = xl.shape().dims2()?;
    let (x, w) = (view(x, xl, "x")?, view(w, wl, "w")?);
    let dims = launch::block_per_row(n as u64, d as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::RmsNorm, "mor_rms_norm_fwd")?;
    let y = dev.alloc_zeros::<T>(n * d)?;
    let (n32, d32, eps) = (u32_arg(OP, "n", n)?, u32_arg(OP, "d", d)?, op.eps as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x).arg(&w).arg(&y).arg(&n32).arg(&d32).arg(&eps);
    // SAFETY: arguments match `mor_rms_norm_fwd_*`; x and y hold n*d elements, w d.
    unsafe { b.launch(cfg(dims)) }.w()?;
    Ok(y)
}

pub(crate) fn rms_norm_fwd(
    op: &RmsNormOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let slice = match (&s1.slice, &s2.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(w)) => {
            CudaStorageSlice::F32(rms_fwd_t(op, x, l1, w, l2, dev)?)
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w)) => {
            CudaStorageSlice::BF16(rms_fwd_t(op, x, l1, w, l2, dev)?)
        }
        _ => candle_core::bail!("rms_norm: the CUDA kernel takes f32 or bf16 x and w of one dtype"),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        l1.shape().clone(),
    ))
}

fn rms_bwd_t<T: DeviceRepr + WithDType>(
    op: &RmsNormBwdOp,
    x: &CudaSlice<T>,
    xl: &Layout,
    w: &CudaSlice<T>,
    wl: &Layout,
    g: &CudaSlice<T>,
    gl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<f32>> {
    const OP: &str = "rms_norm backward";
    let (n, d) = xl.shape().dims2()?;
    let (x, w, g) = (view(x, xl, "x")?, view(w, wl, "w")?, view(g, gl, "grad")?);
    let dims = launch::rms_norm_bwd(n as u64, d as u64).map_err(lerr)?;
    if dims.grid.0 as usize != op.parts {
        candle_core::bail!(
            "rms_norm backward: planned {} partial rows, the launch has {}",
            op.parts,
            dims.grid.0
        );
    }
    let f = function::<T>(dev, KernelModule::RmsNorm, "mor_rms_norm_bwd")?;
    let mut out = dev.alloc_zeros::<f32>(n * d + op.parts * d)?;
    let (n32, d32, eps) = (u32_arg(OP, "n", n)?, u32_arg(OP, "d", d)?, op.eps as f32);
    {
        let (mut dx, mut dw) = out.split_at_mut(n * d);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&w)
            .arg(&g)
            .arg(&mut dx)
            .arg(&mut dw)
            .arg(&n32)
            .arg(&d32)
            .arg(&eps);
        // SAFETY: arguments match `mor_rms_norm_bwd_*`; dx holds n*d and dw parts*d f32,
        // and the grid has exactly `parts` blocks.
        unsafe { b.launch(cfg(dims)) }.w()?;
    }
    Ok(out)
}

pub(crate) fn rms_norm_bwd(
    op: &RmsNormBwdOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let (n, d) = l1.shape().dims2()?;
    let out = match (&s1.slice, &s2.slice, &s3.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(w), CudaStorageSlice::F32(g)) => {
            rms_bwd_t(op, x, l1, w, l2, g, l3, dev)?
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w), CudaStorageSlice::BF16(g)) => {
            rms_bwd_t(op, x, l1, w, l2, g, l3, dev)?
        }
        _ => candle_core::bail!(
            "rms_norm backward: the CUDA kernel takes f32 or bf16 inputs of one dtype"
        ),
    };
    Ok((wrap(out, dev), Shape::from(n * d + op.parts * d)))
}

struct RopeArgs {
    b: u32,
    h: u32,
    t: u32,
    dh: u32,
    max_pos: u32,
}

fn rope_args(op: &'static str, xl: &Layout, cl: &Layout, t: usize) -> CResult<RopeArgs> {
    let (b, h, _, dh) = xl.shape().dims4()?;
    let (max_pos, _) = cl.shape().dims2()?;
    Ok(RopeArgs {
        b: u32_arg(op, "b", b)?,
        h: u32_arg(op, "h", h)?,
        t: u32_arg(op, "t", t)?,
        dh: u32_arg(op, "dh", dh)?,
        max_pos: u32_arg(op, "max_pos", max_pos)?,
    })
}

fn rope_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &RopeOp,
    x: &CudaSlice<T>,
    xl: &Layout,
    c: &CudaSlice<T>,
    cl: &Layout,
    s: &CudaSlice<T>,
    sl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    let t = xl.shape().dims4()?.2;
    let a = rope_args("rope", xl, cl, t)?;
    let (x, c, s) = (view(x, xl, "x")?, view(c, cl, "cos")?, view(s, sl, "sin")?);
    let pairs = a.b as u64 * a.h as u64 * a.t as u64 * (a.dh / 2) as u64;
    let dims = launch::elementwise(pairs).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Rope, "mor_rope_at")?;
    let out = dev.alloc_zeros::<T>(xl.shape().elem_count())?;
    let sign = op.sign as f32;
    let stream = dev.cuda_stream();
    with_u32(&op.pos, "pos", |pos| {
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&pos)
            .arg(&c)
            .arg(&s)
            .arg(&out)
            .arg(&a.b)
            .arg(&a.h)
            .arg(&a.t)
            .arg(&a.dh)
            .arg(&a.max_pos)
            .arg(&sign);
        // SAFETY: arguments match `mor_rope_at_*`; x and out hold b*h*t*dh elements, pos
        // b*t, the tables max_pos*dh/2; the grid-stride loop covers every pair.
        unsafe { b.launch(cfg(dims)) }.w()?;
        Ok(())
    })?;
    Ok(out)
}

macro_rules! three_same {
    ($name:literal, $f:ident, $op:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr, $dev:expr) => {
        match (&$s1.slice, &$s2.slice, &$s3.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b), CudaStorageSlice::F32(c)) => {
                CudaStorageSlice::F32($f($op, a, $l1, b, $l2, c, $l3, $dev)?)
            }
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b), CudaStorageSlice::BF16(c)) => {
                CudaStorageSlice::BF16($f($op, a, $l1, b, $l2, c, $l3, $dev)?)
            }
            _ => candle_core::bail!(
                "{}: the CUDA kernel takes f32 or bf16 inputs of one dtype",
                $name
            ),
        }
    };
}

pub(crate) fn rope_at(
    op: &RopeOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let slice = three_same!("rope", rope_t, op, s1, l1, s2, l2, s3, l3, dev);
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        l1.shape().clone(),
    ))
}

fn gather_rope_fwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &GatherRopeOp,
    x: &CudaSlice<T>,
    xl: &Layout,
    c: &CudaSlice<T>,
    cl: &Layout,
    s: &CudaSlice<T>,
    sl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    const OP: &str = "gather_rope";
    let t = op.idx.dims()[1];
    let a = rope_args(OP, xl, cl, t)?;
    let l = u32_arg(OP, "l", xl.shape().dims4()?.2)?;
    let (x, c, s) = (view(x, xl, "x")?, view(c, cl, "cos")?, view(s, sl, "sin")?);
    let pairs = a.b as u64 * a.h as u64 * a.t as u64 * (a.dh / 2) as u64;
    let dims = launch::elementwise(pairs).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Rope, "mor_gather_rope_fwd")?;
    let out = dev.alloc_zeros::<T>(a.b as usize * a.h as usize * t * a.dh as usize)?;
    let stream = dev.cuda_stream();
    with_u32(&op.idx, "idx", |idx| {
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&idx)
            .arg(&c)
            .arg(&s)
            .arg(&out)
            .arg(&a.b)
            .arg(&a.h)
            .arg(&l)
            .arg(&a.t)
            .arg(&a.dh)
            .arg(&a.max_pos);
        // SAFETY: arguments match `mor_gather_rope_fwd_*`; x holds b*h*l*dh elements, out
        // b*h*t*dh, idx b*t; the grid-stride loop covers every output pair.
        unsafe { b.launch(cfg(dims)) }.w()?;
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn gather_rope_fwd(
    op: &GatherRopeOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let (b, h, _, dh) = l1.shape().dims4()?;
    let slice = three_same!(
        "gather_rope",
        gather_rope_fwd_t,
        op,
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        dev
    );
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((b, h, op.idx.dims()[1], dh)),
    ))
}

fn gather_rope_bwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &GatherRopeBwdOp,
    g: &CudaSlice<T>,
    gl: &Layout,
    c: &CudaSlice<T>,
    cl: &Layout,
    s: &CudaSlice<T>,
    sl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    const OP: &str = "gather_rope backward";
    let t = gl.shape().dims4()?.2;
    let a = rope_args(OP, gl, cl, t)?;
    let l = u32_arg(OP, "l", op.l)?;
    let (g, c, s) = (
        view(g, gl, "grad")?,
        view(c, cl, "cos")?,
        view(s, sl, "sin")?,
    );
    let pairs = a.b as u64 * a.h as u64 * a.t as u64 * (a.dh / 2) as u64;
    let dims = launch::elementwise(pairs).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Rope, "mor_gather_rope_bwd")?;
    let dx = dev.alloc_zeros::<T>(a.b as usize * a.h as usize * op.l * a.dh as usize)?;
    let stream = dev.cuda_stream();
    with_u32(&op.idx, "idx", |idx| {
        let mut b = stream.launch_builder(&f);
        b.arg(&g)
            .arg(&idx)
            .arg(&c)
            .arg(&s)
            .arg(&dx)
            .arg(&a.b)
            .arg(&a.h)
            .arg(&l)
            .arg(&a.t)
            .arg(&a.dh)
            .arg(&a.max_pos);
        // SAFETY: arguments match `mor_gather_rope_bwd_*`; dx (zeroed) holds b*h*l*dh
        // elements, grad b*h*t*dh; the grid-stride loop covers every pair.
        unsafe { b.launch(cfg(dims)) }.w()?;
        Ok(())
    })?;
    Ok(dx)
}

pub(crate) fn gather_rope_bwd(
    op: &GatherRopeBwdOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let (b, h, _, dh) = l1.shape().dims4()?;
    let slice = three_same!(
        "gather_rope backward",
        gather_rope_bwd_t,
        op,
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        dev
    );
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((b, h, op.l, dh)),
    ))
}

fn swiglu_fwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    g: &CudaSlice<T>,
    gl: &Layout,
    u: &CudaSlice<T>,
    ul: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    let n = gl.shape().elem_count();
    let (g, u) = (view(g, gl, "gate")?, view(u, ul, "up")?);
    let dims = launch::elementwise(n as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Swiglu, "mor_swiglu_fwd")?;
    let y = dev.alloc_zeros::<T>(n)?;
    let n64 = n as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&g).arg(&u).arg(&y).arg(&n64);
    // SAFETY: arguments match `mor_swiglu_fwd_*`; every buffer holds n elements.
    unsafe { b.launch(cfg(dims)) }.w()?;
    Ok(y)
}

pub(crate) fn swiglu_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let slice = match (&s1.slice, &s2.slice) {
        (CudaStorageSlice::F32(g), CudaStorageSlice::F32(u)) => {
            CudaStorageSlice::F32(swiglu_fwd_t(g, l1, u, l2, dev)?)
        }
        (CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(u)) => {
            CudaStorageSlice::BF16(swiglu_fwd_t(g, l1, u, l2, dev)?)
        }
        _ => candle_core::bail!("swiglu: the CUDA kernel takes f32 or bf16 inputs of one dtype"),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        l1.shape().clone(),
    ))
}

fn swiglu_bwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    _op: &(),
    g: &CudaSlice<T>,
    gl: &Layout,
    u: &CudaSlice<T>,
    ul: &Layout,
    dy: &CudaSlice<T>,
    dyl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    let n = gl.shape().elem_count();
    let (g, u, dy) = (
        view(g, gl, "gate")?,
        view(u, ul, "up")?,
        view(dy, dyl, "grad")?,
    );
    let dims = launch::elementwise(n as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Swiglu, "mor_swiglu_bwd")?;
    let out = dev.alloc_zeros::<T>(2 * n)?;
    let n64 = n as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&g).arg(&u).arg(&dy).arg(&out).arg(&n64);
    // SAFETY: arguments match `mor_swiglu_bwd_*`; inputs hold n elements, out 2n.
    unsafe { b.launch(cfg(dims)) }.w()?;
    Ok(out)
}

pub(crate) fn swiglu_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let slice = three_same!(
        "swiglu backward",
        swiglu_bwd_t,
        &(),
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        dev
    );
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((2, l1.shape().elem_count())),
    ))
}

fn gather_rows_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &GatherRowsOp,
    h: &CudaSlice<T>,
    hl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    const OP: &str = "gather_tokens";
    let (b, l, d) = hl.shape().dims3()?;
    let k = op.idx.dims()[1];
    let h = view(h, hl, "h")?;
    let dims = launch::row_loop((b * k) as u64, d as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Tokens, "mor_gather_rows")?;
    let out = dev.alloc_zeros::<T>(b * k * d)?;
    let (b32, l32, k32, d32) = (
        u32_arg(OP, "b", b)?,
        u32_arg(OP, "l", l)?,
        u32_arg(OP, "k", k)?,
        u32_arg(OP, "d", d)?,
    );
    let stream = dev.cuda_stream();
    with_u32(&op.idx, "idx", |idx| {
        let mut bl = stream.launch_builder(&f);
        bl.arg(&h)
            .arg(&idx)
            .arg(&out)
            .arg(&b32)
            .arg(&l32)
            .arg(&k32)
            .arg(&d32);
        // SAFETY: arguments match `mor_gather_rows_*`; h holds b*l*d elements, idx b*k,
        // out b*k*d; blocks stride over every output row.
        unsafe { bl.launch(cfg(dims)) }.w()?;
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn gather_rows(
    op: &GatherRowsOp,
    s: &CudaStorage,
    l: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s.device();
    let (b, _, d) = l.shape().dims3()?;
    let slice = match &s.slice {
        CudaStorageSlice::F32(h) => CudaStorageSlice::F32(gather_rows_t(op, h, l, dev)?),
        CudaStorageSlice::BF16(h) => CudaStorageSlice::BF16(gather_rows_t(op, h, l, dev)?),
        _ => candle_core::bail!("gather_tokens: the CUDA kernel takes f32 or bf16 h"),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((b, op.idx.dims()[1], d)),
    ))
}

/// Copies `base` and adds `w * y` into the rows at `idx` (atomically or not).
fn index_add_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    idx_t: &Tensor,
    base: &CudaSlice<T>,
    bl: &Layout,
    y: &CudaSlice<T>,
    yl: &Layout,
    w: Option<CudaView<'_, T>>,
    atomic: bool,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    const OP: &str = "scatter_add_tokens";
    let (b, l, d) = bl.shape().dims3()?;
    let k = idx_t.dims()[1];
    let (base, y) = (view(base, bl, "h")?, view(y, yl, "y")?);
    let mut out = dev.alloc_zeros::<T>(b * l * d)?;
    dev.memcpy_dtod(&base, &mut out)?;
    let dims = launch::row_loop((b * k) as u64, d as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Tokens, "mor_index_add_rows")?;
    let (b32, l32, k32, d32) = (
        u32_arg(OP, "b", b)?,
        u32_arg(OP, "l", l)?,
        u32_arg(OP, "k", k)?,
        u32_arg(OP, "d", d)?,
    );
    let atomic = atomic as i32;
    let null = 0u64;
    let stream = dev.cuda_stream();
    with_u32(idx_t, "idx", |idx| {
        let mut bl = stream.launch_builder(&f);
        bl.arg(&mut out).arg(&idx).arg(&y);
        match &w {
            Some(w) => bl.arg(w),
            None => bl.arg(&null),
        };
        bl.arg(&b32).arg(&l32).arg(&k32).arg(&d32).arg(&atomic);
        // SAFETY: arguments match `mor_index_add_rows_*`; out holds b*l*d elements, y
        // b*k*d, idx and w b*k; without atomics the indices of a row are distinct (the
        // op's contract), so no two threads write one element.
        unsafe { bl.launch(cfg(dims)) }.w()?;
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn index_add_rows(
    op: &IndexAddOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    fn run<T: DeviceRepr + WithDType + ValidAsZeroBits + candle_core::cuda_backend::CudaDType>(
        op: &IndexAddOp,
        base: &CudaSlice<T>,
        bl: &Layout,
        y: &CudaSlice<T>,
        yl: &Layout,
        dev: &CudaDevice,
    ) -> CResult<CudaSlice<T>> {
        match &op.w {
            Some(w) => {
                let (st, wl) = w.storage_and_layout();
                let Storage::Cuda(ws) = &*st else {
                    candle_core::bail!("w must be a CUDA tensor")
                };
                let wv = view(ws.as_cuda_slice::<T>()?, wl, "w")?;
                index_add_t(&op.idx, base, bl, y, yl, Some(wv), op.atomic, dev)
            }
            None => index_add_t(&op.idx, base, bl, y, yl, None, op.atomic, dev),
        }
    }
    let slice = match (&s1.slice, &s2.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(y)) => {
            CudaStorageSlice::F32(run(op, a, l1, y, l2, dev)?)
        }
        (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(y)) => {
            CudaStorageSlice::BF16(run(op, a, l1, y, l2, dev)?)
        }
        _ => candle_core::bail!(
            "index_add_rows: the CUDA kernel takes f32 or bf16 inputs of one dtype"
        ),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        l1.shape().clone(),
    ))
}

fn scatter_fwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &ScatterAddOp,
    h: &CudaSlice<T>,
    hl: &Layout,
    y: &CudaSlice<T>,
    yl: &Layout,
    w: &CudaSlice<T>,
    wl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    let w = view(w, wl, "w")?;
    index_add_t(&op.idx, h, hl, y, yl, Some(w), false, dev)
}

pub(crate) fn scatter_add_fwd(
    op: &ScatterAddOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let slice = three_same!(
        "scatter_add_tokens",
        scatter_fwd_t,
        op,
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        dev
    );
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        l1.shape().clone(),
    ))
}

fn scatter_bwd_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &ScatterAddBwdOp,
    g: &CudaSlice<T>,
    gl: &Layout,
    y: &CudaSlice<T>,
    yl: &Layout,
    w: &CudaSlice<T>,
    wl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    const OP: &str = "scatter_add_tokens backward";
    let (b, l, d) = gl.shape().dims3()?;
    let k = op.idx.dims()[1];
    let (g, y, w) = (view(g, gl, "grad")?, view(y, yl, "y")?, view(w, wl, "w")?);
    let dims = launch::warp_per_row((b * k) as u64).map_err(lerr)?;
    let f = function::<T>(dev, KernelModule::Tokens, "mor_scatter_add_bwd")?;
    let out = dev.alloc_zeros::<T>(b * k * (d + 1))?;
    let (b32, l32, k32, d32) = (
        u32_arg(OP, "b", b)?,
        u32_arg(OP, "l", l)?,
        u32_arg(OP, "k", k)?,
        u32_arg(OP, "d", d)?,
    );
    let stream = dev.cuda_stream();
    with_u32(&op.idx, "idx", |idx| {
        let mut bl = stream.launch_builder(&f);
        bl.arg(&g)
            .arg(&idx)
            .arg(&y)
            .arg(&w)
            .arg(&out)
            .arg(&b32)
            .arg(&l32)
            .arg(&k32)
            .arg(&d32);
        // SAFETY: arguments match `mor_scatter_add_bwd_*`; grad holds b*l*d elements, y
        // b*k*d, idx and w b*k, out b*k*(d+1); one warp per selected row.
        unsafe { bl.launch(cfg(dims)) }.w()?;
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn scatter_add_bwd(
    op: &ScatterAddBwdOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let (b, _, d) = l1.shape().dims3()?;
    let k = op.idx.dims()[1];
    let slice = three_same!(
        "scatter_add_tokens backward",
        scatter_bwd_t,
        op,
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        dev
    );
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((b * k, d + 1)),
    ))
}

fn decode_t<T: DeviceRepr + WithDType + ValidAsZeroBits>(
    op: &PagedDecodeOp,
    q: &CudaSlice<T>,
    ql: &Layout,
    k: &CudaSlice<T>,
    kl: &Layout,
    v: &CudaSlice<T>,
    vl: &Layout,
    dev: &CudaDevice,
) -> CResult<CudaSlice<T>> {
    let plan = op.plan;
    let s = plan.shape;
    let (q, k, v) = (
        view(q, ql, "q")?,
        view(k, kl, "k_cache")?,
        view(v, vl, "v_cache")?,
    );
    let fp = function::<T>(
        dev,
        KernelModule::DecodeAttention,
        "mor_paged_decode_partial",
    )?;
    let fc = function::<T>(
        dev,
        KernelModule::DecodeAttention,
        "mor_paged_decode_combine",
    )?;
    let partial = dev.alloc_zeros::<f32>(plan.partial_len)?;
    let out = dev.alloc_zeros::<T>(s.batch * s.q_heads * s.head_dim)?;
    // DecodePlan::new checked that every size fits u32.
    let (hq, hkv, dh) = (s.q_heads as u32, s.kv_heads as u32, s.head_dim as u32);
    let (bt, mb, nb) = (
        s.block_tokens as u32,
        s.max_blocks as u32,
        s.num_blocks as u32,
    );
    let (pt, np) = (plan.part_tokens as u32, plan.n_parts as u32);
    let scale = 1.0f32 / (s.head_dim as f32).sqrt();
    let stream = dev.cuda_stream();
    with_u32(&op.block_table, "block_table", |table| {
        with_u32(&op.seq_lens, "seq_lens", |lens| {
            let mut b = stream.launch_builder(&fp);
            b.arg(&q)
                .arg(&k)
                .arg(&v)
                .arg(&table)
                .arg(&lens)
                .arg(&partial);
            b.arg(&hq)
                .arg(&hkv)
                .arg(&dh)
                .arg(&bt)
                .arg(&mb)
                .arg(&nb)
                .arg(&pt)
                .arg(&scale);
            // SAFETY: arguments match `mor_paged_decode_partial_*`; the grid is
            // (n_parts, hq, batch), partial holds partial_len f32, the dynamic shared
            // memory is 4 warps * (dh + 2) floats (DecodePlan).
            unsafe { b.launch(cfg(plan.partial)) }.w()?;
            Ok(())
        })
    })?;
    let mut b = stream.launch_builder(&fc);
    b.arg(&partial).arg(&out).arg(&hq).arg(&dh).arg(&np);
    // SAFETY: arguments match `mor_paged_decode_combine_*`; grid (hq, batch), out holds
    // batch*hq*dh elements.
    unsafe { b.launch(cfg(plan.combine)) }.w()?;
    Ok(out)
}

pub(crate) fn paged_decode(
    op: &PagedDecodeOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let dev = s1.device();
    let slice = three_same!(
        "paged_decode_attention",
        decode_t,
        op,
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        dev
    );
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        l1.shape().clone(),
    ))
}

/// Opens CUDA device `ordinal`. A missing driver library or a failed context creation is
/// an error, never a panic.
pub(crate) fn open_device(ordinal: usize) -> Result<Device> {
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(Error::Cuda(
            format!("cannot open CUDA device {ordinal}: {e}").into(),
        )),
        Err(_) => Err(Error::Cuda(
            format!(
                "cannot open CUDA device {ordinal}: the CUDA driver library could not be loaded"
            )
            .into(),
        )),
    }
}

/// Name and compute capability of a CUDA device.
pub(crate) fn device_info(device: &Device) -> Option<(String, (i32, i32))> {
    let dev = device.as_cuda_device().ok()?;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    Some((ctx.name().ok()?, ctx.compute_capability().ok()?))
}
