//! The CUDA side of the fused ops (feature `cuda`): loading the kernel modules once per
//! device, and the one generic launch path of every op. Uses the cudarc that candle re-exports, so
//! buffers are candle's own.
//!
//! Every op reaches the device through one path: [`execute`] runs the op's [`Plan`] (the
//! kernels of the table in `plan.rs`, their grids and arguments) for f32 or bf16 inputs.
//!
//! Modules come from the PTX that nvcc made at build time; when nvcc was absent at build
//! time, or the driver refuses that PTX (e.g. a PTX ISA newer than the driver), the
//! embedded source is compiled with NVRTC for the device's architecture instead.

use super::launch::LaunchDims;
use super::module::{
    kernel_name, nvrtc_arch, EmbeddedModule, KernelDType, KernelModule, ModuleKey, ModuleOrigin,
};
use super::plan::{Arg, Elem, Plan};
use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaView, CudaViewMut, DeviceRepr,
    LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{self, Ptx};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Device, Layout, Shape, Storage, WithDType};
use std::collections::HashMap;
use std::ops::Range;
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

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> CResult<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((o1, o2)) => Ok(s.slice(o1..o2)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

/// A buffer of a plan, of its element type.
enum DevBuf<T> {
    T(CudaSlice<T>),
    F32(CudaSlice<f32>),
    U32(CudaSlice<u32>),
}

/// A tensor the kernels read besides the op's inputs.
enum AuxView<'a, T> {
    T(CudaView<'a, T>),
    F32(CudaView<'a, f32>),
    U32(CudaView<'a, u32>),
}

/// The value of one kernel argument, ready to push.
enum ArgVal<'a, T> {
    T(CudaView<'a, T>),
    F32(CudaView<'a, f32>),
    U32(CudaView<'a, u32>),
    TMut(CudaViewMut<'a, T>),
    F32Mut(CudaViewMut<'a, f32>),
    U32Mut(CudaViewMut<'a, u32>),
    Null(u64),
    U32v(u32),
    I32v(i32),
    F32v(f32),
    U64v(u64),
    F64v(f64),
}

impl<T: DeviceRepr + ValidAsZeroBits> DevBuf<T> {
    fn alloc(dev: &CudaDevice, elem: Elem, len: usize) -> CResult<Self> {
        Ok(match elem {
            Elem::T => DevBuf::T(dev.alloc_zeros::<T>(len)?),
            Elem::F32 => DevBuf::F32(dev.alloc_zeros::<f32>(len)?),
            Elem::U32 => DevBuf::U32(dev.alloc_zeros::<u32>(len)?),
        })
    }

    fn read(&self) -> ArgVal<'_, T> {
        match self {
            DevBuf::T(s) => ArgVal::T(s.slice(..)),
            DevBuf::F32(s) => ArgVal::F32(s.slice(..)),
            DevBuf::U32(s) => ArgVal::U32(s.slice(..)),
        }
    }

    fn write(&mut self, r: Range<usize>) -> CResult<ArgVal<'_, T>> {
        let bad = || cuda_err(format!("a write of {r:?} outside its buffer"));
        Ok(match self {
            DevBuf::T(s) => ArgVal::TMut(s.try_slice_mut(r.clone()).ok_or_else(bad)?),
            DevBuf::F32(s) => ArgVal::F32Mut(s.try_slice_mut(r.clone()).ok_or_else(bad)?),
            DevBuf::U32(s) => ArgVal::U32Mut(s.try_slice_mut(r.clone()).ok_or_else(bad)?),
        })
    }

    /// The two halves `..mid` and `mid..`, both written.
    fn halves(&mut self, mid: usize) -> CResult<(ArgVal<'_, T>, ArgVal<'_, T>)> {
        let bad = || cuda_err(format!("a split at {mid} outside its buffer"));
        Ok(match self {
            DevBuf::T(s) => {
                let (a, b) = s.try_split_at_mut(mid).ok_or_else(bad)?;
                (ArgVal::TMut(a), ArgVal::TMut(b))
            }
            DevBuf::F32(s) => {
                let (a, b) = s.try_split_at_mut(mid).ok_or_else(bad)?;
                (ArgVal::F32Mut(a), ArgVal::F32Mut(b))
            }
            DevBuf::U32(s) => {
                let (a, b) = s.try_split_at_mut(mid).ok_or_else(bad)?;
                (ArgVal::U32Mut(a), ArgVal::U32Mut(b))
            }
        })
    }

    fn into_storage(self, dev: &CudaDevice) -> CudaStorage
    where
        T: CudaDType,
    {
        match self {
            DevBuf::T(s) => wrap(s, dev),
            DevBuf::F32(s) => wrap(s, dev),
            DevBuf::U32(s) => wrap(s, dev),
        }
    }
}

/// Pushes one argument (device buffers with their stream-ordering events).
fn push<'a, 'b: 'a, 'c: 'b, T>(b: &mut LaunchArgs<'a>, v: &'b mut ArgVal<'c, T>) {
    match v {
        ArgVal::T(x) => b.arg(&*x),
        ArgVal::F32(x) => b.arg(&*x),
        ArgVal::U32(x) => b.arg(&*x),
        ArgVal::TMut(x) => b.arg(x),
        ArgVal::F32Mut(x) => b.arg(x),
        ArgVal::U32Mut(x) => b.arg(x),
        ArgVal::Null(x) | ArgVal::U64v(x) => b.arg(&*x),
        ArgVal::U32v(x) => b.arg(&*x),
        ArgVal::I32v(x) => b.arg(&*x),
        ArgVal::F32v(x) => b.arg(&*x),
        ArgVal::F64v(x) => b.arg(&*x),
    };
}

/// The argument values of one launch, in parameter order. A buffer is written through one
/// view, or through its two halves (the plan was validated: two writes tile the buffer,
/// and no launch reads a buffer it writes).
fn arg_values<'v, T: DeviceRepr + ValidAsZeroBits>(
    args: &[Arg],
    ins: &[CudaView<'v, T>],
    aux: &[AuxView<'v, T>],
    bufs: &'v mut [DevBuf<T>],
) -> CResult<Vec<ArgVal<'v, T>>> {
    let mut slots: Vec<Option<ArgVal<'v, T>>> = (0..args.len()).map(|_| None).collect();
    let mut readable: Vec<Option<&'v DevBuf<T>>> = Vec::with_capacity(bufs.len());
    for (bi, buf) in bufs.iter_mut().enumerate() {
        let mut w: Vec<(usize, Range<usize>)> = args
            .iter()
            .enumerate()
            .filter_map(|(j, a)| match a {
                Arg::Write(b, r) if *b == bi => Some((j, r.clone())),
                _ => None,
            })
            .collect();
        w.sort_by_key(|(_, r)| r.start);
        match w.as_slice() {
            [] => readable.push(Some(buf)),
            [(j, r)] => {
                slots[*j] = Some(buf.write(r.clone())?);
                readable.push(None);
            }
            [(j0, _), (j1, r1)] => {
                let (a, b) = buf.halves(r1.start)?;
                slots[*j0] = Some(a);
                slots[*j1] = Some(b);
                readable.push(None);
            }
            _ => candle_core::bail!("more than two writes into buffer {bi} in one launch"),
        }
    }
    for (j, a) in args.iter().enumerate() {
        let v = match a {
            Arg::Write(..) => continue,
            Arg::Input(i) => match ins.get(*i) {
                Some(x) => ArgVal::T(x.slice(..)),
                None => candle_core::bail!("no input {i}"),
            },
            Arg::Aux(i) => match aux.get(*i) {
                Some(AuxView::T(x)) => ArgVal::T(x.slice(..)),
                Some(AuxView::U32(x)) => ArgVal::U32(x.slice(..)),
                Some(AuxView::F32(x)) => ArgVal::F32(x.slice(..)),
                None => candle_core::bail!("no auxiliary tensor {i}"),
            },
            Arg::Read(b) => match readable.get(*b).copied().flatten() {
                Some(buf) => buf.read(),
                None => candle_core::bail!("buffer {b} is written by the launch that reads it"),
            },
            Arg::Null => ArgVal::Null(0),
            Arg::U32(x) => ArgVal::U32v(*x),
            Arg::I32(x) => ArgVal::I32v(*x),
            Arg::F32(x) => ArgVal::F32v(*x),
            Arg::U64(x) => ArgVal::U64v(*x),
            Arg::F64(x) => ArgVal::F64v(*x),
        };
        slots[j] = Some(v);
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(j, s)| s.ok_or_else(|| cuda_err(format!("argument {j} has no value"))))
        .collect()
}

fn aux_view<'a, T: CudaDType + WithDType>(st: &'a Storage, l: &Layout) -> CResult<AuxView<'a, T>> {
    let Storage::Cuda(cs) = st else {
        candle_core::bail!("an index or weight tensor of a CUDA op must be a CUDA tensor")
    };
    Ok(match &cs.slice {
        CudaStorageSlice::U32(s) => AuxView::U32(view(s, l, "index tensor")?),
        // f32 statistics of an op of another element type (an f32 op reads them as `T`).
        CudaStorageSlice::F32(s) if T::DTYPE != candle_core::DType::F32 => {
            AuxView::F32(view(s, l, "f32 tensor")?)
        }
        _ => AuxView::T(view(cs.as_cuda_slice::<T>()?, l, "weight tensor")?),
    })
}

fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
    plan: &Plan,
    inputs: &[(&CudaStorage, &Layout)],
    dev: &CudaDevice,
) -> CResult<CudaStorage> {
    plan.validate(T::DTYPE).map_err(candle_core::Error::msg)?;
    let ins = inputs
        .iter()
        .map(|(s, l)| view(s.as_cuda_slice::<T>()?, l, "an input"))
        .collect::<CResult<Vec<_>>>()?;
    let guards: Vec<_> = plan.aux.iter().map(|t| t.storage_and_layout()).collect();
    let aux = guards
        .iter()
        .map(|(st, l)| aux_view::<T>(st, l))
        .collect::<CResult<Vec<_>>>()?;
    let mut bufs = plan
        .buffers
        .iter()
        .map(|b| DevBuf::<T>::alloc(dev, b.elem, b.len))
        .collect::<CResult<Vec<_>>>()?;
    for &(i, b) in &plan.copies {
        match (&mut bufs[b], &ins[i]) {
            (DevBuf::T(dst), src) if dst.len() == src.len() => dev.memcpy_dtod(src, dst)?,
            _ => candle_core::bail!("{}: input {i} does not fit buffer {b}", plan.op),
        }
    }
    let stream = dev.cuda_stream();
    for launch in &plan.launches {
        let spec = launch.kernel.spec();
        let f = function::<T>(dev, spec.module, spec.base)?;
        let mut vals = arg_values(&launch.args, &ins, &aux, &mut bufs)?;
        let mut b = stream.launch_builder(&f);
        for v in vals.iter_mut() {
            push(&mut b, v);
        }
        // SAFETY: `Plan::validate` checked every argument against the kernel's parameter
        // list in the kernel table (itself checked against the kernel sources): one device
        // pointer of the right element type per pointer parameter, one scalar of the right
        // type per scalar. Each pointer covers the elements the kernel touches for the
        // sizes passed, as the op's plan documents; written views do not alias.
        unsafe { b.launch(cfg(launch.dims)) }.w()?;
    }
    drop(aux);
    drop(guards);
    Ok(bufs.swap_remove(plan.output).into_storage(dev))
}

/// Runs an op's plan on f32 or bf16 inputs (all of one dtype) and returns its output.
pub(crate) fn execute(
    plan: &Plan,
    inputs: &[(&CudaStorage, &Layout)],
) -> CResult<(CudaStorage, Shape)> {
    let Some((first, _)) = inputs.first() else {
        candle_core::bail!("{}: no input", plan.op)
    };
    if inputs.len() != plan.inputs {
        candle_core::bail!(
            "{}: {} inputs, the plan takes {}",
            plan.op,
            inputs.len(),
            plan.inputs
        );
    }
    let dtype = first.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!(
            "{}: the CUDA kernel takes f32 or bf16 inputs of one dtype",
            plan.op
        );
    }
    let dev = first.device();
    // The element type comes from the first input's slice.
    fn like<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        _: &CudaSlice<T>,
        plan: &Plan,
        inputs: &[(&CudaStorage, &Layout)],
        dev: &CudaDevice,
    ) -> CResult<CudaStorage> {
        run::<T>(plan, inputs, dev)
    }
    let out = match &first.slice {
        CudaStorageSlice::F32(s) => like(s, plan, inputs, dev)?,
        CudaStorageSlice::BF16(s) => like(s, plan, inputs, dev)?,
        _ => candle_core::bail!(
            "{}: the CUDA kernels take f32 or bf16, not {dtype:?}",
            plan.op
        ),
    };
    Ok((out, plan.shape.clone()))
}

/// Opens CUDA device `ordinal`. A failed driver initialisation or context creation is one
/// error naming the cause and the fix ([`super::backend::device_open_error`]), never a
/// panic.
pub(crate) fn open_device(ordinal: usize) -> Result<Device> {
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(super::backend::device_open_error(ordinal, &e.to_string())),
        Err(_) => Err(super::backend::device_open_error(
            ordinal,
            "the CUDA driver library (libcuda) could not be loaded",
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

/// Free and total memory of a CUDA device, in bytes.
pub(crate) fn memory_info(device: &Device) -> Option<(usize, usize)> {
    let dev = device.as_cuda_device().ok()?;
    let stream = dev.cuda_stream();
    stream.context().mem_get_info().ok()
}
