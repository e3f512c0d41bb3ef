//! `reference` backend: plain candle ops.
