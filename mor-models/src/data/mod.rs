//! The data pipeline: corpus readers, the built-in corpus, tokenization, packing into rows,
//! the validation split, deterministic shuffling and a resumable cursor (spec §1.2).
//!
//! # Packing (spec §1.2)
//! Each document is tokenized, the EOS id is appended (no BOS), and the documents of a split
//! are concatenated into one stream. Rows are windows of `seq_len + 1` tokens taken with a
//! stride of `seq_len`: row `r` is `stream[r·T .. r·T + T + 1]`, its inputs are the first `T`
//! tokens and its targets the last `T` (the inputs shifted by one). So every input position
//! has a target, every stream token after the first is a target exactly once, and the loss
//! is the mean over `b·T` predicted tokens. (The reference code instead uses rows of `T`
//! tokens with labels = inputs and the shift inside the loss, predicting `T − 1` tokens per
//! row and dividing by `T`; spec §1.2 and PITFALLS.md.) The tail of a split that does not
//! fill a row is dropped and reported in [`DataStats`].
//!
//! # Document masking
//! With `doc_masking`, a batch carries a row-local document id per input position, starting
//! at 0 in each row and increasing right after every appended EOS, so attention can be
//! restricted to equal ids. The paper does not mask (spec §1.2, §8 item 7), hence the
//! default `false`.
//!
//! # Validation and shuffling
//! The validation split holds out whole documents: `round(val_fraction · n)` documents (at
//! least one when `val_fraction > 0`) chosen by a shuffle seeded with `seed`. Training rows
//! are visited in a permutation drawn per epoch from the [`DataCursor`]'s RNG (identity when
//! `shuffle = false`); an epoch yields `floor(rows / b)` batches and a new epoch reshuffles.
//! The cursor is serialisable, so a checkpoint resumes at the exact batch.
//!
//! # Memory
//! Preparing a corpus needs a small multiple of its size, whatever its line lengths: the
//! readers hold a file once (plus its documents), long texts are tokenized and a BPE trained
//! in pieces of [`crate::tokenizer::CHUNK_BYTES`] cut where the pre-tokenizer cuts anyway (the
//! tokens are those of the whole text), each text is freed once tokenized, and packing moves or
//! copies the tokens once. The packed splits keep two `u32` per token (id and byte count).
//!
//! # Bits per byte
//! Every token carries the number of UTF-8 bytes of text it stands for (EOS: 0), computed
//! from the tokenizer's offsets so the counts of a document sum to its byte length.
//! [`Batch::bytes`] is the sum over the batch's targets, so `Σ NLL / ln 2 / Σ bytes` over the
//! validation batches is bits per byte; [`DataStats::val_bytes`] is the byte length of the
//! whole validation text.

mod error;

pub mod builtin;
pub mod readers;
pub mod tasks;

pub use builtin::{
    builtin_doc, builtin_docs, builtin_mc_tasks, label_tokens, BuiltinDoc, Span, SpanKind,
    BUILTIN_TASKS, COMPUTED, CONTENT, EASY,
};
pub use error::{Error, Result};
pub use tasks::{load_mc_tasks, McTask, McTaskSet};

use crate::tokenizer::{concat, Tokenizer, TokenizerKind, BYTE_VOCAB_SIZE, TOKENIZER_FILE};
use mor_core::rng::Rng;
use rayon::prelude::*;
use readers::FileKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// File extensions the readers understand (see [`readers`]).
pub const SUPPORTED_EXTENSIONS: [&str; 6] = [".txt", ".jsonl", ".parquet", ".u16", ".u32", ".bin"];

/// Difficulty label of the appended EOS (where a document ends is a free choice of the
/// generator, so it counts as content).
pub const EOS_LABEL: u8 = CONTENT;

/// Data settings. `source`, `tokenizer`, `text_column`, `doc_masking`, `shuffle`,
/// `val_fraction` and `builtin_docs` mirror the `[data]` section of a run config; `seq_len`,
/// `vocab_size` and `seed` come from the model and the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `"builtin"` or a path to a file or folder.
    pub source: String,
    /// `"auto"`, `"byte"`, `"bpe"` or a path to a `tokenizer.json` (or a folder holding one).
    ///
    /// - `auto`: a `tokenizer.json` already in the run folder (resume), else one next to the
    ///   source, else a BPE trained on the training split when `vocab_size > 257`, else the
    ///   byte-level tokenizer;
    /// - `bpe`: the run folder's `tokenizer.json` when present, else a BPE trained on the
    ///   training split to at most `vocab_size` entries;
    /// - `byte`: 256 bytes plus EOS.
    pub tokenizer: String,
    /// The text field of JSONL files and the text column of Parquet files.
    pub text_column: String,
    /// Give each batch row-local document ids for attention masking.
    pub doc_masking: bool,
    /// Shuffle training rows each epoch.
    pub shuffle: bool,
    /// Fraction of documents held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// Number of generated documents when `source = "builtin"`.
    pub builtin_docs: usize,
    /// Tokens per row of inputs (`T`); rows hold `T + 1` tokens.
    pub seq_len: usize,
    /// The model's vocabulary size: the tokenizer may not produce an id at or above it, and a
    /// trained BPE gets at most this many entries.
    pub vocab_size: usize,
    /// Seed of the generated corpus, the validation split and the shuffles.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: "builtin".into(),
            tokenizer: "auto".into(),
            text_column: "text".into(),
            doc_masking: false,
            shuffle: true,
            val_fraction: 0.05,
            builtin_docs: 2000,
            seq_len: 256,
            vocab_size: 2048,
            seed: 0,
        }
    }
}

