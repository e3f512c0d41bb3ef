//! Shared helpers: random K/V tensors, hand-built recursion plans and a stub backend.

use candle_core::{Device, Tensor};
use mor_core::plan::{DepthFix, RecursionPlan, Segment, Slot};
use mor_core::rng::Rng;
use mor_kvcache::StepKv;
use std::sync::Arc;

/// `n` uniform draws in [-1, 1).
pub fn uniform(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}

/// `n` uniform f32 draws in [-1, 1).
pub fn uniform_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    uniform(rng, n).into_iter().map(|x| x as f32).collect()
}

/// A random f64 `StepKv` with `k, v: [b, h, n, dh]` and the given positions (`[b][n]`).
pub fn step_kv(rng: &mut Rng, h: usize, dh: usize, pos: &[Vec<u32>]) -> StepKv {
    let b = pos.len();
    let n = pos[0].len();
    let dev = Device::Cpu;
    let k = Tensor::from_vec(uniform(rng, b * h * n * dh), (b, h, n, dh), &dev).unwrap();
    let v = Tensor::from_vec(uniform(rng, b * h * n * dh), (b, h, n, dh), &dev).unwrap();
    StepKv {
        k,
        v,
        pos: pos_tensor(pos),
    }
}

/// A u32 `[b, n]` tensor.
pub fn pos_tensor(pos: &[Vec<u32>]) -> Tensor {
    let b = pos.len();
    let n = pos[0].len();
    Tensor::from_vec(pos.concat(), (b, n), &Device::Cpu).unwrap()
}

/// All values of a tensor, row-major.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// A Middle-Cycle-shaped plan: an optional prelude slot, `N_r` steps of `B_d` layers each
/// (step-major), an optional coda slot.
pub fn plan(prelude: bool, num_recursions: usize, base_depth: usize, coda: bool) -> RecursionPlan {
    let mut slots = Vec::new();
    let off = usize::from(prelude);
    if prelude {
        slots.push(Slot {
            block: 0,
            segment: Segment::Prelude,
        });
    }
    for step in 1..=num_recursions {
        for layer in 0..base_depth {
            slots.push(Slot {
                block: off + layer,
                segment: Segment::Recursion { step, layer },
            });
        }
    }
    if coda {
        slots.push(Slot {
            block: off + base_depth,
            segment: Segment::Coda,
        });
    }
    RecursionPlan {
        strategy: "test".to_string(),
        num_recursions,
        base_depth,
        num_blocks: off + base_depth + usize::from(coda),
        requested_layers: slots.len(),
        depth_fix: DepthFix::AddLayers,
        slots,
    }
}

/// A backend that refuses every op: the KV policies never call it, `KvCtx` only needs one.
#[derive(Debug)]
pub struct NoBackend(Device);

fn refuse<T>() -> mor_kernels::Result<T> {
    Err(mor_kernels::Error::Invalid {
        op: "no_backend",
        msg: "not available in these tests".to_string(),
    })
}

impl mor_kernels::Backend for NoBackend {
    fn name(&self) -> &'static str {
        "no_backend"
    }
    fn device(&self) -> &Device {
        &self.0
    }
    fn rms_norm(&self, _: &Tensor, _: &Tensor, _: f64) -> mor_kernels::Result<Tensor> {
        refuse()
    }
    fn rope(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> mor_kernels::Result<Tensor> {
        refuse()
    }
    fn attention(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> mor_kernels::Result<Tensor> {
        refuse()
    }
    fn swiglu(&self, _: &Tensor, _: &Tensor) -> mor_kernels::Result<Tensor> {
        refuse()
    }
    fn gather_tokens(&self, _: &Tensor, _: &Tensor) -> mor_kernels::Result<Tensor> {
        refuse()
    }
    fn scatter_add_tokens(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
    ) -> mor_kernels::Result<Tensor> {
        refuse()
    }
}

/// A `KvCtx` for `N_r` steps.
pub fn kv_ctx(num_recursions: usize) -> mor_kvcache::KvCtx {
    mor_kvcache::KvCtx {
        num_recursions,
        backend: Arc::new(NoBackend(Device::Cpu)),
    }
}
