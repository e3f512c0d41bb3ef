//! Evaluation of a trained model on its run's data: validation NLL with both routing rules,
//! few-shot multiple choice and depth traces, gathered into `eval.json`.

use crate::data::{Batch, Dataset};
use crate::eval::{self, EvalBatch, McItem};
use crate::model::MorModel;
use crate::report::{targets_hash, DepthTrace, RuleScores, TokenScores, TraceRule, TraceToken};
use crate::{Error, Result};
use mor_core::config::ResolvedConfig;
use mor_router::RouteMode;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Validation sequences shown, coloured by depth, in `depth_tokens.html` (spread evenly over
/// the scored part of the split).
pub const TRACE_SEQUENCES: usize = 4;

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
    /// Predicted validation tokens scored.
    #[serde(default)]
    pub scored_tokens: u64,
    /// Predicted tokens of the whole validation split.
    #[serde(default)]
    pub split_tokens: u64,
    /// Validation sequences (rows) scored.
    #[serde(default)]
    pub scored_rows: u64,
    /// Validation sequences (rows) of the whole split.
    #[serde(default)]
    pub split_rows: u64,
    /// The token cap in force (`eval.max_tokens`).
    #[serde(default)]
    pub max_tokens: u64,
    /// Set when `eval.max_tokens` or `eval.max_batches` cut the split: which limit did.
    #[serde(default)]
    pub cap_note: Option<String>,
    /// Test-time depth (spec Fig. 5c), routed models with a cyclic plan: the causal NLL
    /// with at most `d` recursion steps per token, for `d = 1..N_r` (the last entry is the
    /// uncapped model), on the first [`DEPTH_SWEEP_TOKENS`] scored tokens at most.
    #[serde(default)]
    pub nll_by_max_depth: Vec<DepthNll>,
}

/// Predicted tokens the test-time depth sweep scores at most (the first rows of the scored
/// validation split): N_r - 1 extra causal passes over them.
pub const DEPTH_SWEEP_TOKENS: usize = 1 << 15;

/// One point of the test-time depth sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthNll {
    /// Maximum recursion steps per token.
    pub max_depth: usize,
    /// Causal NLL per predicted token (nats).
    pub nll: f64,
    /// Predicted tokens scored.
    pub tokens: u64,
}

impl EvalResults {
    /// One line saying how much of the validation split was scored and under which cap,
    /// e.g. `validation: scored 2048 of 2048 predicted tokens (32 of 32 sequences), cap
    /// eval.max_tokens = 1048576`.
    pub fn coverage(&self) -> String {
        let mut line = format!(
            "validation: scored {} of {} predicted tokens ({} of {} sequences), cap \
             eval.max_tokens = {}",
            self.scored_tokens,
            self.split_tokens,
            self.scored_rows,
            self.split_rows,
            self.max_tokens
        );
        if let Some(note) = &self.cap_note {
            line.push_str("; ");
            line.push_str(note);
        }
        line
    }
}

/// An evaluation with everything the report needs beyond `eval.json`.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// What `eval.json` holds.
    pub results: EvalResults,
    /// Depth traces of [`TRACE_SEQUENCES`] validation sequences (routed models only): per
    /// sequence one trace per routing rule, or one with [`TraceRule::Both`] when the rules
    /// agree on every token.
    pub traces: Vec<DepthTrace>,
    /// Per-token NLL and depth on the scored validation tokens (for `token_scores.bin`).
    pub scores: TokenScores,
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

