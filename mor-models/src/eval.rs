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

use crate::model::MorModel;
use crate::Result;
use candle_core::Tensor;
use mor_router::{RouteMode, RouterStats};
use serde::{Deserialize, Serialize};

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
    /// Predicted tokens.
    pub tokens: u64,
    /// Router statistics merged over the evaluation.
    pub router_stats: Option<RouterStats>,
    /// Mean depth per difficulty label (index = label), with token counts.
    pub depth_by_difficulty: Vec<(f64, u64)>,
    /// Fraction of tokens at each depth 1..=N_r.
    pub depth_fractions: Vec<f64>,
}

/// Evaluates NLL over `batches` with routing rule `mode`.
pub fn evaluate_nll(model: &MorModel, batches: &[EvalBatch], mode: RouteMode) -> Result<NllReport> {
    let dev = model.backend().device().clone();
    let n_r = model.plan().num_recursions.max(1);
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
    Ok(NllReport {
        nll: if count > 0 {
            total / count as f64
        } else {
            f64::NAN
        },
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
    })
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

/// Scores multiple-choice items with causal routing: each choice's summed log-likelihood
/// given the context (lm-eval-harness style). Sequences longer than the model context keep
/// their last `seq_len` tokens.
pub fn evaluate_mc(model: &MorModel, items: &[McItem]) -> Result<McReport> {
    let dev = model.backend().device().clone();
    let max_t = model.config().model.seq_len;
    let (mut acc, mut accn, mut n) = (0usize, 0usize, 0usize);
    for it in items {
        if it.choices.is_empty() || it.gold >= it.choices.len() {
            continue;
        }
        let mut scores = Vec::with_capacity(it.choices.len());
        for ch in &it.choices {
            if ch.is_empty() {
                scores.push(f64::NEG_INFINITY);
                continue;
            }
            let mut seq: Vec<u32> = it.context.iter().chain(ch.iter()).copied().collect();
            if seq.len() < 2 {
                seq.insert(0, it.context.first().copied().unwrap_or(0));
            }
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
