//! Per-token validation scores of one run, and depth against difficulty when the corpus has
//! no difficulty labels (spec §7: tokens that are harder to predict receive more recursions).
//!
//! Evaluation records, for every scored validation token and each routing rule, the token's
//! NLL and (for routed models) the recursion depth spent to predict it ([`TokenScores`]).
//! Without labels, the difficulty of a token is its NLL under a reference run on the same
//! tokens — the ablation's vanilla model. [`depth_by_reference_nll`] groups a routed run's
//! tokens into quintiles of that NLL and reports the mean depth per quintile, with the
//! Pearson and Spearman correlations between depth and the reference NLL.
//!
//! Quintiles are by rank: the `n` tokens are sorted by reference NLL (ties by position) and
//! the token of rank `r` (0-based) is in quintile `floor(5 r / n)`, so every quintile holds
//! `n / 5` tokens up to one, whatever the ties.

use super::types::{DepthByDifficulty, DepthCorrelation, DifficultyMeasure, DifficultyStat};
use super::TraceRule;

/// Number of difficulty groups of the reference NLL.
pub const QUINTILES: usize = 5;

/// Scores of every validation token under one routing rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleScores {
    /// NLL (nats) of each predicted token, in validation order.
    pub nll: Vec<f32>,
    /// Recursion depth spent to predict each token (routed models only).
    pub depth: Option<Vec<u8>>,
}

/// Per-token scores of one run on its scored validation tokens (`token_scores.bin` in the
/// run folder).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScores {
    /// Predicted tokens per validation sequence (row).
    pub row_len: usize,
    /// [`targets_hash`] of the scored target ids: two runs' scores are comparable only when
    /// they were measured on the same tokens.
    pub targets_hash: u64,
    /// Scores with the full-sequence routing (and of models without a router).
    pub full_sequence: Option<RuleScores>,
    /// Scores with the causal routing rule.
    pub causal: Option<RuleScores>,
}

const MAGIC: &[u8; 8] = b"MORTSC01";

/// FNV-1a (64 bit) over little-endian bytes.
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A fingerprint of target ids (FNV-1a over their little-endian bytes and their count).
pub fn targets_hash(targets: &[u32]) -> u64 {
    let mut h = FNV_OFFSET;
    for &t in targets {
        h = fnv1a(&t.to_le_bytes(), h);
    }
    fnv1a(&(targets.len() as u64).to_le_bytes(), h)
}

impl TokenScores {
    /// Scored tokens.
    pub fn tokens(&self) -> usize {
        self.full_sequence
            .as_ref()
            .or(self.causal.as_ref())
            .map_or(0, |r| r.nll.len())
    }

    /// The NLL that measures difficulty when this run is the reference: full-sequence where
    /// measured (the only rule of a model without a router), else causal.
    pub fn reference_nll(&self) -> Option<&[f32]> {
        self.full_sequence
            .as_ref()
            .or(self.causal.as_ref())
            .map(|r| r.nll.as_slice())
    }

