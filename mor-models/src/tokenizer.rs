//! Tokenizers: a Hugging Face `tokenizer.json` (through the `tokenizers` crate), a byte-level
//! BPE trained on the corpus when none is given, and a plain byte-level fallback (256 bytes
//! plus EOS).
//!
//! Every kind appends nothing by itself: the data pipeline appends [`Tokenizer::eos_id`] after
//! each document (spec §1.2: `<|endoftext|>` after every document, no BOS). Every kind is
//! saved as a Hugging Face compatible `tokenizer.json`, so a run folder can be read by other
//! tools; the byte-level fallback is written as a BPE without merges whose token ids are the
//! byte values, and is recognised again by [`Tokenizer::load`].
//!
//! # Examples
//!
//! ```
//! use mor_models::tokenizer::Tokenizer;
//!
//! let tok = Tokenizer::byte_level();
//! let ids = tok.encode("héllo").unwrap();
//! assert_eq!(ids.len(), 6); // "é" is two UTF-8 bytes
//! assert_eq!(tok.decode(&ids).unwrap(), "héllo");
//! assert_eq!(tok.eos_id(), 256);
//! ```

use crate::data::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The end-of-document token of every tokenizer trained or built here (spec §1.2).
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The file name a tokenizer is saved under inside a run folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Vocabulary size of the byte-level fallback: 256 byte values plus EOS (id 256).
pub const BYTE_VOCAB_SIZE: usize = 257;

/// The most text a BPE is trained on; a bigger training split is truncated (whole documents,
/// in order; the first document's leading chunks when it alone is larger) to keep training
/// within seconds.
pub const BPE_TRAIN_MAX_BYTES: usize = 32 << 20;

/// Longest piece of text handed to the Hugging Face pipeline at once by a tokenizer whose
/// pre-tokenization is chunk-exact (see [`Tokenizer::is_chunk_exact`]): longer texts are
/// encoded, and a BPE is trained, chunk by chunk (see [`text_chunks`]), which bounds the
/// pipeline's working memory (tens of bytes per input byte) by a constant instead of by the
/// longest line.
pub const CHUNK_BYTES: usize = 32 << 10;

/// Longest piece of text encoded at once by a tokenizer that is not chunk-exact (other
/// normalizers or pre-tokenizers may depend on where a text starts, e.g. a prepended `▁`):
/// texts up to this size are encoded whole, exactly as before; longer ones chunk by chunk,
/// where the tokens next to a cut may differ from encoding the whole text.
pub const WHOLE_TEXT_MAX_BYTES: usize = 1 << 20;

/// End-of-text names looked for, in order, in a given `tokenizer.json`.
const EOS_CANDIDATES: [&str; 5] = [EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>"];

/// Which kind of tokenizer a [`Tokenizer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per UTF-8 byte (ids 0..=255), EOS = 256.
    Byte,
    /// A Hugging Face tokenizer (loaded from a `tokenizer.json` or a BPE trained here).
    Hf,
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenizerKind::Byte => "byte",
            TokenizerKind::Hf => "hf",
        })
    }
}

/// Token ids of one text together with the UTF-8 byte range each token came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoding {
    /// Token ids, in order.
    pub ids: Vec<u32>,
    /// Byte range `[start, end)` of the input text behind each token. For byte-level BPEs a
    /// token that holds only part of a multi-byte character reports the whole character, so
    /// neighbouring ranges may overlap; [`Encoding::byte_counts`] splits bytes without
    /// double counting.
    pub offsets: Vec<(usize, usize)>,
}

impl Encoding {
    /// How many bytes of the `text_len`-byte input each token accounts for. Bytes are given
    /// to the first token whose range ends past them, so the counts sum to `text_len` exactly
    /// (any trailing bytes no token covers go to the last token).
    pub fn byte_counts(&self, text_len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.offsets.len());
        let mut cursor = 0usize;
        for &(_, end) in &self.offsets {
            let end = end.min(text_len);
            let n = end.saturating_sub(cursor);
            cursor = cursor.max(end);
            out.push(n as u32);
        }
        if let Some(last) = out.last_mut() {
            *last += text_len.saturating_sub(cursor) as u32;
        }
        out
    }
}

