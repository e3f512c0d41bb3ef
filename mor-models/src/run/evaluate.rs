//! Evaluation of a trained model on its run's data: validation NLL with both routing rules,
//! few-shot multiple choice and depth traces, gathered into `eval.json`.

use crate::data::{Batch, Dataset};
use crate::eval::{self, EvalBatch, McItem};
use crate::model::MorModel;
use crate::report::{DepthTrace, TraceToken};
use crate::{Error, Result};
use mor_core::config::ResolvedConfig;
use mor_router::RouteMode;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything `eval.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalResults {
    /// NLL with the training-time full-sequence routing.
    pub full_sequence: Option<eval::NllReport>,
    /// NLL with causal routing (MoR only).
    pub causal: Option<eval::NllReport>,
    /// Few-shot multiple choice, per task set, and the mean.
    pub mc: Vec<(String, eval::McReport)>,
    /// Mean accuracy over task sets.
    pub acc: Option<f64>,
    /// Mean acc_norm over task sets.
    pub acc_norm: Option<f64>,
}

fn to_eval(b: Batch) -> EvalBatch {
    EvalBatch {
        inputs: b.inputs,
        targets: b.targets,
        b: b.b,
        t: b.t,
        bytes: b.bytes,
        difficulty: b.difficulty,
    }
}

/// Evaluates a model on a dataset's validation split (NLL with full-sequence and causal
/// routing, bits per byte, router metrics), on few-shot task sets (the built-in ones for the
/// built-in corpus, the config's `eval.tasks`, and `extra_tasks`), and records the depth
/// trace of one validation sample.
pub fn evaluate(
    model: &MorModel,
    ds: &Dataset,
    cfg: &ResolvedConfig,
    name: &str,
    extra_tasks: &[PathBuf],
) -> Result<(EvalResults, Option<DepthTrace>)> {
    let mut ev = EvalResults::default();
    let mut trace = None;
    let batches: Vec<EvalBatch> = ds
        .val_batches(cfg.train.micro_batch_seqs.max(1))?
        .take(cfg.eval.max_batches.unwrap_or(usize::MAX))
        .map(to_eval)
        .collect();
    if batches.is_empty() {
        return Err(Error::msg(
            "the validation split is empty: raise data.val_fraction or add data",
        ));
    }
    if cfg.eval.full_sequence || model.router().is_none() {
        ev.full_sequence = Some(eval::evaluate_nll(
            model,
            &batches,
            RouteMode::FullSequence,
        )?);
    }
    if model.router().is_some() && cfg.eval.causal {
        ev.causal = Some(eval::evaluate_nll(model, &batches, RouteMode::Causal)?);
    }
    // Few-shot multiple choice: the built-in task sets for the built-in corpus, plus
    // every task file of the config.
    let tok = ds.tokenizer();
    let mut sets = Vec::new();
    if ds.config().source == "builtin" {
        sets.extend(crate::data::builtin::builtin_mc_tasks(
            cfg.seed ^ 0x5eed,
            40,
        ));
    }
    for p in cfg.eval.tasks.iter().chain(extra_tasks) {
        sets.push(crate::data::tasks::load_mc_tasks(p)?);
    }
    for set in sets {
        let mut items = Vec::new();
        for t in &set.items {
            let context = tok.encode(&t.context)?;
            let mut choices = Vec::new();
            let mut choice_bytes = Vec::new();
            for c in &t.choices {
                choices.push(tok.encode(c)?);
                choice_bytes.push(c.len());
            }
            items.push(McItem {
                context,
                choices,
                choice_bytes,
                gold: t.gold,
            });
        }
        let r = eval::evaluate_mc(model, &items)?;
        ev.mc.push((set.name.clone(), r));
    }
    if !ev.mc.is_empty() {
        let n = ev.mc.len() as f64;
        ev.acc = Some(ev.mc.iter().map(|(_, r)| r.acc).sum::<f64>() / n);
        ev.acc_norm = Some(ev.mc.iter().map(|(_, r)| r.acc_norm).sum::<f64>() / n);
    }
    if model.router().is_some() {
        let b = &batches[0];
        let ids = &b.inputs[..b.t];
        let depths = eval::depth_trace(model, ids)?;
        let mut toks = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let text = tok.decode(&[id]).unwrap_or_default();
            // Depth at position i is the compute spent to predict token i+1 (spec §7);
            // the difficulty is the label of that target token.
            let difficulty = b.difficulty.as_ref().map(|d| d[i]);
            toks.push(TraceToken {
                text,
                depth: depths.get(i).copied().unwrap_or(0),
                difficulty,
            });
        }
        trace = Some(DepthTrace {
            run: name.to_string(),
            tokens: toks,
        });
    }
    Ok((ev, trace))
}
