//! Corpus readers: plain text, JSONL, Parquet and pre-tokenized token files, and the folder
//! walk that finds them.
//!
//! - `.txt`: one file is one document. A file larger than [`TXT_SPLIT_BYTES`] is split into
//!   paragraphs at blank lines, one document each, so that a single huge text still gives a
//!   validation split by documents.
//! - `.jsonl`: one JSON object per line; the document is the string field named by
//!   `text_column` (default `text`). Blank lines are skipped.
//! - `.parquet`: the BYTE_ARRAY (string) column named by `text_column`, as in FineWeb-Edu
//!   (nulls are skipped). A nested column may be named by its dotted path.
//! - `.u16` / `.u32`: raw little-endian token ids, documents separated by the EOS id (a
//!   trailing document without EOS is kept). No header.
//! - `.bin`: llm.c's token shards: a header of 256 little-endian `i32` (magic `20240520` with
//!   version 1 for `u16` ids, or magic `20240801` with version 7 for `u32` ids; then the token
//!   count), followed by the ids; documents are separated by the EOS id as above.
//!
//! Each reader holds a file once plus its documents (a `.txt` of one paragraph is trimmed in
//! place, a JSONL text is moved out of its parsed line, token documents are allocated at their
//! exact length), so memory stays within about twice the file for any line length.
//!
//! A folder is walked recursively in sorted path order, so the document order is
//! deterministic; files with other extensions are ignored. Text and token files cannot be
//! mixed in one source.

use super::{Error, Result};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::path::{Path, PathBuf};

/// A `.txt` file larger than this many bytes is split into paragraphs at blank lines.
pub const TXT_SPLIT_BYTES: usize = 1 << 20;

/// The file formats the readers understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Plain UTF-8 text.
    Txt,
    /// JSON lines with a text field.
    Jsonl,
    /// Parquet with a text column.
    Parquet,
    /// Little-endian `u16` token ids.
    U16,
    /// Little-endian `u32` token ids.
    U32,
    /// An llm.c token shard (header + `u16` or `u32` ids).
    Bin,
}

impl FileKind {
    /// The kind of `path` by its extension, if supported.
    pub fn of(path: &Path) -> Option<FileKind> {
        match path.extension()?.to_str()? {
            "txt" => Some(FileKind::Txt),
            "jsonl" => Some(FileKind::Jsonl),
            "parquet" => Some(FileKind::Parquet),
            "u16" => Some(FileKind::U16),
            "u32" => Some(FileKind::U32),
            "bin" => Some(FileKind::Bin),
            _ => None,
        }
    }

    /// Whether the file holds token ids rather than text.
    pub fn is_tokens(self) -> bool {
        matches!(self, FileKind::U16 | FileKind::U32 | FileKind::Bin)
    }
}

