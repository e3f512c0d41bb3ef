//! Router metrics (spec §6.4): dead-token ratio, sampling accuracy, MaxVio, entropy, tokens
//! per depth.
//!
//! [`RouterStats`] holds only counts and sums, never ratios, so that the stats of many
//! forwards (micro-batches, evaluation batches) combine exactly with [`RouterStats::merge`];
//! the ratios of the paper's tables are computed from the merged counts by the methods.

use serde::{Deserialize, Serialize};

/// Routing statistics of one forward (or aggregated over many with [`RouterStats::merge`]).
///
/// Per-step vectors are indexed by `step - 1`; per-position vectors by the position in the
/// sequence. Vectors of different lengths merge by extending the shorter one with zeros.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterStats {
    /// Tokens whose final depth is d, for d = 1..=N_r (index d-1). The final depth is the
    /// number of recursion steps the token ran.
    pub tokens_per_depth: Vec<u64>,
    /// Tokens that ran no recursion step at all (possible only with an explicit expert-choice
    /// capacity below 1 at step 1).
    pub tokens_depth_zero: u64,
    /// Candidates (active tokens) offered to the router at each step.
    pub candidates_per_step: Vec<u64>,
    /// Tokens selected at each step.
    pub selected_per_step: Vec<u64>,
    /// Per position: how many sequences selected this position at the last routed step
    /// (the input of the dead-token ratio, spec §6.4(b)).
    pub last_step_selected_per_position: Vec<u64>,
    /// Number of sequences (batch rows) counted.
    pub sequences: u64,
    /// Per step: candidates whose causal prediction (`σ(logit) ≥ 0.5`) matched the top-k
    /// target (spec §3.1, "sampling accuracy").
    pub sampling_correct: Vec<u64>,
    /// Per step: candidates for which a sampling prediction was scored.
    pub sampling_total: Vec<u64>,
    /// Per step: sum of the router weights `g` of the selected tokens.
    pub gate_sum: Vec<f64>,
    /// Per step: number of gates summed in `gate_sum`.
    pub gate_count: Vec<u64>,
    /// Token-choice: per depth i (index i-1), the sum over tokens of the router probability
    /// `p_{t,i}`.
    pub prob_sum: Vec<f64>,
    /// Token-choice: number of tokens summed in `prob_sum`.
    pub prob_tokens: u64,
}

