//! Evaluation: validation NLL and bits per byte with causal and full-sequence routing,
//! few-shot multiple choice (acc and acc_norm), router metrics and per-token depth traces.
//!
//! Two routing rules are reported (spec §6, §8 item 5):
//! - **full sequence**: the training-time top-k over the whole sequence, which the
//!   reference code reports; it is not causal (a token's depth depends on later tokens);
//! - **causal**: the rule decoding uses (threshold on the aux-loss router, the aux router,
//!   or the up-front depth of token-choice), so the NLL is one a decoder can achieve.
//!
//! NLL is the mean over every predicted token (rows of `seq_len + 1` tokens give `seq_len`
//! predictions each); bits per byte = total NLL / ln 2 / UTF-8 bytes of the predicted text.
//!
//! The standard error of the NLL is that of the mean of per-row (per validation sequence)
//! means, `sd(row means) / sqrt(rows)`, the batch-means estimate with `seq_len`-token
//! blocks. Tokens of one sequence share their context and document, so their losses are
//! correlated and a per-token iid standard error would be too small; rows are disjoint
//! spans of the packed split (adjacent rows may still continue one document, so the
//! estimate is slightly optimistic for long documents). Every row has the same number of
//! tokens, so the mean of the row means is the NLL itself.

use crate::model::MorModel;
use crate::report::{RuleScores, TokenScores};
use crate::{Error, Result};
use candle_core::Tensor;
use mor_router::{RouteMode, RouterStats};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One evaluation batch.
#[derive(Debug, Clone)]
pub struct EvalBatch {
    /// Input ids `[b, t]` row-major.
    pub inputs: Vec<u32>,
    /// Target ids `[b, t]` row-major.
    pub targets: Vec<u32>,
    /// Rows.
    pub b: usize,
    /// Tokens per row.
    pub t: usize,
    /// UTF-8 bytes of the target text (for bits per byte); 0 when unknown.
    pub bytes: u64,
    /// Difficulty label of every target token, when the corpus has them.
    pub difficulty: Option<Vec<u8>>,
}

/// Validation results of one routing rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NllReport {
    /// Mean NLL per predicted token (nats).
    pub nll: f64,
    /// Bits per byte (`None` when byte counts are unknown).
    pub bits_per_byte: Option<f64>,
    /// Standard error of `nll`: of the mean of per-row means (see the module docs); `None`
    /// with fewer than two rows.
    #[serde(default)]
    pub nll_stderr: Option<f64>,
    /// Predicted tokens.
    pub tokens: u64,
    /// Validation rows (sequences) scored.
    #[serde(default)]
    pub rows: u64,
    /// Router statistics merged over the evaluation.
    pub router_stats: Option<RouterStats>,
    /// Mean depth per difficulty label (index = label), with token counts.
    pub depth_by_difficulty: Vec<(f64, u64)>,
    /// Fraction of tokens at each depth 1..=N_r.
    pub depth_fractions: Vec<f64>,
}

