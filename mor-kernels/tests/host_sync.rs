//! The host-sync counter on CPU: every host read is a logical sync, none is a
//! device-to-host transfer, counts are per thread, and the fused ops of the `cuda` backend
//! (their CPU bodies here) make no host read of their own.

use candle_core::{DType, Device, Tensor};
use mor_kernels::cuda::{self, RouterParams};
use mor_kernels::host_sync::{self, HostSyncs, Scope};

#[test]
fn a_host_read_of_a_cpu_tensor_is_a_logical_sync_without_transfer() {
    let scope = Scope::start();
    let t = Tensor::new(&[[1.5f32, -2.0], [0.25, 4.0]], &Device::Cpu).unwrap();
    assert_eq!(host_sync::to_host_f64(&t).unwrap(), [1.5, -2.0, 0.25, 4.0]);
    assert_eq!(
        host_sync::to_host::<u32>(&t.abs().unwrap()).unwrap(),
        [1, 2, 0, 4]
    );
    let s = Tensor::new(&[7.0f64], &Device::Cpu).unwrap();
    assert_eq!(host_sync::scalar_f64(&s).unwrap(), 7.0);
    assert!(host_sync::scalar_f64(&t).is_err());
    assert_eq!(
        scope.counts(),
        HostSyncs {
            reads: 4,
            device_to_host: 0,
            bytes: 0
        }
    );
    host_sync::record(&t);
    assert_eq!(scope.counts().reads, 5);
}

#[test]
fn counts_are_per_thread() {
    let scope = Scope::start();
    std::thread::spawn(|| {
        let inner = Scope::start();
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        for _ in 0..10 {
            host_sync::record(&t);
        }
        assert_eq!(inner.counts().reads, 10);
    })
    .join()
    .unwrap();
    assert_eq!(scope.counts(), HostSyncs::default());
}

/// A recursion step of expert-choice routing through the fused ops (score, top-k,
/// gather, scatter-add) reads nothing on the host: the indices flow from op to op as
/// tensors. Only the caller's one read for logging is counted.
#[test]
fn a_fused_routing_step_makes_no_host_read() {
    let dev = Device::Cpu;
    let (b, l, d, k) = (2usize, 16usize, 8usize, 5usize);
    let h = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
    let scope = Scope::start();
    let (_, g) = cuda::router_scores(&h, &w, RouterParams::default()).unwrap();
    let top = cuda::topk_sorted(&g, k, None).unwrap();
    let sel = cuda::gather_rows(&h, &top.keep).unwrap();
    let gate = g.gather(&top.keep, 1).unwrap();
    let out = cuda::scatter_add_rows(&h, &top.keep, &sel, Some(&gate)).unwrap();
    assert_eq!(scope.counts(), HostSyncs::default());
    let loss = host_sync::scalar_f64(&out.sum_all().unwrap()).unwrap();
    assert!(loss.is_finite());
    assert_eq!(scope.counts().reads, 1);
    assert_eq!(scope.counts().device_to_host, 0);
}
