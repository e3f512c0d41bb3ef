//! Parameter and FLOPs accounting (spec §1.4).
