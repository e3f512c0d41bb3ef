//! Decode-time KV caches.