/// Where the documents come from, parsed from [`DataConfig::source`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The generated corpus.
    Builtin,
    /// A file or folder.
    Path(PathBuf),
}

/// The tokenizer choice, parsed from [`DataConfig::tokenizer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerChoice {
    /// See [`DataConfig::tokenizer`].
    Auto,
    /// The byte-level tokenizer.
    Byte,
    /// A BPE trained on the training split.
    Bpe,
    /// A `tokenizer.json` file.
    File(PathBuf),
}

impl DataConfig {
    /// The parsed source.
    pub fn source(&self) -> Source {
        match self.source.as_str() {
            "builtin" => Source::Builtin,
            p => Source::Path(PathBuf::from(p)),
        }
    }

    /// The parsed tokenizer choice.
    pub fn tokenizer_choice(&self) -> TokenizerChoice {
        match self.tokenizer.as_str() {
            "auto" => TokenizerChoice::Auto,
            "byte" => TokenizerChoice::Byte,
            "bpe" => TokenizerChoice::Bpe,
            p => TokenizerChoice::File(PathBuf::from(p)),
        }
    }

    /// Checks the settings that do not need the corpus.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, msg: String| Err(Error::Config { field, msg });
        if self.source.trim().is_empty() {
            return bad("source", "must be \"builtin\" or a path".into());
        }
        if self.tokenizer.trim().is_empty() {
            return bad(
                "tokenizer",
                "must be \"auto\", \"byte\", \"bpe\" or a path to tokenizer.json".into(),
            );
        }
        if self.text_column.is_empty() {
            return bad("text_column", "must not be empty".into());
        }
        if !(self.val_fraction.is_finite() && (0.0..1.0).contains(&self.val_fraction)) {
            return bad(
                "val_fraction",
                format!("must be in [0, 1), got {}", self.val_fraction),
            );
        }
        if self.source() == Source::Builtin && self.builtin_docs == 0 {
            return bad("builtin_docs", "must be at least 1".into());
        }
        if self.seq_len == 0 {
            return bad("seq_len", "must be at least 1".into());
        }
        if self.vocab_size == 0 {
            return bad("vocab_size", "must be at least 1".into());
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// Tokenized documents and packed splits.

/// One tokenized document (without EOS).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedDoc {
    /// Token ids.
    pub ids: Vec<u32>,
    /// UTF-8 bytes of text behind each token (sums to the document's byte length).
    pub bytes: Vec<u32>,
    /// Difficulty label of each token, for labelled corpora.
    pub labels: Option<Vec<u8>>,
}

impl TokenizedDoc {
    /// Tokenizes `text`; `labels` (one per byte) become token labels by [`label_tokens`].
    ///
    /// # Errors
    /// When the tokenizer fails, or `labels` does not have one entry per byte.
    pub fn from_text(tok: &Tokenizer, text: &str, labels: Option<&[u8]>) -> Result<Self> {
        if let Some(l) = labels.filter(|l| l.len() != text.len()) {
            return Err(Error::TooSmall(format!(
                "a labelled document has {} labels for {} bytes",
                l.len(),
                text.len()
            )));
        }
        if tok.kind() == TokenizerKind::Byte {
            // One token per byte: each counts one byte and carries that byte's label.
            return Ok(TokenizedDoc {
                ids: text.bytes().map(u32::from).collect(),
                bytes: vec![1; text.len()],
                labels: labels.map(<[u8]>::to_vec),
            });
        }
        // Piece by piece, keeping only ids, byte counts and labels of each piece (the offsets
        // are three times their size): memory stays a small multiple of the text.
        let parts = tok.encode_pieces(text, |start, piece, enc| {
            let bytes = enc.byte_counts(piece.len());
            let labels =
                labels.map(|l| label_tokens(piece, &l[start..start + piece.len()], &enc.offsets));
            Ok((enc.ids, bytes, labels))
        })?;
        let mut ids = Vec::with_capacity(parts.len());
        let mut bytes = Vec::with_capacity(parts.len());
        let mut token_labels = Vec::with_capacity(parts.len());
        for (i, b, l) in parts {
            ids.push(i);
            bytes.push(b);
            token_labels.extend(l);
        }
        Ok(TokenizedDoc {
            ids: concat(ids),
            bytes: concat(bytes),
            labels: labels.map(|_| concat(token_labels)),
        })
    }
}

/// Checks `seq_len` and that every document has one byte count (and label) per id.
fn check_docs(docs: &[TokenizedDoc], seq_len: usize) -> Result<()> {
    if seq_len == 0 {
        return Err(Error::Config {
            field: "seq_len",
            msg: "must be at least 1".into(),
        });
    }
    for (i, d) in docs.iter().enumerate() {
        if d.bytes.len() != d.ids.len() || d.labels.as_ref().is_some_and(|l| l.len() != d.ids.len())
        {
            return Err(Error::TooSmall(format!(
                "document {i}: {} ids, {} byte counts, {:?} labels",
                d.ids.len(),
                d.bytes.len(),
                d.labels.as_ref().map(Vec::len)
            )));
        }
    }
    Ok(())
}

/// Builds the stream of a [`PackedSplit`] document by document, in vectors sized up front.
struct Packer {
    ids: Vec<u32>,
    bytes: Vec<u32>,
    labels: Option<Vec<u8>>,
    doc_ends: Vec<usize>,
    text_bytes: u64,
}

impl Packer {
    /// A packer with room for `tokens` stream tokens (EOS included) of `docs` documents;
    /// labels are kept when `with_labels`.
    fn with_capacity(tokens: usize, docs: usize, with_labels: bool) -> Self {
        Packer {
            ids: Vec::with_capacity(tokens),
            bytes: Vec::with_capacity(tokens),
            labels: with_labels.then(|| Vec::with_capacity(tokens)),
            doc_ends: Vec::with_capacity(docs),
            text_bytes: 0,
        }
    }

