//! Benchmarks of mor.