/// The validation rows to score: the whole split up to `eval.max_tokens` predicted tokens
/// and `eval.max_batches` batches, in batches of `micro_batch_seqs` rows. Returns the
/// batches, the split's rows and, when a limit cut the split, a note naming it.
fn validation_batches(
    ds: &Dataset,
    cfg: &ResolvedConfig,
) -> Result<(Vec<EvalBatch>, usize, Option<String>)> {
    let val = ds.val();
    let (rows, t) = (val.num_rows(), val.seq_len());
    if rows == 0 || t == 0 {
        return Err(Error::msg(
            "the validation split is empty: raise data.val_fraction or add data",
        ));
    }
    let bs = cfg.train.micro_batch_seqs.max(1);
    let by_tokens = cfg.eval.max_tokens / t;
    let by_batches = cfg
        .eval
        .max_batches
        .map_or(usize::MAX, |m| m.saturating_mul(bs));
    if by_tokens == 0 {
        return Err(Error::msg(format!(
            "eval.max_tokens = {} is smaller than one validation sequence ({t} predicted \
             tokens); set it to at least {t}",
            cfg.eval.max_tokens
        )));
    }
    if by_batches == 0 {
        return Err(Error::msg(
            "eval.max_batches = 0 scores nothing; remove it (no limit) or set it to at least 1",
        ));
    }
    let take = rows.min(by_tokens).min(by_batches);
    let note = (take < rows).then(|| {
        let limit = if by_tokens <= by_batches {
            format!("eval.max_tokens = {}", cfg.eval.max_tokens)
        } else {
            format!(
                "eval.max_batches = {} (of {bs} sequences)",
                cfg.eval.max_batches.unwrap_or(0)
            )
        };
        format!(
            "{limit} cut the validation split to its first {} of {} predicted tokens",
            take * t,
            rows * t
        )
    });
    let all: Vec<usize> = (0..take).collect();
    let batches = all
        .chunks(bs)
        .map(|rows| Ok(to_eval(val.batch(rows, ds.config().doc_masking)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((batches, rows, note))
}

/// The causal NLL at every maximum depth `1..=N_r` on the first [`DEPTH_SWEEP_TOKENS`]
/// predicted tokens of `batches` (whole rows, at least one). The model's depth cap is
/// restored afterwards.
fn depth_sweep(model: &MorModel, batches: &[EvalBatch], t: usize) -> Result<Vec<DepthNll>> {
    let rows_wanted = (DEPTH_SWEEP_TOKENS / t.max(1)).max(1);
    let mut subset = Vec::new();
    let mut rows = 0;
    for b in batches {
        if rows >= rows_wanted {
            break;
        }
        subset.push(b.clone());
        rows += b.b;
    }
    let before = model.max_depth();
    let n_r = model.config().plan.num_recursions;
    let mut out = Vec::with_capacity(n_r);
    let result = (|| {
        for d in 1..=n_r {
            model.set_max_depth(Some(d))?;
            let (r, _) = eval::score_tokens(model, &subset, RouteMode::Causal)?;
            out.push(DepthNll {
                max_depth: d,
                nll: r.nll,
                tokens: r.tokens,
            });
        }
        Ok(())
    })();
    model.set_max_depth(Some(before))?;
    result.map(|()| out)
}

/// Evaluates a model on a dataset's validation split (NLL with full-sequence and causal
/// routing, bits per byte, router metrics), on few-shot task sets (the built-in ones for the
/// built-in corpus, the config's `eval.tasks`, and `extra_tasks`), and records the depth
/// trace of one validation sample (see `evaluate_all` for every trace and the per-token
/// scores).
pub fn evaluate(
    model: &MorModel,
    ds: &Dataset,
    cfg: &ResolvedConfig,
    name: &str,
    extra_tasks: &[PathBuf],
) -> Result<(EvalResults, Option<DepthTrace>)> {
    let ev = evaluate_all(model, ds, cfg, name, extra_tasks)?;
    debug_assert_eq!(ev.scores.check(), Ok(()));
    Ok((ev.results, ev.traces.into_iter().next()))
}

/// Evaluates like [`evaluate`] and also returns the depth traces of [`TRACE_SEQUENCES`]
/// validation sequences under each routing rule and the per-token scores.
///
/// The whole validation split is scored, up to `eval.max_tokens` predicted tokens (and
/// `eval.max_batches` batches when set); when a limit cuts the split, a line on stderr and
/// [`EvalResults::cap_note`] say so.
pub fn evaluate_all(
    model: &MorModel,
    ds: &Dataset,
    cfg: &ResolvedConfig,
    name: &str,
    extra_tasks: &[PathBuf],
) -> Result<Evaluation> {
    let mut ev = EvalResults::default();
    let (batches, split_rows, note) = validation_batches(ds, cfg)?;
    let t = ds.val().seq_len();
    ev.scored_rows = batches.iter().map(|b| b.b as u64).sum();
    ev.scored_tokens = ev.scored_rows * t as u64;
    ev.split_rows = split_rows as u64;
    ev.split_tokens = (split_rows * t) as u64;
    ev.max_tokens = cfg.eval.max_tokens as u64;
    if let Some(n) = &note {
        eprintln!("{name}: {n}");
    }
    ev.cap_note = note;
    let mut full_scores = None;
    let mut causal_scores = None;
    if cfg.eval.full_sequence || model.router().is_none() {
        let (r, s) = eval::score_tokens(model, &batches, RouteMode::FullSequence)?;
        ev.full_sequence = Some(r);
        full_scores = Some(s);
    }
    if model.router().is_some() && cfg.eval.causal {
        let (r, s) = eval::score_tokens(model, &batches, RouteMode::Causal)?;
        ev.causal = Some(r);
        causal_scores = Some(s);
        if cfg.plan.is_cyclic() && cfg.plan.num_recursions > 1 {
            ev.nll_by_max_depth = depth_sweep(model, &batches, t)?;
        }
    }
    let targets: Vec<u32> = batches
        .iter()
        .flat_map(|b| b.targets.iter().copied())
        .collect();
    let scores = TokenScores {
        row_len: t,
        targets_hash: targets_hash(&targets),
        full_sequence: full_scores,
        causal: causal_scores,
    };
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
    let traces = if model.router().is_some() {
        sample_traces(ds, &batches, &scores, name)
    } else {
        Vec::new()
    };
    Ok(Evaluation {
        results: ev,
        traces,
        scores,
    })
}

/// Depth traces of [`TRACE_SEQUENCES`] scored rows spread evenly over the scored part of the
/// split (rows `i · rows / K`), taken from the per-token depths of the scoring passes: per
/// row one trace per rule with depths, merged into one [`TraceRule::Both`] trace when the
/// rules agree on every token.
fn sample_traces(
    ds: &Dataset,
    batches: &[EvalBatch],
    scores: &TokenScores,
    name: &str,
) -> Vec<DepthTrace> {
    let tok = ds.tokenizer();
    let t = scores.row_len;
    let rows: usize = batches.iter().map(|b| b.b).sum();
    let k = TRACE_SEQUENCES.min(rows);
    let depth = |r: &Option<RuleScores>| r.as_ref().and_then(|r| r.depth.clone());
    let (full, causal) = (depth(&scores.full_sequence), depth(&scores.causal));
    let mut traces = Vec::new();
    let mut picked: Vec<usize> = (0..k).map(|i| i * rows / k).collect();
    picked.dedup();
    for row in picked {
        // Batches hold `b` rows each, all but the last the same size.
        let (mut bi, mut r) = (0, row);
        while r >= batches[bi].b {
            r -= batches[bi].b;
            bi += 1;
        }
        let b = &batches[bi];
        let ids = &b.inputs[r * b.t..(r + 1) * b.t];
        let labels = b.difficulty.as_ref().map(|d| &d[r * b.t..(r + 1) * b.t]);
        let span = row * t..(row + 1) * t;
        let rule_depths: Vec<(TraceRule, &[u8])> = match (&full, &causal) {
            (Some(f), Some(c)) if f[span.clone()] == c[span.clone()] => {
                vec![(TraceRule::Both, &f[span.clone()])]
            }
            (f, c) => [(TraceRule::FullSequence, f), (TraceRule::Causal, c)]
                .into_iter()
                .filter_map(|(rule, d)| Some((rule, &d.as_ref()?[span.clone()])))
                .collect(),
        };
        for (rule, depths) in rule_depths {
            let tokens = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| TraceToken {
                    text: tok.decode(&[id]).unwrap_or_default(),
                    // Depth at position i is the compute spent to predict token i+1 (spec
                    // §7); the difficulty is the label of that target token.
                    depth: depths[i],
                    difficulty: labels.map(|d| d[i]),
                })
                .collect();
            traces.push(DepthTrace {
                run: name.to_string(),
                tokens,
                rule,
                sequence: Some(row),
            });
        }
    }
    traces
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::stderr_of_mean;
    use crate::run::data_config;
    use mor_core::config::Config;

    const T: usize = 16;

    /// A micro model on the built-in corpus: `routing` is a `[router]` table or `router =
    /// "none"` settings, `eval` the `[eval]` keys.
    fn cfg(routing: &str, eval: &str) -> ResolvedConfig {
        let _ = crate::builtin::link();
        let text = format!(
            r#"
{routing}
[model]
preset = "micro"
vocab_size = 300
hidden_size = 32
num_heads = 4
num_kv_heads = 2
head_dim = 8
intermediate_size = 48
num_layers = 5
seq_len = {T}
[runtime]
seed = 5
[data]
source = "builtin"
builtin_docs = 200
tokenizer = "byte"
val_fraction = 0.1
[eval]
{eval}
[train]
budget = {{ steps = 1 }}
batch_seqs = 3
micro_batch_seqs = 3
"#
        );
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const EXPERT: &str = "[recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }\n[router]\nkind = \"expert_choice\"";
    const TOKEN: &str = "[recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }\n[router]\nkind = \"token_choice\"";

    fn setup(routing: &str, eval: &str) -> (ResolvedConfig, Dataset, MorModel) {
        let c = cfg(routing, eval);
        let ds = Dataset::prepare(&data_config(&c, None), None).unwrap();
        let model = MorModel::new(&c).unwrap();
        (c, ds, model)
    }

    fn row_means(nll: &[f32]) -> Vec<f64> {
        nll.chunks(T)
            .map(|r| r.iter().map(|&x| f64::from(x)).sum::<f64>() / T as f64)
            .collect()
    }

    #[test]
    fn the_whole_split_is_scored_up_to_the_token_cap_which_is_reported() {
        let (c, ds, model) = setup(EXPERT, "");
        let rows = ds.val().num_rows();
        assert!(rows >= 6, "{rows} validation rows");
        let ev = evaluate_all(&model, &ds, &c, "m", &[]).unwrap();
        let r = &ev.results;
        assert_eq!((r.scored_rows, r.split_rows), (rows as u64, rows as u64));
        assert_eq!(
            (r.scored_tokens, r.split_tokens),
            ((rows * T) as u64, (rows * T) as u64)
        );
        assert_eq!(r.cap_note, None);
        assert_eq!(r.max_tokens, 1 << 20);
        let full = r.full_sequence.as_ref().unwrap();
        assert_eq!((full.tokens, full.rows), ((rows * T) as u64, rows as u64));
        // The NLL and its standard error from the per-token scores, computed here.
        let nll = &ev.scores.full_sequence.as_ref().unwrap().nll;
        assert_eq!(nll.len(), rows * T);
        let mean = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64;
        assert!(
            (full.nll - mean).abs() < 1e-12 * mean.abs(),
            "{} {mean}",
            full.nll
        );
        let means = row_means(nll);
        let m = means.iter().sum::<f64>() / means.len() as f64;
        let var = means.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (means.len() - 1) as f64;
        let se = (var / means.len() as f64).sqrt();
        assert!(
            (full.nll_stderr.unwrap() - se).abs() < 1e-12,
            "{:?} {se}",
            full.nll_stderr
        );
        assert!(se > 0.0);
        let causal = r.causal.as_ref().unwrap();
        assert_eq!(
            causal.nll_stderr,
            stderr_of_mean(&row_means(&ev.scores.causal.as_ref().unwrap().nll))
        );
        assert!(r.coverage().contains(&format!(
            "scored {} of {} predicted tokens ({rows} of {rows} sequences), cap eval.max_tokens = 1048576",
            rows * T,
            rows * T
        )));

        // A cap of 3 rows and a bit: whole rows only, the first three, and a note.
        let (c3, _, _) = setup(EXPERT, &format!("max_tokens = {}", 3 * T + 5));
        let cut = evaluate_all(&model, &ds, &c3, "m", &[]).unwrap();
        assert_eq!(
            (cut.results.scored_rows, cut.results.scored_tokens),
            (3, 3 * T as u64)
        );
        let note = cut.results.cap_note.clone().unwrap();
        assert!(
            note.contains(&format!("eval.max_tokens = {}", 3 * T + 5))
                && note.contains(&format!("first {} of {} predicted tokens", 3 * T, rows * T)),
            "{note}"
        );
        assert_eq!(
            cut.results.full_sequence.as_ref().unwrap().tokens,
            3 * T as u64
        );
        assert_eq!(
            cut.scores.full_sequence.as_ref().unwrap().nll[..],
            nll[..3 * T],
            "the capped scores are the first rows of the whole split's"
        );
        assert_ne!(cut.scores.targets_hash, ev.scores.targets_hash);

        // max_batches still limits (batches of micro_batch_seqs = 3 rows).
        let (cb, _, _) = setup(EXPERT, "max_batches = 1");
        let one = evaluate_all(&model, &ds, &cb, "m", &[]).unwrap();
        assert_eq!(one.results.scored_rows, 3);
        assert!(one
            .results
            .cap_note
            .unwrap()
            .contains("eval.max_batches = 1"));

        // A cap below one sequence is refused with the value and the minimum.
        let (c0, _, _) = setup(EXPERT, &format!("max_tokens = {}", T - 1));
        let e = evaluate_all(&model, &ds, &c0, "m", &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!(
                "eval.max_tokens = {} is smaller than one validation sequence ({T}",
                T - 1
            )),
            "{e}"
        );
    }

    /// The traces' sequences, rules and depths agree with the per-token scores.
    fn check_traces(ev: &Evaluation, rows: usize) -> (usize, usize) {
        let full = ev
            .scores
            .full_sequence
            .as_ref()
            .unwrap()
            .depth
            .clone()
            .unwrap();
        let causal = ev.scores.causal.as_ref().unwrap().depth.clone().unwrap();
        let want: Vec<usize> = (0..TRACE_SEQUENCES)
            .map(|i| i * rows / TRACE_SEQUENCES)
            .collect();
        let mut seen = Vec::new();
        let (mut both, mut split) = (0, 0);
        for &row in &want {
            let mine: Vec<&DepthTrace> = ev
                .traces
                .iter()
                .filter(|t| t.sequence == Some(row))
                .collect();
            let span = row * T..(row + 1) * T;
            let depths = |t: &DepthTrace| t.tokens.iter().map(|k| k.depth).collect::<Vec<u8>>();
            if full[span.clone()] == causal[span.clone()] {
                assert_eq!(mine.len(), 1, "row {row}");
                assert_eq!(mine[0].rule, TraceRule::Both);
                assert_eq!(depths(mine[0]), full[span]);
                both += 1;
            } else {
                assert_eq!(mine.len(), 2, "row {row}");
                assert_eq!(mine[0].rule, TraceRule::FullSequence);
                assert_eq!(mine[1].rule, TraceRule::Causal);
                assert_eq!(depths(mine[0]), full[span.clone()]);
                assert_eq!(depths(mine[1]), causal[span]);
                split += 1;
            }
            for t in &mine {
                assert_eq!(t.run, "m");
                assert_eq!(t.tokens.len(), T);
            }
            seen.push(row);
        }
        assert_eq!(seen.len(), TRACE_SEQUENCES);
        assert_eq!(ev.traces.len(), both + 2 * split, "no other traces");
        (both, split)
    }

    #[test]
    fn traces_show_four_sequences_under_each_rule() {
        let (c, ds, model) = setup(EXPERT, "");
        let rows = ds.val().num_rows();
        let ev = evaluate_all(&model, &ds, &c, "m", &[]).unwrap();
        check_traces(&ev, rows);
        // The token text is the decoded input token of the row.
        let val = ds.val();
        let row = ev.traces[0].sequence.unwrap();
        let batch = val.batch(&[row], false).unwrap();
        let text: Vec<String> = batch
            .inputs
            .iter()
            .map(|&id| ds.tokenizer().decode(&[id]).unwrap())
            .collect();
        let got: Vec<String> = ev.traces[0].tokens.iter().map(|k| k.text.clone()).collect();
        assert_eq!(got, text);
        // Token-choice depths are decided per token, so both rules agree.
        let (c, ds, model) = setup(TOKEN, "");
        let ev = evaluate_all(&model, &ds, &c, "m", &[]).unwrap();
        let (both, split) = check_traces(&ev, rows);
        assert_eq!((both, split), (TRACE_SEQUENCES, 0));
        // The old entry point returns the first trace.
        let (_, first) = evaluate(&model, &ds, &c, "m", &[]).unwrap();
        assert_eq!(first.as_ref(), ev.traces.first());
    }

    #[test]
    fn models_without_a_router_have_nll_scores_and_no_depths() {
        let routing = "router = \"none\"\n[recursion]\nnum_recursions = 1\nsharing = \"none\"";
        let (c, ds, model) = setup(routing, "");
        let ev = evaluate_all(&model, &ds, &c, "v", &[]).unwrap();
        assert!(ev.traces.is_empty());
        assert!(ev.scores.causal.is_none());
        let full = ev.scores.full_sequence.as_ref().unwrap();
        assert_eq!(full.depth, None);
        assert_eq!(full.nll.len(), ds.val().num_rows() * T);
    }

    #[test]
    fn multiple_choice_items_without_context_or_choices_are_refused() {
        let (_, _, model) = setup(EXPERT, "");
        let ok = McItem {
            context: vec![10, 11, 12],
            choices: vec![vec![13], vec![14, 15]],
            choice_bytes: vec![1, 2],
            gold: 1,
        };
        assert_eq!(
            eval::evaluate_mc(&model, std::slice::from_ref(&ok))
                .unwrap()
                .items,
            1
        );
        let cases = [
            (
                McItem {
                    context: vec![],
                    ..ok.clone()
                },
                "item 1: the context is empty",
            ),
            (
                McItem {
                    choices: vec![],
                    choice_bytes: vec![],
                    gold: 0,
                    ..ok.clone()
                },
                "item 1: it has no choices",
            ),
            (
                McItem {
                    choices: vec![vec![13], vec![]],
                    ..ok.clone()
                },
                "item 1: choice 1 is empty",
            ),
            (
                McItem {
                    choice_bytes: vec![1],
                    ..ok.clone()
                },
                "item 1: 1 choice byte lengths for 2 choices",
            ),
            (
                McItem {
                    gold: 2,
                    ..ok.clone()
                },
                "item 1: gold = 2 but there are 2 choices",
            ),
        ];
        for (bad, want) in cases {
            let e = eval::evaluate_mc(&model, &[ok.clone(), bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