    /// A packer sized for `docs` (labels kept only when every document has them).
    fn new(docs: &[TokenizedDoc]) -> Self {
        let total: usize = docs.iter().map(|d| d.ids.len() + 1).sum();
        let with_labels = !docs.is_empty() && docs.iter().all(|d| d.labels.is_some());
        Packer::with_capacity(total, docs.len(), with_labels)
    }

    /// Appends one document and its EOS.
    fn push(&mut self, ids: &[u32], bytes: &[u32], labels: Option<&[u8]>, eos_id: u32) {
        self.ids.extend_from_slice(ids);
        self.bytes.extend_from_slice(bytes);
        if let (Some(all), Some(l)) = (self.labels.as_mut(), labels) {
            all.extend_from_slice(l);
        }
        self.close_doc(eos_id);
    }

    /// Appends one document of the byte-level tokenizer (one token per byte, each counting
    /// one byte and carrying that byte's label) and its EOS, as
    /// [`TokenizedDoc::from_text`] with the byte-level tokenizer would give it.
    fn push_bytes(&mut self, text: &str, labels: Option<&[u8]>, eos_id: u32) {
        self.ids.extend(text.bytes().map(u32::from));
        self.bytes.extend(std::iter::repeat_n(1, text.len()));
        if let (Some(all), Some(l)) = (self.labels.as_mut(), labels) {
            all.extend_from_slice(l);
        }
        self.close_doc(eos_id);
    }

    /// Appends EOS after the document whose tokens were just added.
    fn close_doc(&mut self, eos_id: u32) {
        let start = self.doc_ends.last().map_or(0, |&e| e + 1);
        self.text_bytes += self.bytes[start..].iter().map(|&b| b as u64).sum::<u64>();
        if let Some(all) = self.labels.as_mut() {
            all.push(EOS_LABEL);
        }
        self.ids.push(eos_id);
        self.bytes.push(0);
        self.doc_ends.push(self.ids.len() - 1);
    }

    fn finish(self, seq_len: usize) -> PackedSplit {
        let rows = if self.ids.len() > seq_len {
            (self.ids.len() - 1) / seq_len
        } else {
            0
        };
        PackedSplit {
            ids: self.ids,
            bytes: self.bytes,
            labels: self.labels,
            doc_ends: self.doc_ends,
            seq_len,
            rows,
            text_bytes: self.text_bytes,
        }
    }
}

/// One split (train or validation) packed into a token stream and cut into rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSplit {
    ids: Vec<u32>,
    bytes: Vec<u32>,
    labels: Option<Vec<u8>>,
    doc_ends: Vec<usize>,
    seq_len: usize,
    rows: usize,
    text_bytes: u64,
}

impl PackedSplit {
    /// Concatenates `docs`, each followed by `eos_id`, and cuts the stream into rows of
    /// `seq_len + 1` tokens with stride `seq_len` (see the module docs). Labels are kept only
    /// when every document has them.
    ///
    /// # Errors
    /// When `seq_len` is 0 or a document's byte or label count does not match its ids.
    pub fn pack(docs: &[TokenizedDoc], eos_id: u32, seq_len: usize) -> Result<Self> {
        check_docs(docs, seq_len)?;
        let mut p = Packer::new(docs);
        for d in docs {
            p.push(&d.ids, &d.bytes, d.labels.as_deref(), eos_id);
        }
        Ok(p.finish(seq_len))
    }

    /// [`PackedSplit::pack`] of documents it may consume: the result is the same, but a
    /// single document's vectors become the stream without a copy, and each document is freed
    /// once copied, so packing needs at most twice the tokens' memory (once for one document).
    ///
    /// # Errors
    /// As [`PackedSplit::pack`].
    pub fn pack_owned(docs: Vec<TokenizedDoc>, eos_id: u32, seq_len: usize) -> Result<Self> {
        check_docs(&docs, seq_len)?;
        if docs.len() == 1 {
            let d = docs.into_iter().next().unwrap_or_default();
            let mut p = Packer {
                text_bytes: 0,
                ids: d.ids,
                bytes: d.bytes,
                labels: d.labels,
                doc_ends: Vec::with_capacity(1),
            };
            p.ids.reserve_exact(1);
            p.bytes.reserve_exact(1);
            if let Some(l) = p.labels.as_mut() {
                l.reserve_exact(1);
            }
            p.close_doc(eos_id);
            return Ok(p.finish(seq_len));
        }
        let mut p = Packer::new(&docs);
        for d in docs {
            p.push(&d.ids, &d.bytes, d.labels.as_deref(), eos_id);
        }
        Ok(p.finish(seq_len))
    }

