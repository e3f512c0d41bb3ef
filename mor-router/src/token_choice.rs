//! Token-choice router (spec §3.2).
