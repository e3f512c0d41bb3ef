//! The data a report is written from: run summaries, training curves and depth traces.
//!
//! These types do not depend on the model code, so a finished ablation can be re-rendered from
//! its `results.json` alone. Every `f64` field round-trips through JSON even when it is not
//! finite: a diverged run keeps its `NaN` (written as the string `"NaN"`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The outcome of one training run, one row of the results table (spec §6.1).
///
/// Ratios (`accuracy`, `acc_norm`, `dead_token_ratio`, `sampling_acc`) are fractions in
/// `[0, 1]`; the Markdown table shows them as percentages, as the paper's tables do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Run name, unique within an ablation (e.g. `mor_expert_nr3`).
    pub name: String,
    /// Model family: `"vanilla"`, `"recursive"` or `"mor"`.
    pub model: String,
    /// Router kind (e.g. `expert_choice`), or `"-"` for models without a router.
    pub router: String,
    /// KV policy name (e.g. `recursion_wise`), or `"-"`.
    pub kv_policy: String,
    /// Parameter-sharing strategy (e.g. `middle_cycle`), or `"-"`.
    pub sharing: String,
    /// Number of recursions `N_r` (1 for a model without recursion).
    pub num_recursions: usize,
    /// Parameters outside the token embedding and LM head (the paper's "Param" column).
    pub params_non_embedding: u64,
    /// Parameters of the token embedding (and of an untied LM head).
    pub params_embedding: u64,
    /// Forward FLOPs per token (spec §1.4).
    #[serde(with = "float")]
    pub flops_per_token: f64,
    /// Total training FLOPs.
    #[serde(with = "float")]
    pub train_flops: f64,
    /// Training tokens seen.
    pub train_tokens: u64,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Validation negative log-likelihood per token in nats, with expert-choice scored by the
    /// training-time full-sequence top-k (as the paper evaluates, spec §6).
    #[serde(with = "float")]
    pub val_nll: f64,
    /// Validation NLL under the causal inference rule, where one was measured.
    #[serde(default, with = "opt_float")]
    pub val_nll_causal: Option<f64>,
    /// Validation bits per UTF-8 byte (full-sequence routing).
    #[serde(with = "float")]
    pub bits_per_byte: f64,
    /// Validation bits per byte under the causal inference rule.
    #[serde(default, with = "opt_float")]
    pub bits_per_byte_causal: Option<f64>,
    /// Few-shot accuracy (fraction).
    #[serde(default, with = "opt_float")]
    pub accuracy: Option<f64>,
    /// Few-shot length-normalised accuracy (fraction).
    #[serde(default, with = "opt_float")]
    pub acc_norm: Option<f64>,
    /// Share of positions never selected at the last recursion step (fraction, spec §6.4b).
    #[serde(default, with = "opt_float")]
    pub dead_token_ratio: Option<f64>,
    /// Sampling accuracy of the causal router rule (fraction, spec §3.1).
    #[serde(default, with = "opt_float")]
    pub sampling_acc: Option<f64>,
    /// Token-choice load imbalance `(max_i Load_i − mean Load) / mean Load` (spec §6.4c).
    #[serde(default, with = "opt_float")]
    pub maxvio: Option<f64>,
    /// Entropy of the mean token-choice routing distribution, in nats (spec §6.4c).
    #[serde(default, with = "opt_float")]
    pub entropy: Option<f64>,
    /// Tokens whose final depth is `d`, for `d = 1..=N_r` (index `d - 1`); empty when the run
    /// has no router.
    #[serde(default)]
    pub tokens_per_depth: Vec<u64>,
    /// Mean training throughput in tokens per second.
    #[serde(with = "float")]
    pub train_tokens_per_sec: f64,
    /// Wall-clock time of the run in seconds.
    #[serde(with = "float")]
    pub wall_secs: f64,
    /// `"done"`, or `"failed: <reason>"`.
    pub status: String,
    /// Anything else a run wants to keep (config hashes, seeds, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Key in [`RunSummary::extra`] of the test-time depth sweep: a list of
/// `{max_depth, nll, tokens}` (causal NLL with at most `max_depth` recursion steps).
pub const NLL_BY_MAX_DEPTH_KEY: &str = "nll_by_max_depth";

/// Key in [`RunSummary::extra`] of the standard error of [`RunSummary::val_nll`].
pub const NLL_STDERR_KEY: &str = "val_nll_stderr";
/// Key in [`RunSummary::extra`] of the standard error of [`RunSummary::val_nll_causal`].
pub const NLL_CAUSAL_STDERR_KEY: &str = "val_nll_causal_stderr";
/// Key in [`RunSummary::extra`] of the number of predicted validation tokens scored.
pub const VAL_TOKENS_SCORED_KEY: &str = "val_tokens_scored";
/// Key in [`RunSummary::extra`] of the number of predicted tokens of the validation split.
pub const VAL_TOKENS_SPLIT_KEY: &str = "val_tokens_split";