    /// The whole token stream (documents with EOS appended, in order).
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }

    /// UTF-8 bytes behind each token of [`PackedSplit::tokens`].
    pub fn token_bytes(&self) -> &[u32] {
        &self.bytes
    }

    /// Difficulty label of each token of [`PackedSplit::tokens`], for labelled corpora.
    pub fn token_labels(&self) -> Option<&[u8]> {
        self.labels.as_deref()
    }

    /// Positions of the appended EOS tokens in the stream, ascending.
    pub fn doc_ends(&self) -> &[usize] {
        &self.doc_ends
    }

    /// Number of documents.
    pub fn num_documents(&self) -> usize {
        self.doc_ends.len()
    }

    /// Tokens per row of inputs (`T`).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// UTF-8 bytes of the split's text.
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    /// Stream tokens no row covers (the tail after the last full row).
    pub fn dropped_tokens(&self) -> usize {
        if self.rows == 0 {
            self.ids.len()
        } else {
            self.ids.len() - (self.rows * self.seq_len + 1)
        }
    }

    /// The `seq_len + 1` tokens of row `r`, or `None` past the last row.
    pub fn row(&self, r: usize) -> Option<&[u32]> {
        (r < self.rows).then(|| &self.ids[r * self.seq_len..r * self.seq_len + self.seq_len + 1])
    }

    /// A batch made of the given rows, in order; `doc_masking` adds row-local document ids.
    ///
    /// # Errors
    /// When a row index is out of range.
    pub fn batch(&self, rows: &[usize], doc_masking: bool) -> Result<Batch> {
        let t = self.seq_len;
        let b = rows.len();
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        let mut difficulty = self.labels.as_ref().map(|_| Vec::with_capacity(b * t));
        let mut doc_ids = doc_masking.then(|| Vec::with_capacity(b * t));
        let mut bytes = 0u64;
        for &r in rows {
            if r >= self.rows {
                return Err(Error::TooSmall(format!(
                    "row {r} is out of range ({} rows)",
                    self.rows
                )));
            }
            let s = r * t;
            inputs.extend_from_slice(&self.ids[s..s + t]);
            targets.extend_from_slice(&self.ids[s + 1..s + t + 1]);
            bytes += self.bytes[s + 1..s + t + 1]
                .iter()
                .map(|&x| x as u64)
                .sum::<u64>();
            if let (Some(d), Some(l)) = (difficulty.as_mut(), self.labels.as_ref()) {
                d.extend_from_slice(&l[s + 1..s + t + 1]);
            }
            if let Some(ids) = doc_ids.as_mut() {
                let mut k = self.doc_ends.partition_point(|&e| e < s);
                let mut id = 0u32;
                for p in s..s + t {
                    ids.push(id);
                    if self.doc_ends.get(k) == Some(&p) {
                        id += 1;
                        k += 1;
                    }
                }
            }
        }
        Ok(Batch {
            inputs,
            targets,
            difficulty,
            doc_ids,
            bytes,
            b,
            t,
        })
    }
}

/// A batch of rows: `inputs[i]` predicts `targets[i]`, both row-major `[b, t]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input ids `[b·t]`.
    pub inputs: Vec<u32>,
    /// Target ids `[b·t]` (the inputs shifted by one within the row's `t + 1` tokens).
    pub targets: Vec<u32>,
    /// Difficulty label of each target token `[b·t]` (built-in corpus only).
    pub difficulty: Option<Vec<u8>>,
    /// Row-local document id of each input position `[b·t]` (with `doc_masking` only):
    /// 0 at the start of each row, +1 right after each EOS.
    pub doc_ids: Option<Vec<u32>>,
    /// UTF-8 bytes of the target text (for bits per byte).
    pub bytes: u64,
    /// Rows.
    pub b: usize,
    /// Tokens per row.
    pub t: usize,
}

// ----------------------------------------------------------------------------------------
// Cursor and iterators.

/// The position of the training iterator: the epoch, the number of rows of the epoch's
/// permutation already served, and the RNG state the epoch's permutation is drawn from.
/// Stored in checkpoints; restoring it resumes the identical batch sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Rows of this epoch's permutation already served.
    pub index: u64,
    /// RNG state before this epoch's permutation was drawn.
    pub rng: Rng,
}

impl DataCursor {
    /// The start of training for `seed`.
    pub fn new(seed: u64) -> Self {
        DataCursor {
            epoch: 0,
            index: 0,
            rng: Rng::derive(seed, "data/shuffle"),
        }
    }
}

/// The permutation of `n` rows for an epoch drawn from `rng`, and the RNG of the next epoch.
fn epoch_permutation(n: usize, rng: &Rng, shuffle: bool) -> (Vec<u32>, Rng) {
    let mut r = rng.clone();
    let mut perm: Vec<u32> = (0..n as u32).collect();
    if shuffle {
        r.shuffle(&mut perm);
    }
    (perm, r)
}

/// The infinite iterator over training batches; each epoch reshuffles.
#[derive(Debug, Clone)]
pub struct TrainBatches {
    split: Arc<PackedSplit>,
    batch_size: usize,
    doc_masking: bool,
    shuffle: bool,
    cursor: DataCursor,
    perm: Vec<u32>,
    next_rng: Rng,
}

impl TrainBatches {
    /// The position of the next batch (save it in a checkpoint).
    pub fn cursor(&self) -> &DataCursor {
        &self.cursor
    }

    /// Moves to a saved position.
    ///
    /// # Errors
    /// When the cursor's index is past the number of training rows.
    pub fn restore(&mut self, cursor: DataCursor) -> Result<()> {
        if cursor.index > self.split.num_rows() as u64 {
            return Err(Error::Cursor(format!(
                "index {} is past the {} training rows of this dataset",
                cursor.index,
                self.split.num_rows()
            )));
        }
        let (perm, next_rng) = epoch_permutation(self.split.num_rows(), &cursor.rng, self.shuffle);
        self.perm = perm;
        self.next_rng = next_rng;
        self.cursor = cursor;
        Ok(())
    }

