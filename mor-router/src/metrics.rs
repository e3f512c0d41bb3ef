//! Router metrics (spec §6.4): dead-token ratio, sampling accuracy, MaxVio, entropy, tokens
//! per depth.

use serde::{Deserialize, Serialize};

/// Routing statistics of one forward (or aggregated over many).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterStats {
    /// Tokens whose final depth is d, for d = 1..=N_r (index d-1).
    pub tokens_per_depth: Vec<u64>,
}