impl RunSummary {
    /// Whether the run finished (its status is `"done"`).
    pub fn is_done(&self) -> bool {
        self.status == "done"
    }

    /// Standard error of [`Self::val_nll`] (over per-sequence means, see
    /// [`crate::eval::NllReport::nll_stderr`]), kept in [`Self::extra`] under
    /// [`NLL_STDERR_KEY`]; `None` when it was not measured.
    pub fn val_nll_stderr(&self) -> Option<f64> {
        self.extra.get(NLL_STDERR_KEY).and_then(|v| v.as_f64())
    }

    /// The test-time depth sweep kept in [`Self::extra`] under [`NLL_BY_MAX_DEPTH_KEY`]:
    /// `(max_depth, causal NLL)`, empty when the run has none.
    pub fn nll_by_max_depth(&self) -> Vec<(usize, f64)> {
        let Some(list) = self
            .extra
            .get(NLL_BY_MAX_DEPTH_KEY)
            .and_then(|v| v.as_array())
        else {
            return Vec::new();
        };
        list.iter()
            .filter_map(|p| Some((p["max_depth"].as_u64()? as usize, p["nll"].as_f64()?)))
            .collect()
    }

    /// Standard error of [`Self::val_nll_causal`], kept in [`Self::extra`] under
    /// [`NLL_CAUSAL_STDERR_KEY`].
    pub fn val_nll_causal_stderr(&self) -> Option<f64> {
        self.extra
            .get(NLL_CAUSAL_STDERR_KEY)
            .and_then(|v| v.as_f64())
    }

    /// Records the standard errors of both NLLs in [`Self::extra`] (a `None` or non-finite
    /// value removes the entry).
    ///
    /// # Examples
    ///
    /// ```
    /// # use mor_models::report::RunSummary;
    /// # fn row() -> RunSummary { serde_json::from_str(r#"{"name":"r","model":"mor","router":"-","kv_policy":"-","sharing":"-","num_recursions":1,"params_non_embedding":0,"params_embedding":0,"flops_per_token":0,"train_flops":0,"train_tokens":0,"steps":0,"val_nll":4.0,"bits_per_byte":1.0,"train_tokens_per_sec":0,"wall_secs":0,"status":"done"}"#).unwrap() }
    /// let mut r = row();
    /// r.set_nll_stderrs(Some(0.012), None);
    /// assert_eq!((r.val_nll_stderr(), r.val_nll_causal_stderr()), (Some(0.012), None));
    /// ```
    pub fn set_nll_stderrs(&mut self, full: Option<f64>, causal: Option<f64>) {
        for (key, value) in [(NLL_STDERR_KEY, full), (NLL_CAUSAL_STDERR_KEY, causal)] {
            match value.filter(|x| x.is_finite()) {
                Some(x) => {
                    self.extra.insert(key.to_string(), serde_json::json!(x));
                }
                None => {
                    self.extra.remove(key);
                }
            }
        }
    }
}

/// One logged point of a training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Optimiser step.
    pub step: u64,
    /// Training tokens seen so far.
    pub tokens: u64,
    /// Training FLOPs spent so far.
    #[serde(with = "float")]
    pub flops: f64,
    /// Training loss at this step (nats per token).
    #[serde(with = "float")]
    pub loss: f64,
    /// Validation NLL measured at this step, if it was.
    #[serde(default, with = "opt_float")]
    pub val_nll: Option<f64>,
}

/// The training curve of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// Name of the run (matches [`RunSummary::name`]).
    pub run: String,
    /// Points in logging order.
    pub points: Vec<CurvePoint>,
}

/// One token of a depth trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceToken {
    /// The token's text as decoded (may contain spaces, newlines or markup characters).
    pub text: String,
    /// Recursion steps the token went through (0 when it skipped every recursion).
    pub depth: u8,
    /// An optional difficulty label (e.g. a bucket of a reference model's next-token loss;
    /// larger is harder).
    #[serde(default)]
    pub difficulty: Option<u8>,
}

/// The routing rule a depth trace was recorded with (spec §6, §8 item 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceRule {
    /// The training-time top-k over the whole sequence (not causal).
    FullSequence,
    /// The rule decoding uses (a token's depth depends only on earlier tokens). Traces written
    /// without a rule were recorded with it.
    #[default]
    Causal,
    /// Both rules gave every token of the sample the same depth.
    Both,
}