/// Where `text` may be cut so that every piece pre-tokenizes as it does inside the whole text:
/// between a non-whitespace character and a whitespace character. The GPT-2 byte-level
/// pattern (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`)
/// puts whitespace only in whitespace-only pieces or as the single leading space of a piece,
/// so a piece starts there; and a piece that ends with non-whitespace is matched the same
/// whether more text follows or not. (A cut after whitespace would not be exact: `\s+(?!\S)`
/// takes a whole run of whitespace at the end of a text but leaves its last character for the
/// next piece when text follows.)
fn is_cut(text: &str, p: usize) -> bool {
    match (text[..p].chars().next_back(), text[p..].chars().next()) {
        (Some(prev), Some(next)) => !prev.is_whitespace() && next.is_whitespace(),
        _ => false,
    }
}

/// Splits `text` into consecutive pieces of at most `max_bytes` bytes (at least 4), each
/// returned with its byte offset in `text`. A piece ends at the last position in the second
/// half of its allowed length where whitespace follows non-whitespace (there the GPT-2
/// byte-level pre-tokenizer cuts anyway, so each piece tokenizes as inside the whole text);
/// without one (a run without whitespace, or of whitespace, longer than `max_bytes / 2`), at
/// the last character boundary that fits. A text of at most `max_bytes` bytes is one piece.
/// The pieces concatenate to `text`.
///
/// # Examples
/// ```
/// use mor_models::tokenizer::text_chunks;
///
/// let chunks: Vec<(usize, &str)> = text_chunks("one two three four", 8).collect();
/// assert_eq!(chunks, [(0, "one two"), (7, " three"), (13, " four")]);
/// ```
pub fn text_chunks(text: &str, max_bytes: usize) -> impl Iterator<Item = (usize, &str)> + '_ {
    let max = max_bytes.max(4);
    let mut start = 0usize;
    std::iter::from_fn(move || {
        if start >= text.len() {
            return None;
        }
        let end = if text.len() - start <= max {
            text.len()
        } else {
            let mut hi = start + max;
            while !text.is_char_boundary(hi) {
                hi -= 1;
            }
            let lo = (start + max / 2).max(start + 1);
            (lo..=hi)
                .rev()
                .find(|&p| text.is_char_boundary(p) && is_cut(text, p))
                .unwrap_or(hi)
        };
        let piece = (start, &text[start..end]);
        start = end;
        Some(piece)
    })
}

#[derive(Clone)]
enum Inner {
    Byte,
    Hf(Arc<tokenizers::Tokenizer>),
}

/// A tokenizer of one of the kinds in [`TokenizerKind`]. Cheap to clone (the Hugging Face
/// tokenizer is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
    eos_id: u32,
    vocab_size: usize,
    chunk_exact: bool,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .field("chunk_exact", &self.chunk_exact)
            .finish()
    }
}

fn tok_err(what: &str, e: impl fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

/// GPT-2's reversible map from bytes to printable characters (the alphabet of byte-level
/// BPEs): printable Latin-1 bytes map to themselves, the others to U+0100 onwards.
pub fn byte_level_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    out
}

impl Tokenizer {
    /// The byte-level fallback: ids 0..=255 are the UTF-8 bytes, 256 is EOS.
    pub fn byte_level() -> Self {
        Tokenizer {
            inner: Inner::Byte,
            eos_id: (BYTE_VOCAB_SIZE - 1) as u32,
            vocab_size: BYTE_VOCAB_SIZE,
            chunk_exact: true,
        }
    }

