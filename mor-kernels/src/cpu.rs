//! `cpu` backend: fused CPU ops with analytic backward.