impl TraceRule {
    /// How the report names the rule.
    pub fn describe(self) -> &'static str {
        match self {
            TraceRule::FullSequence => "full-sequence rule",
            TraceRule::Causal => "causal rule",
            TraceRule::Both => "full-sequence and causal rules (identical depths)",
        }
    }
}

/// Per-token recursion depths of one run on a sample text (spec §7, Figure 1 right).
///
/// The depth shown at position `t` is the compute spent to predict token `t + 1`. A run may
/// have several traces: one per sample sequence and routing rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepthTrace {
    /// Name of the run (matches [`RunSummary::name`]).
    pub run: String,
    /// The sample's tokens in order.
    pub tokens: Vec<TraceToken>,
    /// The routing rule the depths come from.
    #[serde(default)]
    pub rule: TraceRule,
    /// Index of the validation sequence (row) the sample is, when it is one.
    #[serde(default)]
    pub sequence: Option<usize>,
}

/// Mean depth of the tokens that carry one difficulty label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DifficultyStat {
    /// The difficulty label.
    pub difficulty: u8,
    /// Tokens with this label.
    pub count: u64,
    /// Mean recursion depth of those tokens.
    pub mean_depth: f64,
}

/// What the difficulty of a token is measured by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DifficultyMeasure {
    /// The corpus's own difficulty labels (the built-in corpus).
    #[default]
    Labels,
    /// The token's NLL under a reference run (the ablation's vanilla model) on the same
    /// validation tokens, in quintiles: label `q` (0..=4) holds the tokens whose rank of that
    /// NLL is in the `q`-th fifth (0 easiest, 4 hardest).
    ReferenceNll {
        /// Name of the reference run.
        reference: String,
        /// The routing rule of the depths averaged per quintile.
        rule: TraceRule,
        /// Quintile bounds of the reference NLL (nats): quintile `q` spans
        /// `edges[q]..=edges[q + 1]` (six values, the first the minimum, the last the
        /// maximum).
        edges: Vec<f64>,
    },
}

/// Correlation over tokens between recursion depth and the reference NLL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthCorrelation {
    /// The routing rule of the depths.
    pub rule: TraceRule,
    /// Tokens correlated.
    pub tokens: u64,
    /// Pearson correlation (`None` when depth or NLL is constant).
    #[serde(default, with = "opt_float")]
    pub pearson: Option<f64>,
    /// Spearman rank correlation, ties at their average rank (`None` when constant).
    #[serde(default, with = "opt_float")]
    pub spearman: Option<f64>,
}

/// Mean recursion depth per difficulty label for one run (spec §7: depth follows next-token
/// predictability).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthByDifficulty {
    /// Name of the run.
    pub run: String,
    /// One entry per label present in the trace, in ascending label order.
    pub by_label: Vec<DifficultyStat>,
    /// Tokens of the trace without a difficulty label.
    pub unlabelled: u64,
    /// What the labels are: the corpus's labels or quintiles of a reference run's NLL.
    #[serde(default)]
    pub measure: DifficultyMeasure,
    /// Correlations between depth and the reference NLL, one per routing rule (only with
    /// [`DifficultyMeasure::ReferenceNll`]).
    #[serde(default)]
    pub correlations: Vec<DepthCorrelation>,
}

impl DepthByDifficulty {
    /// Aggregates one trace: the mean depth and the count of tokens for every label present.
    ///
    /// # Examples
    ///
    /// ```
    /// use mor_models::report::{DepthByDifficulty, DepthTrace, TraceToken};
    /// let tok = |depth, difficulty| TraceToken { text: "a".into(), depth, difficulty };
    /// let trace = DepthTrace { run: "r".into(), tokens: vec![tok(1, Some(0)), tok(3, Some(2)), tok(2, Some(2)), tok(1, None)], ..Default::default() };
    /// let d = DepthByDifficulty::from_trace(&trace);
    /// assert_eq!(d.by_label.len(), 2);
    /// assert_eq!((d.by_label[1].difficulty, d.by_label[1].count, d.by_label[1].mean_depth), (2, 2, 2.5));
    /// assert_eq!(d.unlabelled, 1);
    /// ```
    pub fn from_trace(trace: &DepthTrace) -> Self {
        let mut acc: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
        let mut unlabelled = 0u64;
        for tok in &trace.tokens {
            match tok.difficulty {
                Some(label) => {
                    let entry = acc.entry(label).or_insert((0, 0));
                    entry.0 += 1;
                    entry.1 += u64::from(tok.depth);
                }
                None => unlabelled += 1,
            }
        }
        let by_label = acc
            .into_iter()
            .map(|(difficulty, (count, depth_sum))| DifficultyStat {
                difficulty,
                count,
                mean_depth: depth_sum as f64 / count as f64,
            })
            .collect();
        Self {
            run: trace.run.clone(),
            by_label,
            unlabelled,
            measure: DifficultyMeasure::Labels,
            correlations: Vec::new(),
        }
    }