    /// Trains a byte-level BPE (GPT-2 pre-tokenisation, no prefix space, no normaliser) on
    /// `docs`, with `<|endoftext|>` as id 0 and at most `vocab_size` entries. Training is
    /// deterministic: merges are taken by count, ties by the smaller pair of ids, and the
    /// initial alphabet is the 256 byte characters in a fixed order. Only the first
    /// [`BPE_TRAIN_MAX_BYTES`] of text (whole documents, or the first document's leading
    /// chunks when it alone is larger) are used. Documents are fed to the trainer in chunks of
    /// at most [`CHUNK_BYTES`] cut where the pre-tokenizer cuts anyway ([`text_chunks`]), so
    /// the word counts, and hence the merges, are those of the whole documents while the
    /// trainer's memory does not grow with the longest line.
    ///
    /// # Errors
    /// When `vocab_size` is below 257 (EOS plus the byte alphabet) or training fails.
    pub fn train_bpe<S: AsRef<str> + Sync>(docs: &[S], vocab_size: usize) -> Result<Self> {
        if vocab_size < BYTE_VOCAB_SIZE {
            return Err(Error::Config {
                field: "tokenizer",
                msg: format!(
                    "a byte-level BPE needs vocab_size >= {BYTE_VOCAB_SIZE} (EOS + 256 bytes), got {vocab_size}"
                ),
            });
        }
        let mut used = 0usize;
        let take = docs
            .iter()
            .take_while(|d| {
                used += d.as_ref().len();
                used <= BPE_TRAIN_MAX_BYTES
            })
            .count();
        let pieces: Vec<&str> = if take > 0 {
            docs[..take]
                .iter()
                .flat_map(|d| text_chunks(d.as_ref(), CHUNK_BYTES))
                .map(|(_, c)| c)
                .collect()
        } else {
            // The first document alone is over the cap: its leading chunks up to the cap.
            let mut used = 0usize;
            docs.iter()
                .take(1)
                .flat_map(|d| text_chunks(d.as_ref(), CHUNK_BYTES))
                .map(|(_, c)| c)
                .take_while(|c| {
                    used += c.len();
                    used == c.len() || used <= BPE_TRAIN_MAX_BYTES
                })
                .collect()
        };
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN.to_string(), true)])
            .initial_alphabet(byte_level_alphabet().into_iter().collect())
            .build();
        let mut tok = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            ByteLevel,
            PostProcessorWrapper,
            ByteLevelDecoder,
        >::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, false, true)))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevelDecoder::new(false, false, true)))
        .build()
        .map_err(|e| tok_err("cannot build the BPE", e))?;
        tok.train(&mut trainer, pieces.into_iter())
            .map_err(|e| tok_err("BPE training failed", e))?;
        let json = tok
            .to_string(false)
            .map_err(|e| tok_err("cannot serialise the trained BPE", e))?;
        Self::from_json_str(&json, "trained BPE")
    }

    /// Loads a Hugging Face `tokenizer.json` file (or the file `tokenizer.json` inside a
    /// folder). A file that describes the byte-level fallback gives [`TokenizerKind::Byte`].
    ///
    /// # Errors
    /// When the file is missing or unreadable, is not a valid tokenizer, or has no EOS token
    /// (looked for: `<|endoftext|>`, `</s>`, `<|end_of_text|>`, `<eos>`, `<|eot_id|>`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(TOKENIZER_FILE)
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            return Err(Error::Tokenizer(format!(
                "`{}` does not exist",
                file.display()
            )));
        }
        let json = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&json, &file.display().to_string())
    }

    /// Loads `dir/tokenizer.json` (the file [`Tokenizer::save`] writes).
    ///
    /// # Errors
    /// As [`Tokenizer::from_file`].
    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(TOKENIZER_FILE))
    }

    /// Parses the contents of a `tokenizer.json`; `origin` names it in error messages.
    ///
    /// # Errors
    /// As [`Tokenizer::from_file`].
    pub fn from_json_str(json: &str, origin: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| tok_err(&format!("{origin} is not valid JSON"), e))?;
        if is_byte_level_json(&value) {
            return Ok(Self::byte_level());
        }
        let tok = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| tok_err(&format!("{origin} is not a valid tokenizer.json"), e))?;
        let eos_id = EOS_CANDIDATES
            .iter()
            .find_map(|t| tok.token_to_id(t))
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{origin} has no end-of-text token (looked for {})",
                    EOS_CANDIDATES.join(", ")
                ))
            })?;
        let vocab_size = tok.get_vocab_size(true).max(eos_id as usize + 1);
        let chunk_exact = hf_is_chunk_exact(&tok);
        Ok(Tokenizer {
            inner: Inner::Hf(Arc::new(tok)),
            eos_id,
            vocab_size,
            chunk_exact,
        })
    }

    /// The tokenizer as `tokenizer.json` text.
    ///
    /// # Errors
    /// When serialisation fails.
    pub fn to_json(&self) -> Result<String> {
        match &self.inner {
            Inner::Byte => Ok(byte_level_json().to_string()),
            Inner::Hf(t) => t
                .to_string(false)
                .map_err(|e| tok_err("cannot serialise", e)),
        }
    }

    /// Writes `dir/tokenizer.json` (creating `dir`) through a temporary file and a rename,
    /// and returns the file's path.
    ///
    /// # Errors
    /// When the folder or file cannot be written.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = dir.join(TOKENIZER_FILE);
        let tmp = dir.join(format!("{TOKENIZER_FILE}.tmp"));
        std::fs::write(&tmp, self.to_json()?).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
        Ok(file)
    }

    /// The kind of this tokenizer.
    pub fn kind(&self) -> TokenizerKind {
        match self.inner {
            Inner::Byte => TokenizerKind::Byte,
            Inner::Hf(_) => TokenizerKind::Hf,
        }
    }

    /// The id appended after every document.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of ids the tokenizer can produce (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether texts can be cut at the positions of [`text_chunks`] without changing their
    /// tokens: true for the byte-level fallback and for Hugging Face tokenizers without a
    /// normaliser whose pre-tokenizer is the GPT-2 byte-level one (regex on, no prefix space)
    /// and whose added tokens hold no whitespace and strip none (the BPE trained here, GPT-2
    /// style files). Such tokenizers encode long texts in pieces of [`CHUNK_BYTES`], the
    /// others in pieces of [`WHOLE_TEXT_MAX_BYTES`].
    pub fn is_chunk_exact(&self) -> bool {
        self.chunk_exact
    }

    /// The pieces `text` is encoded in (offset and text), see [`Tokenizer::is_chunk_exact`].
    pub fn encoding_chunks<'t>(&self, text: &'t str) -> Vec<(usize, &'t str)> {
        let max = if self.chunk_exact {
            CHUNK_BYTES
        } else {
            WHOLE_TEXT_MAX_BYTES
        };
        text_chunks(text, max).collect()
    }

    /// Encodes each piece of [`Tokenizer::encoding_chunks`] (in parallel) and maps it with
    /// `f(offset, piece, encoding)`; the results are in text order. The working memory of the
    /// tokenizer is bounded by the piece size, whatever the length of `text`.
    ///
    /// # Errors
    /// When the underlying Hugging Face tokenizer or `f` fails.
    pub fn encode_pieces<T: Send>(
        &self,
        text: &str,
        f: impl Fn(usize, &str, Encoding) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        use rayon::prelude::*;
        let one = |&(start, piece): &(usize, &str)| -> Result<T> {
            let enc = match &self.inner {
                Inner::Byte => Encoding {
                    ids: piece.bytes().map(u32::from).collect(),
                    offsets: (0..piece.len()).map(|i| (i, i + 1)).collect(),
                },
                Inner::Hf(t) => {
                    let enc = t
                        .encode(piece, false)
                        .map_err(|e| tok_err("encode failed", e))?;
                    Encoding {
                        ids: enc.get_ids().to_vec(),
                        offsets: enc.get_offsets().to_vec(),
                    }
                }
            };
            f(start, piece, enc)
        };
        let chunks = self.encoding_chunks(text);
        if chunks.len() <= 1 {
            chunks.iter().map(one).collect()
        } else {
            chunks.par_iter().map(one).collect()
        }
    }

    /// Token ids of `text` (no EOS appended).
    ///
    /// # Errors
    /// When the underlying Hugging Face tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Byte => Ok(text.bytes().map(u32::from).collect()),
            Inner::Hf(_) => Ok(concat(self.encode_pieces(text, |_, _, enc| Ok(enc.ids))?)),
        }
    }

    /// Token ids of `text` with the byte range of `text` behind each token.
    ///
    /// # Errors
    /// When the underlying Hugging Face tokenizer fails.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoding> {
        match &self.inner {
            Inner::Byte => Ok(Encoding {
                ids: text.bytes().map(u32::from).collect(),
                offsets: (0..text.len()).map(|i| (i, i + 1)).collect(),
            }),
            Inner::Hf(_) => {
                let parts = self.encode_pieces(text, |start, _, mut enc| {
                    for o in &mut enc.offsets {
                        *o = (o.0 + start, o.1 + start);
                    }
                    Ok(enc)
                })?;
                let (ids, offsets) = parts.into_iter().map(|e| (e.ids, e.offsets)).unzip();
                Ok(Encoding {
                    ids: concat(ids),
                    offsets: concat(offsets),
                })
            }
        }
    }

    /// The text of `ids`. Special tokens (EOS) and unknown ids are skipped; invalid UTF-8 is
    /// replaced by U+FFFD.
    ///
    /// # Errors
    /// When the underlying Hugging Face decoder fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Byte => {
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Inner::Hf(t) => t.decode(ids, true).map_err(|e| tok_err("decode failed", e)),
        }
    }

    /// The number of UTF-8 bytes each id stands for, indexed by id (special tokens count 0).
    /// Exact for byte-level tokenizers (the fallback, the trained BPE and GPT-2-style files);
    /// for other decoders it is the byte length of the id decoded alone. The text pipeline
    /// uses exact per-text offsets instead; this table serves pre-tokenized corpora.
    pub fn token_byte_lens(&self) -> Vec<u32> {
        match &self.inner {
            Inner::Byte => {
                let mut v = vec![1u32; BYTE_VOCAB_SIZE];
                v[BYTE_VOCAB_SIZE - 1] = 0;
                v
            }
            Inner::Hf(t) => {
                let byte_level = matches!(
                    t.get_decoder(),
                    Some(tokenizers::DecoderWrapper::ByteLevel(_))
                );
                let alphabet: std::collections::HashSet<char> =
                    byte_level_alphabet().into_iter().collect();
                let specials = t.get_added_tokens_decoder();
                (0..self.vocab_size as u32)
                    .map(|id| {
                        if specials.get(&id).is_some_and(|a| a.special) {
                            return 0;
                        }
                        match t.id_to_token(id) {
                            Some(s) if byte_level && s.chars().all(|c| alphabet.contains(&c)) => {
                                s.chars().count() as u32
                            }
                            Some(_) => t.decode(&[id], false).map(|s| s.len() as u32).unwrap_or(0),
                            None => 0,
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The parts concatenated into one vector of exactly their total length.
pub(crate) fn concat<T: Copy>(parts: Vec<Vec<T>>) -> Vec<T> {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    out
}

/// See [`Tokenizer::is_chunk_exact`].
fn hf_is_chunk_exact(t: &tokenizers::Tokenizer) -> bool {
    let byte_level = matches!(
        t.get_pre_tokenizer(),
        Some(tokenizers::pre_tokenizers::PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space
    );
    byte_level
        && t.get_normalizer().is_none()
        && t.get_added_tokens_decoder().values().all(|a| {
            !a.lstrip
                && !a.rstrip
                && !a.content.is_empty()
                && !a.content.chars().any(char::is_whitespace)
        })
}

/// The `tokenizer.json` rendition of the byte-level fallback.
fn byte_level_json() -> serde_json::Value {
    let alphabet = byte_level_alphabet();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(b, c)| (c.to_string(), serde_json::Value::from(b as u64)))
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": BYTE_VOCAB_SIZE - 1, "content": EOS_TOKEN, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

/// Whether a parsed `tokenizer.json` is exactly the byte-level fallback: a BPE without
/// merges whose vocabulary maps each byte character to its byte value, EOS at 256 as the only
/// added token, no normaliser, and byte-level pre-tokenizer and decoder.
fn is_byte_level_json(v: &serde_json::Value) -> bool {
    let model = &v["model"];
    if model["type"] != "BPE" || v["normalizer"] != serde_json::Value::Null {
        return false;
    }
    if v["pre_tokenizer"]["type"] != "ByteLevel" || v["decoder"]["type"] != "ByteLevel" {
        return false;
    }
    if v["pre_tokenizer"]["add_prefix_space"] != false {
        return false;
    }
    if !model["merges"].as_array().is_some_and(|m| m.is_empty()) {
        return false;
    }
    let Some(vocab) = model["vocab"].as_object() else {
        return false;
    };
    let alphabet = byte_level_alphabet();
    if vocab.len() != 256
        || !alphabet
            .iter()
            .enumerate()
            .all(|(b, c)| vocab.get(&c.to_string()).and_then(|x| x.as_u64()) == Some(b as u64))
    {
        return false;
    }
    let Some(added) = v["added_tokens"].as_array() else {
        return false;
    };
    added.len() == 1
        && added[0]["content"] == EOS_TOKEN
        && added[0]["id"] == (BYTE_VOCAB_SIZE - 1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_gpt2_map() {
        let a = byte_level_alphabet();
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], '\u{120}'); // "Ġ"
        assert_eq!(a[b'\n' as usize], '\u{10A}'); // "Ċ"
        let set: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(set.len(), 256);
    }

    #[test]
    fn byte_counts_sum_to_text_len_with_overlaps() {
        // Two tokens sharing one 2-byte character report overlapping ranges.
        let enc = Encoding {
            ids: vec![1, 2, 3],
            offsets: vec![(0, 1), (1, 3), (1, 3)],
        };
        assert_eq!(enc.byte_counts(3), vec![1, 2, 0]);
        let enc = Encoding {
            ids: vec![1],
            offsets: vec![(0, 2)],
        };
        assert_eq!(enc.byte_counts(4), vec![4]);
    }
}