fn add_u64(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

fn add_f64(dst: &mut Vec<f64>, src: &[f64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0.0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

impl RouterStats {
    /// Empty stats sized for `num_recursions` steps and sequences of length `seq_len`.
    pub fn with_shape(num_recursions: usize, seq_len: usize) -> Self {
        RouterStats {
            tokens_per_depth: vec![0; num_recursions],
            candidates_per_step: vec![0; num_recursions],
            selected_per_step: vec![0; num_recursions],
            last_step_selected_per_position: vec![0; seq_len],
            sampling_correct: vec![0; num_recursions],
            sampling_total: vec![0; num_recursions],
            gate_sum: vec![0.0; num_recursions],
            gate_count: vec![0; num_recursions],
            ..Default::default()
        }
    }

    /// Adds the counts of `other` to `self`.
    pub fn merge(&mut self, other: &RouterStats) {
        add_u64(&mut self.tokens_per_depth, &other.tokens_per_depth);
        self.tokens_depth_zero += other.tokens_depth_zero;
        add_u64(&mut self.candidates_per_step, &other.candidates_per_step);
        add_u64(&mut self.selected_per_step, &other.selected_per_step);
        add_u64(
            &mut self.last_step_selected_per_position,
            &other.last_step_selected_per_position,
        );
        self.sequences += other.sequences;
        add_u64(&mut self.sampling_correct, &other.sampling_correct);
        add_u64(&mut self.sampling_total, &other.sampling_total);
        add_f64(&mut self.gate_sum, &other.gate_sum);
        add_u64(&mut self.gate_count, &other.gate_count);
        add_f64(&mut self.prob_sum, &other.prob_sum);
        self.prob_tokens += other.prob_tokens;
    }

    /// The merge of every element of `stats`.
    pub fn merged<'a>(stats: impl IntoIterator<Item = &'a RouterStats>) -> RouterStats {
        let mut out = RouterStats::default();
        for s in stats {
            out.merge(s);
        }
        out
    }

    /// Fraction of the tokens at each depth d = 1..=N_r (`Load_d`); empty when no token was
    /// counted.
    pub fn loads(&self) -> Vec<f64> {
        let total: u64 = self.tokens_per_depth.iter().sum();
        if total == 0 {
            return Vec::new();
        }
        self.tokens_per_depth
            .iter()
            .map(|&c| c as f64 / total as f64)
            .collect()
    }

    /// `MaxVio = (max_i Load_i − mean Load) / mean Load` (spec §6.4(c)); `None` when no token
    /// was counted.
    ///
    /// # Examples
    /// ```
    /// use mor_router::RouterStats;
    /// let s = RouterStats { tokens_per_depth: vec![6, 3, 3], ..Default::default() };
    /// // Loads [1/2, 1/4, 1/4]: (1/2 − 1/3) / (1/3) = 0.5.
    /// assert!((s.max_vio().unwrap() - 0.5).abs() < 1e-12);
    /// ```
    pub fn max_vio(&self) -> Option<f64> {
        max_vio_of(&self.loads())
    }

    /// Entropy `H = −Σ p̄_i log p̄_i` of the mean token-choice router distribution (spec
    /// §6.4(c)), in nats. `p̄` is normalised to sum to one first, so that sigmoid routers
    /// (whose probabilities do not sum to one) and `alpha ≠ 1` are comparable; for the
    /// softmax router with `alpha = 1` the normalisation changes nothing. `None` without
    /// token-choice probabilities.
    pub fn entropy(&self) -> Option<f64> {
        if self.prob_tokens == 0 || self.prob_sum.is_empty() {
            return None;
        }
        let total: f64 = self.prob_sum.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        Some(
            -self
                .prob_sum
                .iter()
                .map(|&s| s / total)
                .filter(|&p| p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>(),
        )
    }

    /// Sampling accuracy over all steps (spec §3.1); `None` when nothing was scored (random
    /// router).
    pub fn sampling_accuracy(&self) -> Option<f64> {
        let total: u64 = self.sampling_total.iter().sum();
        (total > 0).then(|| self.sampling_correct.iter().sum::<u64>() as f64 / total as f64)
    }

    /// Sampling accuracy at recursion step `step` (1-based).
    pub fn sampling_accuracy_at(&self, step: usize) -> Option<f64> {
        let i = step.checked_sub(1)?;
        let total = *self.sampling_total.get(i)?;
        (total > 0).then(|| self.sampling_correct[i] as f64 / total as f64)
    }

    /// Dead-token ratio (spec §6.4(b)): the share of positions that no counted sequence
    /// selected at the last routed step. `None` before any sequence was counted.
    pub fn dead_token_ratio(&self) -> Option<f64> {
        if self.sequences == 0 || self.last_step_selected_per_position.is_empty() {
            return None;
        }
        let n = self.last_step_selected_per_position.len();
        let dead = self
            .last_step_selected_per_position
            .iter()
            .filter(|&&c| c == 0)
            .count();
        Some(dead as f64 / n as f64)
    }

    /// Mean router weight `g` of the tokens selected at step `step` (1-based).
    pub fn mean_gate(&self, step: usize) -> Option<f64> {
        let i = step.checked_sub(1)?;
        let n = *self.gate_count.get(i)?;
        (n > 0).then(|| self.gate_sum[i] / n as f64)
    }
}

/// `MaxVio` of a load vector: `(max − mean) / mean`; `None` for an empty or all-zero vector.
pub fn max_vio_of(loads: &[f64]) -> Option<f64> {
    if loads.is_empty() {
        return None;
    }
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    if mean.is_nan() || mean <= 0.0 {
        return None;
    }
    let max = loads.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((max - mean) / mean)
}
