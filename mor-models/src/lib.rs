//! Mixture-of-Recursions models.