    /// Checks that every vector has one entry per token.
    ///
    /// # Errors
    /// Names the vector whose length differs.
    pub fn check(&self) -> Result<(), String> {
        let n = self.tokens();
        for (rule, r) in [
            ("full_sequence", &self.full_sequence),
            ("causal", &self.causal),
        ] {
            let Some(r) = r else { continue };
            if r.nll.len() != n {
                return Err(format!(
                    "{rule} NLL has {} entries, expected {n}",
                    r.nll.len()
                ));
            }
            if let Some(d) = &r.depth {
                if d.len() != n {
                    return Err(format!(
                        "{rule} depth has {} entries, expected {n}",
                        d.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The compact binary form: an 8-byte magic, the token count, row length and targets
    /// hash (u64 little-endian), a flags byte, the present vectors (f32 NLL, u8 depth; full
    /// sequence first) and an FNV-1a checksum of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.tokens();
        let mut out = Vec::with_capacity(40 + n * 10);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(n as u64).to_le_bytes());
        out.extend_from_slice(&(self.row_len as u64).to_le_bytes());
        out.extend_from_slice(&self.targets_hash.to_le_bytes());
        let mut flags = 0u8;
        for (i, r) in [&self.full_sequence, &self.causal].into_iter().enumerate() {
            if let Some(r) = r {
                flags |= 1 << (2 * i);
                if r.depth.is_some() {
                    flags |= 2 << (2 * i);
                }
            }
        }
        out.push(flags);
        for r in [&self.full_sequence, &self.causal].into_iter().flatten() {
            for x in &r.nll {
                out.extend_from_slice(&x.to_le_bytes());
            }
            if let Some(d) = &r.depth {
                out.extend_from_slice(d);
            }
        }
        let sum = fnv1a(&out, FNV_OFFSET);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads [`Self::to_bytes`]'s form back.
    ///
    /// # Errors
    /// A wrong magic, a length that does not match the header, or a checksum mismatch.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        const HEAD: usize = 8 + 3 * 8 + 1;
        if bytes.len() < HEAD + 8 || &bytes[..8] != MAGIC {
            return Err("not a token-scores file (bad magic or too short)".into());
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        let want = u64::from_le_bytes(tail.try_into().expect("8 bytes"));
        if fnv1a(body, FNV_OFFSET) != want {
            return Err("checksum mismatch: the file is damaged".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let n = usize::try_from(u64_at(8)).map_err(|_| "token count too large".to_string())?;
        let row_len = usize::try_from(u64_at(16)).map_err(|_| "row length too large")?;
        let targets_hash = u64_at(24);
        let flags = body[32];
        if flags & !0b1111 != 0 || (flags & 0b11) == 0b10 || (flags & 0b1100) == 0b1000 {
            return Err(format!("unknown flags {flags:#010b}"));
        }
        let mut expected = HEAD;
        for i in 0..2 {
            if flags & (1 << (2 * i)) != 0 {
                expected += n * 4;
                if flags & (2 << (2 * i)) != 0 {
                    expected += n;
                }
            }
        }
        if body.len() != expected {
            return Err(format!(
                "{} bytes of data, the header ({n} tokens, flags {flags:#06b}) needs {}",
                body.len(),
                expected
            ));
        }
        let mut at = HEAD;
        let mut rules = [None, None];
        for (i, slot) in rules.iter_mut().enumerate() {
            if flags & (1 << (2 * i)) == 0 {
                continue;
            }
            let nll = body[at..at + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            at += 4 * n;
            let depth = (flags & (2 << (2 * i)) != 0).then(|| {
                let d = body[at..at + n].to_vec();
                at += n;
                d
            });
            *slot = Some(RuleScores { nll, depth });
        }
        let [full_sequence, causal] = rules;
        Ok(Self {
            row_len,
            targets_hash,
            full_sequence,
            causal,
        })
    }
}

/// Quintile (0..=4) of every value by rank: sorted ascending (ties by position), rank `r` of
/// `n` goes to `floor(5 r / n)`.
///
/// # Examples
///
/// ```
/// use mor_models::report::quintiles;
/// assert_eq!(quintiles(&[9.0, 1.0, 5.0, 3.0, 7.0]), [4, 0, 2, 1, 3]);
/// ```
pub fn quintiles(values: &[f32]) -> Vec<u8> {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let mut q = vec![0u8; n];
    for (rank, &i) in order.iter().enumerate() {
        q[i] = (rank * QUINTILES / n) as u8;
    }
    q
}

/// 1-based ranks, tied values sharing the mean of their ranks.
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && values[order[j]] == values[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j share their mean.
        let mean = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            ranks[k] = mean;
        }
        i = j;
    }
    ranks
}

/// Pearson correlation of `x` and `y` (two passes in f64); `None` with fewer than two
/// points, different lengths or a constant series.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 || y.len() != n {
        return None;
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    Some((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0))
}

/// Spearman rank correlation: Pearson of the [`average_ranks`].
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() {
        return None;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Mean depth per quintile of the reference run's NLL, and the correlations between depth
/// and that NLL, of one routed run on the same validation tokens.
///
/// The quintile means use the full-sequence depths where the run has them (as the labelled
/// table does), else the causal ones; a correlation is given for each rule with depths.
///
/// # Errors
/// When the two runs were scored on different tokens, the reference has no NLL or a
/// non-finite one, the run has no depths, or there are fewer than five tokens.
pub fn depth_by_reference_nll(
    reference_run: &str,
    reference: &TokenScores,
    run: &str,
    scores: &TokenScores,
) -> Result<DepthByDifficulty, String> {
    reference
        .check()
        .map_err(|e| format!("{reference_run}: {e}"))?;
    scores.check().map_err(|e| format!("{run}: {e}"))?;
    let Some(ref_nll) = reference.reference_nll() else {
        return Err(format!("{reference_run}: no per-token NLL was recorded"));
    };
    if reference.targets_hash != scores.targets_hash || reference.tokens() != scores.tokens() {
        return Err(format!(
            "{run} and {reference_run} were scored on different validation tokens ({} and {} \
             tokens, fingerprints {:016x} and {:016x}); evaluate both with the same data and \
             eval settings",
            scores.tokens(),
            reference.tokens(),
            scores.targets_hash,
            reference.targets_hash
        ));
    }
    let n = ref_nll.len();
    if n < QUINTILES {
        return Err(format!(
            "{n} scored tokens are too few for {QUINTILES} NLL quintiles"
        ));
    }
    if let Some(i) = ref_nll.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "{reference_run}: the NLL of validation token {i} is {}, not a finite number",
            ref_nll[i]
        ));
    }
    let with_depth: Vec<(TraceRule, &[u8])> = [
        (TraceRule::FullSequence, &scores.full_sequence),
        (TraceRule::Causal, &scores.causal),
    ]
    .into_iter()
    .filter_map(|(rule, r)| Some((rule, r.as_ref()?.depth.as_deref()?)))
    .collect();
    let Some(&(rule, depth)) = with_depth.first() else {
        return Err(format!("{run}: no per-token depths were recorded"));
    };

    let q = quintiles(ref_nll);
    let mut sums = [(0u64, 0u64); QUINTILES];
    for (&qi, &d) in q.iter().zip(depth) {
        sums[qi as usize].0 += 1;
        sums[qi as usize].1 += u64::from(d);
    }
    let by_label = sums
        .iter()
        .enumerate()
        .filter(|(_, &(count, _))| count > 0)
        .map(|(label, &(count, sum))| DifficultyStat {
            difficulty: label as u8,
            count,
            mean_depth: sum as f64 / count as f64,
        })
        .collect();
    let mut sorted: Vec<f64> = ref_nll.iter().map(|&x| f64::from(x)).collect();
    sorted.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = (0..QUINTILES)
        .map(|k| sorted[(k * n).div_ceil(QUINTILES).min(n - 1)])
        .collect();
    edges.push(sorted[n - 1]);

    let nll: Vec<f64> = ref_nll.iter().map(|&x| f64::from(x)).collect();
    let correlations = with_depth
        .iter()
        .map(|&(rule, depth)| {
            let d: Vec<f64> = depth.iter().map(|&x| f64::from(x)).collect();
            DepthCorrelation {
                rule,
                tokens: n as u64,
                pearson: pearson(&d, &nll),
                spearman: spearman(&d, &nll),
            }
        })
        .collect();
    Ok(DepthByDifficulty {
        run: run.to_string(),
        by_label,
        unlabelled: 0,
        measure: DifficultyMeasure::ReferenceNll {
            reference: reference_run.to_string(),
            rule,
            edges,
        },
        correlations,
    })
}
