//! Benchmarks of mor.
//!
//! - [`infer`]: the inference throughput and KV-memory harness of spec §5 behind
//!   `cargo xtask bench infer` (vanilla against MoR with continuous depth-wise batching),
//!   with the engine's packed weights in f32 or bf16, at several batch sizes.
//! - [`train`]: the training cost of one model (step time, tokens/s, peak resident memory)
//!   behind `cargo xtask bench train`.
//! - `benches/decode_matmul.rs` (criterion): the packed decode products in f32 and bf16 with
//!   the kernels of every instruction-set tier this CPU runs, against candle's `matmul`.
//! - `benches/train_step.rs` (criterion) and `examples/step_profile.rs`: one training step
//!   of the speed-target model, `cpu` against `reference`; `python/torch_train_step.py` is
//!   the same model in PyTorch eager, for a comparison on the same machine
//!   (`docs/performance.md`).

pub mod infer;
pub mod train;

/// Keeps memory freed to mimalloc mapped instead of returning it to the OS.
///
/// A training step allocates and frees the same few hundred megabytes of activations and
/// gradients every step. With mimalloc's default purge delay (10 ms) those pages go back
/// to the kernel between uses and come back as fresh, zeroed pages: on a 2-core machine
/// the kernel's page clearing took about a fifth of the step. Call this once at the start
/// of a process whose global allocator is `mimalloc::MiMalloc`; it has no effect with any
/// other allocator. The resident size then stays at the peak of the run.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` is entry 15 of `mi_option_t` in mimalloc v2 and v3; the
    // Rust binding has no constant for it. -1 means "never purge".
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: `mi_option_set` only stores an integer option; it is thread-safe and valid
    // at any time, before or after the allocator is first used.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// The process settings of mor's CPU training binaries: [`keep_freed_memory`] and
/// [`mor_models::run::prefer_rayon_threads`]. Call first thing in `main`.
pub fn tune_cpu_process() {
    keep_freed_memory();
    mor_models::run::prefer_rayon_threads();
}