/// Standard error of the mean of `values`: the sample standard deviation (`n − 1` in the
/// denominator) over `sqrt(n)`; `None` with fewer than two values.
///
/// # Examples
///
/// ```
/// use mor_models::eval::stderr_of_mean;
/// // mean 2, sample variance ((1)^2 + 0 + (1)^2) / 2 = 1, SE = 1 / sqrt(3).
/// let se = stderr_of_mean(&[1.0, 2.0, 3.0]).unwrap();
/// assert!((se - 1.0 / 3f64.sqrt()).abs() < 1e-15);
/// assert_eq!(stderr_of_mean(&[4.0]), None);
/// ```
pub fn stderr_of_mean(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// Evaluates NLL over `batches` with routing rule `mode`.
pub fn evaluate_nll(model: &MorModel, batches: &[EvalBatch], mode: RouteMode) -> Result<NllReport> {
    Ok(score_tokens(model, batches, mode)?.0)
}

/// [`evaluate_nll`], also returning every predicted token's NLL and (routed models) depth, in
/// batch, row and position order.
pub fn score_tokens(
    model: &MorModel,
    batches: &[EvalBatch],
    mode: RouteMode,
) -> Result<(NllReport, RuleScores)> {
    let dev = model.backend().device().clone();
    let n_r = model.plan().num_recursions.max(1);
    let routed = model.router().is_some();
    let mut all_nll: Vec<f32> = Vec::new();
    let mut all_depth: Vec<u8> = Vec::new();
    let mut row_means: Vec<f64> = Vec::new();
    let mut total = 0f64;
    let mut count = 0u64;
    let mut bytes = 0u64;
    let mut stats: Option<RouterStats> = None;
    let mut by_diff: Vec<(f64, u64)> = Vec::new();
    let mut depth_hist = vec![0u64; n_r];
    for b in batches {
        let ids = Tensor::from_vec(b.inputs.clone(), (b.b, b.t), &dev)?;
        let tg = Tensor::from_vec(b.targets.clone(), (b.b, b.t), &dev)?;
        let out = model.forward(&ids, mode)?;
        let nll = MorModel::nll_per_token(&out.logits, &tg)?;
        total += nll.iter().map(|&x| x as f64).sum::<f64>();
        count += nll.len() as u64;
        bytes += b.bytes;
        if b.t > 0 {
            row_means.extend(
                nll.chunks(b.t)
                    .map(|row| row.iter().map(|&x| x as f64).sum::<f64>() / row.len() as f64),
            );
        }
        all_nll.extend_from_slice(&nll);
        if routed {
            for row in &out.depths {
                all_depth.extend(row.iter().map(|&d| d.clamp(1, n_r as u8)));
            }
        }
        if model.router().is_some() {
            stats
                .get_or_insert_with(RouterStats::default)
                .merge(&out.router.stats);
        }
        for (row, depths) in out.depths.iter().enumerate() {
            for (i, &d) in depths.iter().enumerate() {
                let d = (d as usize).clamp(1, n_r);
                depth_hist[d - 1] += 1;
                if let Some(diff) = &b.difficulty {
                    let lab = diff[row * b.t + i] as usize;
                    if by_diff.len() <= lab {
                        by_diff.resize(lab + 1, (0.0, 0));
                    }
                    by_diff[lab].0 += d as f64;
                    by_diff[lab].1 += 1;
                }
            }
        }
    }
    for e in &mut by_diff {
        if e.1 > 0 {
            e.0 /= e.1 as f64;
        }
    }
    let all: u64 = depth_hist.iter().sum();
    let report = NllReport {
        nll: if count > 0 {
            total / count as f64
        } else {
            f64::NAN
        },
        nll_stderr: stderr_of_mean(&row_means),
        rows: row_means.len() as u64,
        bits_per_byte: if bytes > 0 {
            Some(total / std::f64::consts::LN_2 / bytes as f64)
        } else {
            None
        },
        tokens: count,
        router_stats: stats,
        depth_by_difficulty: by_diff,
        depth_fractions: depth_hist
            .iter()
            .map(|&c| if all > 0 { c as f64 / all as f64 } else { 0.0 })
            .collect(),
    };
    let depth = (routed && all_depth.len() == all_nll.len()).then_some(all_depth);
    Ok((
        report,
        RuleScores {
            nll: all_nll,
            depth,
        },
    ))
}

/// File name of a run's per-token validation scores.
pub const TOKEN_SCORES_FILE: &str = "token_scores.bin";

/// Writes `scores` to `dir/token_scores.bin` atomically (the compact form of
/// [`TokenScores::to_bytes`]).
///
/// # Errors
/// When the vectors disagree in length, or on I/O errors (with the path).
pub fn save_token_scores(dir: &Path, scores: &TokenScores) -> Result<()> {
    let path = dir.join(TOKEN_SCORES_FILE);
    scores
        .check()
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    crate::checkpoint::write_atomic(&path, &scores.to_bytes())
}

/// Reads `dir/token_scores.bin`.
///
/// # Errors
/// When the file is missing, damaged or inconsistent (the message names the file).
pub fn load_token_scores(dir: &Path) -> Result<TokenScores> {
    let path = dir.join(TOKEN_SCORES_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let scores = TokenScores::from_bytes(&bytes)
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    scores
        .check()
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    Ok(scores)
}

/// One multiple-choice item, already tokenized.
#[derive(Debug, Clone)]
pub struct McItem {
    /// Context ids.
    pub context: Vec<u32>,
    /// Ids of each choice (the continuation).
    pub choices: Vec<Vec<u32>>,
    /// UTF-8 byte length of each choice (for acc_norm).
    pub choice_bytes: Vec<usize>,
    /// Index of the right choice.
    pub gold: usize,
}

/// Few-shot multiple-choice accuracy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct McReport {
    /// Items scored.
    pub items: usize,
    /// Fraction where the highest summed log-likelihood is the gold choice.
    pub acc: f64,
    /// Same, with log-likelihood divided by the choice's byte length.
    pub acc_norm: f64,
}

/// Checks one item: a non-empty context, at least one choice, no empty choice, one byte
/// length per choice and a gold index among the choices.
fn check_mc_item(index: usize, it: &McItem) -> Result<()> {
    let bad = |what: String| {
        Err(Error::msg(format!(
            "multiple-choice item {index}: {what}; an item needs a non-empty context, at least \
             one choice, every choice non-empty, and gold < the number of choices"
        )))
    };
    if it.context.is_empty() {
        return bad("the context is empty (0 tokens)".into());
    }
    if it.choices.is_empty() {
        return bad("it has no choices".into());
    }
    if let Some(c) = it.choices.iter().position(|c| c.is_empty()) {
        return bad(format!("choice {c} is empty (0 tokens)"));
    }
    if it.choice_bytes.len() != it.choices.len() {
        return bad(format!(
            "{} choice byte lengths for {} choices",
            it.choice_bytes.len(),
            it.choices.len()
        ));
    }
    if it.gold >= it.choices.len() {
        return bad(format!(
            "gold = {} but there are {} choices",
            it.gold,
            it.choices.len()
        ));
    }
    Ok(())
}

/// Scores multiple-choice items with causal routing: each choice's summed log-likelihood
/// given the context (lm-eval-harness style). Sequences longer than the model context keep
/// their last `seq_len` tokens.
///
/// # Errors
/// An item with an empty context, no choices, an empty choice, a byte length missing for a
/// choice or a gold index out of range is refused (naming the item), before anything is
/// scored.
pub fn evaluate_mc(model: &MorModel, items: &[McItem]) -> Result<McReport> {
    for (i, it) in items.iter().enumerate() {
        check_mc_item(i, it)?;
    }
    let dev = model.backend().device().clone();
    let max_t = model.config().model.seq_len;
    let (mut acc, mut accn, mut n) = (0usize, 0usize, 0usize);
    for it in items {
        let mut scores = Vec::with_capacity(it.choices.len());
        for ch in &it.choices {
            let seq: Vec<u32> = it.context.iter().chain(ch.iter()).copied().collect();
            let keep = (max_t + 1).min(seq.len());
            let seq = &seq[seq.len() - keep..];
            let inp = &seq[..seq.len() - 1];
            let tgt = &seq[1..];
            let t = inp.len();
            let ids = Tensor::from_vec(inp.to_vec(), (1, t), &dev)?;
            let tg = Tensor::from_vec(tgt.to_vec(), (1, t), &dev)?;
            let out = model.forward(&ids, RouteMode::Causal)?;
            let nll = MorModel::nll_per_token(&out.logits, &tg)?;
            let nch = ch.len().min(t);
            let ll: f64 = -nll[t - nch..].iter().map(|&x| x as f64).sum::<f64>();
            scores.push(ll);
        }
        let argmax = |v: &[f64]| {
            v.iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (i, &x)| if x > b.1 { (i, x) } else { b },
                )
                .0
        };
        let normed: Vec<f64> = scores
            .iter()
            .zip(&it.choice_bytes)
            .map(|(s, &nb)| s / nb.max(1) as f64)
            .collect();
        if argmax(&scores) == it.gold {
            acc += 1;
        }
        if argmax(&normed) == it.gold {
            accn += 1;
        }
        n += 1;
    }
    Ok(McReport {
        items: n,
        acc: if n > 0 {
            acc as f64 / n as f64
        } else {
            f64::NAN
        },
        acc_norm: if n > 0 {
            accn as f64 / n as f64
        } else {
            f64::NAN
        },
    })
}

/// Depth each token received under causal routing for one row of ids.
pub fn depth_trace(model: &MorModel, ids: &[u32]) -> Result<Vec<u8>> {
    let dev = model.backend().device().clone();
    let t = ids.len().min(model.config().model.seq_len);
    let x = Tensor::from_vec(ids[..t].to_vec(), (1, t), &dev)?;
    let out = model.forward(&x, RouteMode::Causal)?;
    Ok(out.depths.into_iter().next().unwrap_or_default())
}