/// The supported files of `path` (the file itself, or every supported file below the folder,
/// in sorted order).
///
/// # Errors
/// [`Error::MissingPath`], [`Error::UnsupportedFile`] for a file given directly with another
/// extension, [`Error::NoSupportedFiles`] for a folder without any, [`Error::MixedSource`]
/// when text and token files are mixed, and [`Error::Io`] when a folder cannot be listed.
pub fn list_files(path: &Path) -> Result<Vec<(PathBuf, FileKind)>> {
    if !path.exists() {
        return Err(Error::MissingPath {
            path: path.to_path_buf(),
        });
    }
    if path.is_file() {
        let kind = FileKind::of(path).ok_or_else(|| Error::UnsupportedFile {
            path: path.to_path_buf(),
        })?;
        return Ok(vec![(path.to_path_buf(), kind)]);
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    files.sort();
    let out: Vec<(PathBuf, FileKind)> = files
        .into_iter()
        .filter_map(|p| FileKind::of(&p).map(|k| (p, k)))
        .collect();
    if out.is_empty() {
        return Err(Error::NoSupportedFiles {
            path: path.to_path_buf(),
        });
    }
    if out.iter().any(|f| f.1.is_tokens()) && out.iter().any(|f| !f.1.is_tokens()) {
        return Err(Error::MixedSource {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if ty.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads the text documents of one file of a text kind.
///
/// # Errors
/// See the module docs; every error names the file (and line or column).
pub fn read_text_file(path: &Path, kind: FileKind, text_column: &str) -> Result<Vec<String>> {
    match kind {
        FileKind::Txt => read_txt(path),
        FileKind::Jsonl => read_jsonl(path, text_column),
        FileKind::Parquet => read_parquet(path, text_column),
        FileKind::U16 | FileKind::U32 | FileKind::Bin => Err(Error::TokenFile {
            path: path.to_path_buf(),
            msg: "a token file is not a text file".into(),
        }),
    }
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not valid UTF-8 (first bad byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            ),
        )
    })
}

/// A `.txt` file: one document, or paragraphs when it is larger than [`TXT_SPLIT_BYTES`].
/// Needs at most twice the file's size in memory (once when it is a single paragraph), for
/// any line length.
pub fn read_txt(path: &Path) -> Result<Vec<String>> {
    let mut text = read_utf8(path)?;
    if text.len() <= TXT_SPLIT_BYTES {
        return Ok(vec![text]);
    }
    let ranges = paragraph_ranges(&text);
    if let [only] = ranges[..] {
        // One paragraph: trim the text in place instead of copying it.
        text.truncate(only.1);
        text.drain(..only.0);
        return Ok(vec![text]);
    }
    Ok(ranges
        .into_iter()
        .map(|(s, e)| text[s..e].to_string())
        .collect())
}

/// Splits text at blank (whitespace-only) lines; each paragraph keeps its inner newlines.
pub fn split_paragraphs(text: &str) -> Vec<String> {
    paragraph_ranges(text)
        .into_iter()
        .map(|(s, e)| text[s..e].to_string())
        .collect()
}

/// The byte ranges of the paragraphs of [`split_paragraphs`]: maximal runs of non-blank
/// lines, without trailing whitespace.
fn paragraph_ranges(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, usize)> = None;
    let mut pos = 0usize;
    let mut close = |cur: &mut Option<(usize, usize)>| {
        if let Some((s, e)) = cur.take() {
            out.push((s, s + text[s..e].trim_end().len()));
        }
    };
    for line in text.split_inclusive('\n') {
        let end = pos + line.len();
        if line.trim().is_empty() {
            close(&mut cur);
        } else {
            cur = Some((cur.map_or(pos, |c| c.0), end));
        }
        pos = end;
    }
    close(&mut cur);
    out
}

/// A `.jsonl` file: the string field `text_column` of every non-blank line.
pub fn read_jsonl(path: &Path, text_column: &str) -> Result<Vec<String>> {
    let text = read_utf8(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::JsonlLine {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(mut obj) = v else {
            return Err(err("expected a JSON object".into()));
        };
        // Moved out, not copied: a long text is held once besides the file.
        match obj.remove(text_column) {
            Some(serde_json::Value::String(s)) => out.push(s),
            Some(other) => {
                return Err(err(format!(
                    "field `{text_column}` is not a string (found {})",
                    json_kind(&other)
                )))
            }
            None => {
                let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
                return Err(err(format!(
                    "missing field `{text_column}` (fields: {})",
                    keys.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A `.parquet` file: the non-null values of the BYTE_ARRAY column `text_column`.
pub fn read_parquet(path: &Path, text_column: &str) -> Result<Vec<String>> {
    let pq = |e: parquet::errors::ParquetError| Error::Parquet {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(pq)?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let columns = schema.columns();
    let usable = |i: usize| {
        columns[i].physical_type() == PhysicalType::BYTE_ARRAY && columns[i].max_rep_level() == 0
    };
    let col = (0..columns.len())
        .find(|&i| usable(i) && columns[i].path().string() == text_column)
        .or_else(|| {
            let by_name: Vec<usize> = (0..columns.len())
                .filter(|&i| usable(i) && columns[i].name() == text_column)
                .collect();
            (by_name.len() == 1).then(|| by_name[0])
        })
        .ok_or_else(|| Error::ParquetColumn {
            path: path.to_path_buf(),
            column: text_column.to_string(),
            available: columns
                .iter()
                .map(|c| format!("{} ({})", c.path().string(), c.physical_type()))
                .collect(),
        })?;
    let mut out = Vec::new();
    for rg in 0..reader.num_row_groups() {
        let group = reader.get_row_group(rg).map_err(pq)?;
        let ColumnReader::ByteArrayColumnReader(mut col_reader) =
            group.get_column_reader(col).map_err(pq)?
        else {
            return Err(Error::Parquet {
                path: path.to_path_buf(),
                msg: format!("column `{text_column}` is not BYTE_ARRAY"),
            });
        };
        let mut values = Vec::new();
        let mut defs = Vec::new();
        loop {
            values.clear();
            defs.clear();
            let (records, _, _) = col_reader
                .read_records(4096, Some(&mut defs), None, &mut values)
                .map_err(pq)?;
            if records == 0 {
                break;
            }
            for v in &values {
                let s = std::str::from_utf8(v.data()).map_err(|e| Error::Parquet {
                    path: path.to_path_buf(),
                    msg: format!("row group {rg}: column `{text_column}` holds invalid UTF-8: {e}"),
                })?;
                out.push(s.to_string());
            }
        }
    }
    Ok(out)
}

/// The magic and version of llm.c's `u16` shards.
pub const LLMC_MAGIC_U16: (i32, i32) = (20240520, 1);
/// The magic and version of llm.c's `u32` shards.
pub const LLMC_MAGIC_U32: (i32, i32) = (20240801, 7);
/// Bytes of an llm.c shard header (256 `i32`).
pub const LLMC_HEADER_BYTES: usize = 1024;

/// A `.u16` / `.u32` / `.bin` token file split into documents at `eos_id` (EOS itself is
/// dropped; the pipeline appends it again). Empty documents are dropped.
///
/// # Errors
/// When the file cannot be read, its length is not a multiple of the id width, or a `.bin`
/// header is not an llm.c header matching the file length.
pub fn read_token_file(path: &Path, kind: FileKind, eos_id: u32) -> Result<Vec<Vec<u32>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::TokenFile {
        path: path.to_path_buf(),
        msg,
    };
    let (width, body) = match kind {
        FileKind::U16 => (2, &bytes[..]),
        FileKind::U32 => (4, &bytes[..]),
        FileKind::Bin => {
            if bytes.len() < LLMC_HEADER_BYTES {
                return Err(bad(format!(
                    "{} bytes is shorter than the {LLMC_HEADER_BYTES}-byte llm.c header",
                    bytes.len()
                )));
            }
            let h = |i: usize| {
                i32::from_le_bytes([
                    bytes[4 * i],
                    bytes[4 * i + 1],
                    bytes[4 * i + 2],
                    bytes[4 * i + 3],
                ])
            };
            let width = match (h(0), h(1)) {
                LLMC_MAGIC_U16 => 2,
                LLMC_MAGIC_U32 => 4,
                (m, v) => {
                    return Err(bad(format!(
                        "not an llm.c token shard: magic {m}, version {v} (expected {LLMC_MAGIC_U16:?} or {LLMC_MAGIC_U32:?})"
                    )))
                }
            };
            let n =
                usize::try_from(h(2)).map_err(|_| bad(format!("negative token count {}", h(2))))?;
            let body = &bytes[LLMC_HEADER_BYTES..];
            if body.len() != n * width {
                return Err(bad(format!(
                    "the header says {n} tokens but the file holds {} bytes of ids",
                    body.len()
                )));
            }
            (width, body)
        }
        _ => return Err(bad("not a token file".into())),
    };
    if body.len() % width != 0 {
        return Err(bad(format!(
            "length {} is not a multiple of {width} bytes",
            body.len()
        )));
    }
    let decode = |c: &[u8]| {
        if width == 2 {
            u16::from_le_bytes([c[0], c[1]]) as u32
        } else {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]])
        }
    };
    // Each document is collected from its own slice of the file, at its exact length, so the
    // documents take exactly `4 / width` times the file's ids.
    let n = body.len() / width;
    let mut docs = Vec::new();
    let mut doc_start = 0usize;
    let ends = body
        .chunks_exact(width)
        .enumerate()
        .filter(|&(_, c)| decode(c) == eos_id)
        .map(|(i, _)| i)
        .chain(std::iter::once(n));
    for end in ends {
        if end > doc_start {
            let doc: Vec<u32> = body[doc_start * width..end * width]
                .chunks_exact(width)
                .map(decode)
                .collect();
            docs.push(doc);
        }
        doc_start = end + 1;
    }
    Ok(docs)
}

/// Writes token ids in the format [`read_token_file`] reads: raw little-endian `.u16` /
/// `.u32`, or an llm.c `.bin` shard (`u16` ids when they all fit, else `u32`), e.g. to cache
/// a tokenized corpus.
///
/// # Errors
/// When the file cannot be written, or an id does not fit in a `.u16` file.
pub fn write_token_file(path: &Path, kind: FileKind, ids: &[u32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(ids.len() * 4 + LLMC_HEADER_BYTES);
    let narrow = ids.iter().all(|&id| id <= u16::MAX as u32);
    let width = match kind {
        FileKind::U16 => 2,
        FileKind::U32 => 4,
        FileKind::Bin => {
            let (magic, version) = if narrow {
                LLMC_MAGIC_U16
            } else {
                LLMC_MAGIC_U32
            };
            let n = i32::try_from(ids.len()).map_err(|_| Error::TokenFile {
                path: path.to_path_buf(),
                msg: format!("{} tokens do not fit an llm.c header", ids.len()),
            })?;
            let mut header = [0i32; 256];
            header[..3].copy_from_slice(&[magic, version, n]);
            header
                .iter()
                .for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
            if narrow {
                2
            } else {
                4
            }
        }
        _ => {
            return Err(Error::TokenFile {
                path: path.to_path_buf(),
                msg: "not a token file kind".into(),
            })
        }
    };
    if width == 2 && !narrow {
        let (i, id) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id > u16::MAX as u32)
            .unwrap_or((0, &0));
        return Err(Error::TokenFile {
            path: path.to_path_buf(),
            msg: format!("id {id} at position {i} does not fit in u16"),
        });
    }
    for &id in ids {
        if width == 2 {
            bytes.extend_from_slice(&(id as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
