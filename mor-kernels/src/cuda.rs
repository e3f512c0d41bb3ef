//! `cuda` backend.
