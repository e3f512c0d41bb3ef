//! Fused next-token cross-entropy: re-exported from [`mor_kernels::loss`], where the
//! backends' fused linear + cross-entropy ops live beside it.

pub use mor_kernels::loss::cross_entropy;
