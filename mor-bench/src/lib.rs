//! Benchmarks of mor.
//!
//! - [`infer`]: the inference throughput and KV-memory harness of spec §5 behind
//!   `cargo xtask bench infer` (vanilla against MoR with continuous depth-wise batching).

pub mod infer;
