//! A third-party strategy crate for mor.