    /// Builds the entry from per-label means as evaluation reports them (index = label,
    /// `(mean depth, tokens)`); labels without tokens are left out.
    ///
    /// # Examples
    ///
    /// ```
    /// use mor_models::report::DepthByDifficulty;
    /// let d = DepthByDifficulty::from_means("r", &[(1.5, 10), (0.0, 0), (2.5, 4)]);
    /// assert_eq!(d.by_label.len(), 2);
    /// assert_eq!((d.by_label[1].difficulty, d.by_label[1].count), (2, 4));
    /// ```
    pub fn from_means(run: &str, means: &[(f64, u64)]) -> Self {
        let by_label = means
            .iter()
            .enumerate()
            .filter(|(_, &(_, count))| count > 0)
            .map(|(label, &(mean_depth, count))| DifficultyStat {
                difficulty: u8::try_from(label).unwrap_or(u8::MAX),
                count,
                mean_depth,
            })
            .collect();
        Self {
            run: run.to_string(),
            by_label,
            unlabelled: 0,
            measure: DifficultyMeasure::Labels,
            correlations: Vec::new(),
        }
    }

    /// Mean depth for `label`, if the trace had tokens with it.
    pub fn mean_depth(&self, label: u8) -> Option<f64> {
        self.by_label
            .iter()
            .find(|s| s.difficulty == label)
            .map(|s| s.mean_depth)
    }
}

/// Depth per difficulty label of each run whose traces carry labels: one entry per run, in
/// the order runs first appear, over all of the run's sample sequences under one rule — the
/// full-sequence rule where the run has such traces (as the validation-split table uses),
/// otherwise the causal rule.
pub fn depth_by_difficulty(traces: &[DepthTrace]) -> Vec<DepthByDifficulty> {
    let mut runs: Vec<&str> = Vec::new();
    for t in traces {
        if !runs.contains(&t.run.as_str()) {
            runs.push(&t.run);
        }
    }
    runs.into_iter()
        .filter_map(|run| {
            let mine: Vec<&DepthTrace> = traces.iter().filter(|t| t.run == run).collect();
            let full = mine.iter().any(|t| t.rule != TraceRule::Causal);
            let tokens = mine
                .iter()
                .filter(|t| (t.rule != TraceRule::Causal) == full)
                .flat_map(|t| t.tokens.iter().cloned())
                .collect();
            let merged = DepthTrace {
                run: run.to_string(),
                tokens,
                ..Default::default()
            };
            let d = DepthByDifficulty::from_trace(&merged);
            (!d.by_label.is_empty()).then_some(d)
        })
        .collect()
}

/// Everything a report is written from, as stored in `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportData {
    /// One summary per run, in table order.
    pub runs: Vec<RunSummary>,
    /// Training curves.
    pub curves: Vec<Curve>,
    /// Depth traces.
    pub traces: Vec<DepthTrace>,
    /// Depth per difficulty label, derived from `traces`.
    #[serde(default)]
    pub depth_by_difficulty: Vec<DepthByDifficulty>,
}

/// Serde for an `f64` that may be non-finite: finite values are JSON numbers; `NaN`, `inf`
/// and `-inf` are the strings `"NaN"`, `"inf"` and `"-inf"`; `null` reads back as `NaN`.
mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Text(String),
        Null(()),
    }

    pub(super) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_repr(Repr::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    fn from_repr(r: Repr) -> Result<f64, String> {
        match r {
            Repr::Num(v) => Ok(v),
            Repr::Null(()) => Ok(f64::NAN),
            Repr::Text(t) => match t.as_str() {
                "NaN" | "nan" => Ok(f64::NAN),
                "inf" | "+inf" | "Infinity" => Ok(f64::INFINITY),
                "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
                other => Err(format!(
                    "expected a number, \"NaN\", \"inf\" or \"-inf\", got {other:?}"
                )),
            },
        }
    }

    /// Reads an optional value: `null` or a missing field is `None`.
    pub(super) fn deserialize_opt<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<f64>, D::Error> {
        match Option::<Repr>::deserialize(d)? {
            None | Some(Repr::Null(())) => Ok(None),
            Some(r) => from_repr(r).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Serde for an `Option<f64>` that may hold a non-finite value (see `float`).
mod opt_float {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => super::float::serialize(x, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        super::float::deserialize_opt(d)
    }
}
