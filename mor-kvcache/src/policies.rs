//! Built-in KV policies.
