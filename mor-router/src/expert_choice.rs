//! Expert-choice router (spec §3.1).