    /// The next batch of `rows` rows (the iterator uses the batch size it was made with).
    ///
    /// # Errors
    /// When `rows` is 0 or larger than the number of training rows.
    pub fn next_batch(&mut self, rows: usize) -> Result<Batch> {
        let n = self.split.num_rows();
        if rows == 0 || rows > n {
            return Err(Error::TooSmall(format!(
                "a batch of {rows} rows does not fit the {n} training rows"
            )));
        }
        if self.cursor.index as usize + rows > n {
            let rng = std::mem::replace(&mut self.next_rng, Rng::new(0));
            let (perm, next_rng) = epoch_permutation(n, &rng, self.shuffle);
            self.perm = perm;
            self.next_rng = next_rng;
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
                rng,
            };
        }
        let i = self.cursor.index as usize;
        let picked: Vec<usize> = self.perm[i..i + rows].iter().map(|&r| r as usize).collect();
        self.cursor.index += rows as u64;
        self.split.batch(&picked, self.doc_masking)
    }
}

impl Iterator for TrainBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.next_batch(self.batch_size).ok()
    }
}

/// The finite iterator over validation batches, rows in order; the last batch may have fewer
/// rows.
#[derive(Debug, Clone)]
pub struct ValBatches {
    split: Arc<PackedSplit>,
    batch_size: usize,
    doc_masking: bool,
    next_row: usize,
}

impl Iterator for ValBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let n = self.split.num_rows();
        if self.next_row >= n {
            return None;
        }
        let end = (self.next_row + self.batch_size).min(n);
        let rows: Vec<usize> = (self.next_row..end).collect();
        self.next_row = end;
        self.split.batch(&rows, self.doc_masking).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self
            .split
            .num_rows()
            .saturating_sub(self.next_row)
            .div_ceil(self.batch_size);
        (left, Some(left))
    }
}

// ----------------------------------------------------------------------------------------
// The dataset.

/// Counts reported by [`Dataset::prepare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Non-empty documents in the corpus.
    pub documents: usize,
    /// Documents in the training split.
    pub train_documents: usize,
    /// Documents in the validation split.
    pub val_documents: usize,
    /// Tokens of the training stream (EOS included).
    pub train_tokens: usize,
    /// Tokens of the validation stream (EOS included).
    pub val_tokens: usize,
    /// UTF-8 bytes of the training text.
    pub train_bytes: u64,
    /// UTF-8 bytes of the validation text.
    pub val_bytes: u64,
    /// Training rows of `seq_len + 1` tokens.
    pub train_rows: usize,
    /// Validation rows.
    pub val_rows: usize,
    /// Training tokens after the last full row (not served).
    pub dropped_train_tokens: usize,
    /// Validation tokens after the last full row (not evaluated).
    pub dropped_val_tokens: usize,
    /// The tokenizer's kind (`byte` or `hf`).
    pub tokenizer: String,
    /// The tokenizer's vocabulary size.
    pub tokenizer_vocab: usize,
    /// Seconds spent tokenizing (training a BPE excluded).
    pub tokenize_secs: f64,
}

impl std::fmt::Display for DataStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} documents ({} train / {} val); tokens {} train / {} val; bytes {} train / {} val; \
             rows {} train / {} val; tokenizer {} (vocab {}), tokenized in {:.2}s",
            self.documents,
            self.train_documents,
            self.val_documents,
            self.train_tokens,
            self.val_tokens,
            self.train_bytes,
            self.val_bytes,
            self.train_rows,
            self.val_rows,
            self.tokenizer,
            self.tokenizer_vocab,
            self.tokenize_secs
        )
    }
}

/// The size of a prepared corpus and its tokenizer, for reports (printed at the start of a run
/// and stored with its results). Taken from the packed splits, without reading the data
/// again: see [`Dataset::corpus_stats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusStats {
    /// The source as configured (`builtin` or a path).
    pub source: String,
    /// Non-empty documents of the corpus (training plus validation).
    pub documents: usize,
    /// Documents of the training split.
    pub train_documents: usize,
    /// Documents of the validation split.
    pub val_documents: usize,
    /// Tokens of the training stream, one EOS per document included.
    pub train_tokens: usize,
    /// Tokens of the validation stream, one EOS per document included.
    pub val_tokens: usize,
    /// UTF-8 bytes of the training text.
    pub train_bytes: u64,
    /// UTF-8 bytes of the validation text.
    pub val_bytes: u64,
    /// The tokenizer's kind: `byte` (256 bytes + EOS) or `hf` (a Hugging Face tokenizer, e.g.
    /// the BPE trained on the corpus).
    pub tokenizer: String,
    /// The tokenizer as configured (`auto`, `byte`, `bpe` or a path).
    pub tokenizer_choice: String,
    /// Ids the tokenizer can produce.
    pub tokenizer_vocab: usize,
    /// The model's vocabulary size (at least `tokenizer_vocab`).
    pub vocab_size: usize,
}

impl std::fmt::Display for CorpusStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "corpus {}: {} documents ({} train / {} val), tokens {} train / {} val, \
             bytes {} train / {} val; tokenizer {} ({}): {} ids, model vocabulary {}",
            self.source,
            self.documents,
            self.train_documents,
            self.val_documents,
            self.train_tokens,
            self.val_tokens,
            self.train_bytes,
            self.val_bytes,
            self.tokenizer,
            self.tokenizer_choice,
            self.tokenizer_vocab,
            self.vocab_size
        )
    }
}

/// A prepared corpus: the tokenizer, the packed training and validation splits, and counts.
#[derive(Debug, Clone)]
pub struct Dataset {
    cfg: DataConfig,
    tokenizer: Tokenizer,
    train: Arc<PackedSplit>,
    val: Arc<PackedSplit>,
    stats: DataStats,
}

/// Documents held out for validation: `round(val_fraction · n)` of them (at least 1 when
/// `val_fraction > 0`, at most `n − 1`), chosen by a shuffle seeded with `seed`. Returns the
/// sorted training and validation indices.
///
/// # Errors
/// When `val_fraction > 0` and there are fewer than two documents.
pub fn split_documents(n: usize, val_fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if val_fraction <= 0.0 {
        return Ok(((0..n).collect(), Vec::new()));
    }
    if n < 2 {
        return Err(Error::TooSmall(format!(
            "val_fraction = {val_fraction} needs at least 2 documents to hold one out, the corpus has {n}"
        )));
    }
    let n_val = ((val_fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "data/val_split").shuffle(&mut idx);
    let mut val = idx[..n_val].to_vec();
    let mut train = idx[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((train, val))
}

/// A raw document before tokenization.
struct TextDoc {
    text: String,
    labels: Option<Vec<u8>>,
}

impl Dataset {
    /// Loads or generates the documents, gets or trains the tokenizer (saving it as
    /// `out_dir/tokenizer.json` when `out_dir` is given), tokenizes in parallel, splits by
    /// documents and packs both splits.
    ///
    /// # Errors
    /// Bad settings, unreadable or malformed sources, an empty corpus, a tokenizer larger
    /// than `vocab_size`, or splits too small for one row of `seq_len + 1` tokens.
    ///
    /// # Examples
    /// ```
    /// use mor_models::data::{DataConfig, Dataset};
    ///
    /// let cfg = DataConfig { tokenizer: "byte".into(), builtin_docs: 20, seq_len: 32, vocab_size: 257, ..DataConfig::default() };
    /// let data = Dataset::prepare(&cfg, None).unwrap();
    /// let batch = data.train_batches(4, None).unwrap().next().unwrap();
    /// assert_eq!(batch.inputs.len(), 4 * 32);
    /// assert!(batch.difficulty.is_some());
    /// ```
    pub fn prepare(cfg: &DataConfig, out_dir: Option<&Path>) -> Result<Dataset> {
        cfg.validate()?;
        let source = cfg.source();
        let (tokenizer, train, val, tokenize_secs) = match &source {
            Source::Builtin => {
                let docs = builtin_docs(cfg.seed, cfg.builtin_docs)
                    .into_iter()
                    .map(|d| TextDoc {
                        text: d.text,
                        labels: Some(d.labels),
                    })
                    .collect();
                Self::tokenize_text(cfg, docs, out_dir, None)?
            }
            Source::Path(path) => {
                let files = readers::list_files(path)?;
                if files[0].1.is_tokens() {
                    Self::read_tokens(cfg, path, &files, out_dir)?
                } else {
                    let per_file: Vec<Vec<String>> = files
                        .par_iter()
                        .map(|(p, k)| readers::read_text_file(p, *k, &cfg.text_column))
                        .collect::<Result<_>>()?;
                    let docs = per_file
                        .into_iter()
                        .flatten()
                        .map(|text| TextDoc { text, labels: None })
                        .collect();
                    Self::tokenize_text(cfg, docs, out_dir, Some(path))?
                }
            }
        };
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Config {
                field: "tokenizer",
                msg: format!(
                    "the tokenizer has {} ids but the model's vocab_size is {}",
                    tokenizer.vocab_size(),
                    cfg.vocab_size
                ),
            });
        }
        let need = cfg.seq_len + 1;
        if train.num_rows() == 0 {
            return Err(Error::TooSmall(format!(
                "the training split has {} tokens, fewer than seq_len + 1 = {need}; use more data or a shorter seq_len",
                train.tokens().len()
            )));
        }
        if val.num_documents() > 0 && val.num_rows() == 0 {
            return Err(Error::TooSmall(format!(
                "the validation split has {} tokens ({} documents), fewer than seq_len + 1 = {need}; \
                 raise val_fraction (or builtin_docs) or shorten seq_len",
                val.tokens().len(),
                val.num_documents()
            )));
        }
        if let Some(dir) = out_dir {
            tokenizer.save(dir)?;
        }
        let stats = DataStats {
            documents: train.num_documents() + val.num_documents(),
            train_documents: train.num_documents(),
            val_documents: val.num_documents(),
            train_tokens: train.tokens().len(),
            val_tokens: val.tokens().len(),
            train_bytes: train.text_bytes(),
            val_bytes: val.text_bytes(),
            train_rows: train.num_rows(),
            val_rows: val.num_rows(),
            dropped_train_tokens: train.dropped_tokens(),
            dropped_val_tokens: val.dropped_tokens(),
            tokenizer: tokenizer.kind().to_string(),
            tokenizer_vocab: tokenizer.vocab_size(),
            tokenize_secs,
        };
        Ok(Dataset {
            cfg: cfg.clone(),
            tokenizer,
            train: Arc::new(train),
            val: Arc::new(val),
            stats,
        })
    }

    /// Text path: drop empty documents, split, resolve the tokenizer, tokenize and pack.
    /// Each text is freed once tokenized, long texts are tokenized piece by piece
    /// ([`TokenizedDoc::from_text`]) and the byte-level tokenizer writes straight into the
    /// stream, so memory stays a small multiple of the corpus for any line length.
    fn tokenize_text(
        cfg: &DataConfig,
        docs: Vec<TextDoc>,
        out_dir: Option<&Path>,
        source_path: Option<&Path>,
    ) -> Result<(Tokenizer, PackedSplit, PackedSplit, f64)> {
        let docs: Vec<TextDoc> = docs
            .into_iter()
            .filter(|d| !d.text.trim().is_empty())
            .collect();
        if docs.is_empty() {
            return Err(Error::EmptyCorpus {
                source_name: cfg.source.clone(),
            });
        }
        let (train_idx, val_idx) = split_documents(docs.len(), cfg.val_fraction, cfg.seed)?;
        let tokenizer = resolve_tokenizer(cfg, out_dir, source_path, false, || {
            train_idx.iter().map(|&i| docs[i].text.as_str()).collect()
        })?;
        let start = Instant::now();
        let eos = tokenizer.eos_id();
        let mut slots: Vec<Option<TextDoc>> = docs.into_iter().map(Some).collect();
        let mut pack = |idx: &[usize]| -> Result<PackedSplit> {
            let texts: Vec<TextDoc> = idx.iter().filter_map(|&i| slots[i].take()).collect();
            if tokenizer.kind() != TokenizerKind::Byte {
                let docs = texts
                    .into_par_iter()
                    .map(|d| TokenizedDoc::from_text(&tokenizer, &d.text, d.labels.as_deref()))
                    .collect::<Result<Vec<_>>>()?;
                return PackedSplit::pack_owned(docs, eos, cfg.seq_len);
            }
            if let Some(d) = texts
                .iter()
                .find(|d| d.labels.as_ref().is_some_and(|l| l.len() != d.text.len()))
            {
                return Err(Error::TooSmall(format!(
                    "a labelled document has {} labels for {} bytes",
                    d.labels.as_ref().map_or(0, Vec::len),
                    d.text.len()
                )));
            }
            let tokens = texts.iter().map(|d| d.text.len() + 1).sum();
            let with_labels = !texts.is_empty() && texts.iter().all(|d| d.labels.is_some());
            let mut p = Packer::with_capacity(tokens, texts.len(), with_labels);
            for d in texts {
                p.push_bytes(&d.text, d.labels.as_deref(), eos);
            }
            Ok(p.finish(cfg.seq_len))
        };
        let train = pack(&train_idx)?;
        let val = pack(&val_idx)?;
        Ok((tokenizer, train, val, start.elapsed().as_secs_f64()))
    }

    /// Token-file path: resolve the tokenizer (it cannot be trained), read, check ids, split
    /// and pack.
    fn read_tokens(
        cfg: &DataConfig,
        path: &Path,
        files: &[(PathBuf, FileKind)],
        out_dir: Option<&Path>,
    ) -> Result<(Tokenizer, PackedSplit, PackedSplit, f64)> {
        let tokenizer = resolve_tokenizer(cfg, out_dir, Some(path), true, Vec::new)?;
        let start = Instant::now();
        let limit = tokenizer.vocab_size().min(cfg.vocab_size) as u32;
        let eos = tokenizer.eos_id();
        let byte_lens = tokenizer.token_byte_lens();
        let mut docs = Vec::new();
        for (file, kind) in files {
            for (d, ids) in readers::read_token_file(file, *kind, eos)?
                .into_iter()
                .enumerate()
            {
                if let Some(pos) = ids.iter().position(|&id| id >= limit) {
                    return Err(Error::TokenFile {
                        path: file.clone(),
                        msg: format!(
                            "document {d}, token {pos}: id {} is not below the vocabulary size {limit}",
                            ids[pos]
                        ),
                    });
                }
                let bytes = ids
                    .iter()
                    .map(|&id| byte_lens.get(id as usize).copied().unwrap_or(0))
                    .collect();
                docs.push(TokenizedDoc {
                    ids,
                    bytes,
                    labels: None,
                });
            }
        }
        if docs.is_empty() {
            return Err(Error::EmptyCorpus {
                source_name: cfg.source.clone(),
            });
        }
        let (train_idx, val_idx) = split_documents(docs.len(), cfg.val_fraction, cfg.seed)?;
        let mut slots: Vec<Option<TokenizedDoc>> = docs.into_iter().map(Some).collect();
        let mut take = |idx: &[usize]| {
            let docs = idx
                .iter()
                .filter_map(|&i| slots[i].take())
                .collect::<Vec<_>>();
            PackedSplit::pack_owned(docs, eos, cfg.seq_len)
        };
        let train = take(&train_idx)?;
        let val = take(&val_idx)?;
        Ok((tokenizer, train, val, start.elapsed().as_secs_f64()))
    }

    /// The settings this dataset was prepared with.
    pub fn config(&self) -> &DataConfig {
        &self.cfg
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Counts of documents, tokens, bytes and rows.
    pub fn stats(&self) -> &DataStats {
        &self.stats
    }

    /// The corpus and tokenizer sizes for reports, from the packed splits (no data is read).
    ///
    /// # Examples
    /// ```
    /// use mor_models::data::{DataConfig, Dataset};
    ///
    /// let cfg = DataConfig { tokenizer: "byte".into(), builtin_docs: 20, seq_len: 32, vocab_size: 300, ..DataConfig::default() };
    /// let stats = Dataset::prepare(&cfg, None).unwrap().corpus_stats();
    /// assert_eq!(stats.documents, 20);
    /// assert_eq!((stats.tokenizer_vocab, stats.vocab_size), (257, 300));
    /// ```
    pub fn corpus_stats(&self) -> CorpusStats {
        CorpusStats {
            source: self.cfg.source.clone(),
            documents: self.train.num_documents() + self.val.num_documents(),
            train_documents: self.train.num_documents(),
            val_documents: self.val.num_documents(),
            train_tokens: self.train.tokens().len(),
            val_tokens: self.val.tokens().len(),
            train_bytes: self.train.text_bytes(),
            val_bytes: self.val.text_bytes(),
            tokenizer: self.tokenizer.kind().to_string(),
            tokenizer_choice: self.cfg.tokenizer.clone(),
            tokenizer_vocab: self.tokenizer.vocab_size(),
            vocab_size: self.cfg.vocab_size,
        }
    }

    /// The packed training split.
    pub fn train(&self) -> &PackedSplit {
        &self.train
    }

    /// The packed validation split.
    pub fn val(&self) -> &PackedSplit {
        &self.val
    }

    /// UTF-8 bytes of the validation text (for bits per byte).
    pub fn val_bytes(&self) -> u64 {
        self.val.text_bytes()
    }

    /// The cursor at the start of training.
    pub fn new_cursor(&self) -> DataCursor {
        DataCursor::new(self.cfg.seed)
    }

    /// The infinite iterator over training batches of `batch_size` rows, from `cursor` (or
    /// the start of training).
    ///
    /// # Errors
    /// When `batch_size` is 0 or larger than the number of training rows, or the cursor does
    /// not fit this dataset.
    pub fn train_batches(
        &self,
        batch_size: usize,
        cursor: Option<DataCursor>,
    ) -> Result<TrainBatches> {
        let n = self.train.num_rows();
        if batch_size == 0 || batch_size > n {
            return Err(Error::TooSmall(format!(
                "a batch of {batch_size} rows does not fit the {n} training rows ({} tokens, seq_len {})",
                self.train.tokens().len(),
                self.cfg.seq_len
            )));
        }
        let start = DataCursor::new(self.cfg.seed);
        let (perm, next_rng) = epoch_permutation(n, &start.rng, self.cfg.shuffle);
        let mut it = TrainBatches {
            split: Arc::clone(&self.train),
            batch_size,
            doc_masking: self.cfg.doc_masking,
            shuffle: self.cfg.shuffle,
            cursor: start,
            perm,
            next_rng,
        };
        if let Some(c) = cursor {
            it.restore(c)?;
        }
        Ok(it)
    }

    /// The finite iterator over validation batches of up to `batch_size` rows (empty when
    /// there is no validation split).
    ///
    /// # Errors
    /// When `batch_size` is 0.
    pub fn val_batches(&self, batch_size: usize) -> Result<ValBatches> {
        if batch_size == 0 {
            return Err(Error::TooSmall(
                "a validation batch needs at least one row".into(),
            ));
        }
        Ok(ValBatches {
            split: Arc::clone(&self.val),
            batch_size,
            doc_masking: self.cfg.doc_masking,
            next_row: 0,
        })
    }
}

/// Gets the tokenizer `cfg` asks for; `train_texts` is called only when a BPE is trained.
fn resolve_tokenizer<'a>(
    cfg: &DataConfig,
    out_dir: Option<&Path>,
    source_path: Option<&Path>,
    pre_tokenized: bool,
    train_texts: impl FnOnce() -> Vec<&'a str>,
) -> Result<Tokenizer> {
    let saved = out_dir
        .map(|d| d.join(TOKENIZER_FILE))
        .filter(|p| p.is_file());
    let next_to_source = source_path.and_then(|p| {
        let dir = if p.is_dir() { p } else { p.parent()? };
        Some(dir.join(TOKENIZER_FILE)).filter(|f| f.is_file())
    });
    let cannot_train = || Error::Config {
        field: "tokenizer",
        msg:
            "a pre-tokenized source needs the tokenizer it was made with: \"byte\", a path to its \
              tokenizer.json, or a tokenizer.json next to the data"
                .into(),
    };
    let train = |texts: Vec<&str>| Tokenizer::train_bpe(&texts, cfg.vocab_size);
    match cfg.tokenizer_choice() {
        TokenizerChoice::Byte => Ok(Tokenizer::byte_level()),
        TokenizerChoice::File(p) => {
            if !p.exists() {
                return Err(Error::Config {
                    field: "tokenizer",
                    msg: format!(
                        "`{}` is neither \"auto\", \"byte\", \"bpe\" nor an existing tokenizer.json",
                        p.display()
                    ),
                });
            }
            Tokenizer::from_file(&p)
        }
        TokenizerChoice::Bpe => match (saved, pre_tokenized) {
            (Some(f), _) => Tokenizer::from_file(&f),
            (None, true) => Err(cannot_train()),
            (None, false) => train(train_texts()),
        },
        TokenizerChoice::Auto => {
            if let Some(f) = saved.or(next_to_source) {
                return Tokenizer::from_file(&f);
            }
            if pre_tokenized {
                return Err(cannot_train());
            }
            match cfg.vocab_size {
                v if v > BYTE_VOCAB_SIZE => train(train_texts()),
                BYTE_VOCAB_SIZE => Ok(Tokenizer::byte_level()),
                v => Err(Error::Config {
                    field: "tokenizer",
                    msg: format!("vocab_size {v} is below the {BYTE_VOCAB_SIZE} ids of the byte-level tokenizer"),
                }),
            }
        }
    }
}
