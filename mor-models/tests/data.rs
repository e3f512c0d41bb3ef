//! Tests of the data pipeline and the tokenizers: readers, packing, shuffling and resume, the
//! built-in corpus and its difficulty labels, tokenizers, multiple-choice tasks and errors.

use mor_core::rng::Rng;
use mor_models::data::readers::{self, FileKind};
use mor_models::data::{
    builtin_doc, builtin_docs, builtin_mc_tasks, label_tokens, load_mc_tasks, split_documents,
    CorpusStats, DataConfig, DataCursor, Dataset, PackedSplit, SpanKind, TokenizedDoc,
    BUILTIN_TASKS, COMPUTED, CONTENT, EASY,
};
use mor_models::tokenizer::{
    text_chunks, Tokenizer, TokenizerKind, BYTE_VOCAB_SIZE, CHUNK_BYTES, EOS_TOKEN, TOKENIZER_FILE,
    WHOLE_TEXT_MAX_BYTES,
};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

// ----------------------------------------------------------------------------------------
// Shared test utilities.

/// A fresh empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "mor-data-{name}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn write(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

fn byte_cfg(source: &str) -> DataConfig {
    DataConfig {
        source: source.into(),
        tokenizer: "byte".into(),
        val_fraction: 0.0,
        seq_len: 8,
        vocab_size: BYTE_VOCAB_SIZE,
        ..DataConfig::default()
    }
}

/// A small built-in dataset with the byte tokenizer.
fn builtin_byte(seed: u64, shuffle: bool, doc_masking: bool) -> Dataset {
    let cfg = DataConfig {
        tokenizer: "byte".into(),
        builtin_docs: 40,
        seq_len: 32,
        vocab_size: BYTE_VOCAB_SIZE,
        val_fraction: 0.1,
        shuffle,
        doc_masking,
        seed,
        ..DataConfig::default()
    };
    Dataset::prepare(&cfg, None).unwrap()
}

fn err_string<T: std::fmt::Debug>(r: Result<T, mor_models::data::Error>) -> String {
    r.expect_err("expected an error").to_string()
}

// ----------------------------------------------------------------------------------------
// Readers.

#[test]
fn txt_folder_is_walked_recursively_in_sorted_order() {
    let dir = temp_dir("txt");
    write(&dir.join("b.txt"), "second document");
    write(&dir.join("a/z.txt"), "first document");
    write(&dir.join("c/d/e.txt"), "third\n\ndocument");
    write(&dir.join("notes.md"), "ignored");
    let files = readers::list_files(&dir).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| {
            p.strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert_eq!(names, ["a/z.txt", "b.txt", "c/d/e.txt"]);
    assert!(files.iter().all(|f| f.1 == FileKind::Txt));
    // One file is one document (small files are not split at blank lines).
    assert_eq!(
        readers::read_txt(&files[2].0).unwrap(),
        vec!["third\n\ndocument".to_string()]
    );

    let mut cfg = byte_cfg(dir.to_str().unwrap());
    cfg.seq_len = 4;
    let data = Dataset::prepare(&cfg, None).unwrap();
    let expected: Vec<u32> = ["first document", "second document", "third\n\ndocument"]
        .iter()
        .flat_map(|d| d.bytes().map(u32::from).chain([256]))
        .collect();
    assert_eq!(data.train().tokens(), &expected[..]);
    assert_eq!(data.stats().documents, 3);
    assert_eq!(data.stats().train_bytes, (14 + 15 + 15) as u64);
}

#[test]
fn huge_txt_files_are_split_into_paragraphs() {
    assert_eq!(
        readers::split_paragraphs("a\nb\n\n\n c \n  \nd\n"),
        vec!["a\nb", " c", "d"]
    );
    let dir = temp_dir("hugetxt");
    let para = "x".repeat(1000);
    let text: Vec<String> = (0..1100).map(|i| format!("{i} {para}")).collect();
    write(&dir.join("big.txt"), &text.join("\n\n"));
    let docs = readers::read_txt(&dir.join("big.txt")).unwrap();
    assert_eq!(docs.len(), 1100);
    assert_eq!(docs[7], format!("7 {para}"));
}

#[test]
fn jsonl_reads_the_configured_field_and_names_the_bad_line() {
    let dir = temp_dir("jsonl");
    let f = dir.join("d.jsonl");
    write(
        &f,
        "{\"text\": \"héllo\", \"id\": 1}\n\n{\"text\": \"world\", \"body\": \"b\"}\n",
    );
    assert_eq!(
        readers::read_jsonl(&f, "text").unwrap(),
        vec!["héllo", "world"]
    );

    let g = dir.join("e.jsonl");
    write(&g, "{\"body\": \"one\"}\n{\"text\": \"two\"}\n");
    let msg = err_string(readers::read_jsonl(&g, "body"));
    assert!(
        msg.contains("e.jsonl:2:")
            && msg.contains("missing field `body`")
            && msg.contains("fields: text"),
        "{msg}"
    );
    let msg = err_string(readers::read_jsonl(&g, "text"));
    assert!(
        msg.contains("e.jsonl:1:") && msg.contains("missing field `text`"),
        "{msg}"
    );

    let h = dir.join("h.jsonl");
    write(&h, "{\"text\": 3}\nnot json\n");
    let msg = err_string(readers::read_jsonl(&h, "text"));
    assert!(
        msg.contains("h.jsonl:1:") && msg.contains("not a string (found a number)"),
        "{msg}"
    );

    // Through the dataset, with a custom column.
    let mut cfg = byte_cfg(g.to_str().unwrap());
    cfg.text_column = "body".into();
    let msg = err_string(Dataset::prepare(&cfg, None));
    assert!(msg.contains("e.jsonl:2:"), "{msg}");
}

fn write_parquet(path: &Path, texts: &[Option<&str>], compression: parquet::basic::Compression) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let schema = Arc::new(
        parse_message_type(
            "message schema { REQUIRED INT32 id; OPTIONAL BYTE_ARRAY text (UTF8); }",
        )
        .unwrap(),
    );
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    // Two row groups, to exercise the loop over them.
    for chunk in texts.chunks(2) {
        let mut rg = writer.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ids: Vec<i32> = (0..chunk.len() as i32).collect();
        col.typed::<Int32Type>()
            .write_batch(&ids, None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = chunk
            .iter()
            .flatten()
            .map(|s| ByteArray::from(*s))
            .collect();
        let defs: Vec<i16> = chunk.iter().map(|t| t.is_some() as i16).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn parquet_reads_the_text_column_and_rejects_a_missing_one() {
    let dir = temp_dir("parquet");
    let f = dir.join("shard.parquet");
    use parquet::basic::{Compression, ZstdLevel};
    let texts = [Some("alpha"), None, Some("beta gamma"), Some("δ")];
    for (name, c) in [
        ("plain.parquet", Compression::UNCOMPRESSED),
        ("snappy.parquet", Compression::SNAPPY),
        ("zstd.parquet", Compression::ZSTD(ZstdLevel::default())),
    ] {
        write_parquet(&dir.join(name), &texts, c);
        let got = readers::read_parquet(&dir.join(name), "text").unwrap();
        assert_eq!(got, vec!["alpha", "beta gamma", "δ"], "{name}");
    }
    write_parquet(&f, &texts, Compression::SNAPPY);
    let msg = err_string(readers::read_parquet(&f, "content"));
    assert!(
        msg.contains("shard.parquet")
            && msg.contains("`content`")
            && msg.contains("text (BYTE_ARRAY)")
            && msg.contains("id (INT32)"),
        "{msg}"
    );
    // The INT32 column is not a text column.
    assert!(err_string(readers::read_parquet(&f, "id")).contains("no BYTE_ARRAY column `id`"));
    let not_parquet = dir.join("bad.parquet");
    write(&not_parquet, "definitely not parquet");
    assert!(
        err_string(readers::read_parquet(&not_parquet, "text")).contains("bad.parquet: parquet:")
    );
}

#[test]
fn token_files_split_at_eos() {
    let dir = temp_dir("tokens");
    let eos = 256u32;
    let ids = [1, 2, eos, 3, eos, eos, 4, 5];
    let want = vec![vec![1, 2], vec![3], vec![4, 5]];
    for (name, kind) in [
        ("a.u16", FileKind::U16),
        ("a.u32", FileKind::U32),
        ("a.bin", FileKind::Bin),
    ] {
        let f = dir.join(name);
        readers::write_token_file(&f, kind, &ids).unwrap();
        assert_eq!(FileKind::of(&f), Some(kind));
        assert_eq!(
            readers::read_token_file(&f, kind, eos).unwrap(),
            want,
            "{name}"
        );
    }
    // Raw widths are exact: 8 ids of 2 bytes; the .bin file has the 1024-byte header.
    assert_eq!(std::fs::metadata(dir.join("a.u16")).unwrap().len(), 16);
    assert_eq!(
        std::fs::metadata(dir.join("a.bin")).unwrap().len(),
        1024 + 16
    );
    // Wide ids make a u32 .bin shard.
    let wide = dir.join("w.bin");
    readers::write_token_file(&wide, FileKind::Bin, &[70_000, 1]).unwrap();
    assert_eq!(
        readers::read_token_file(&wide, FileKind::Bin, 0).unwrap(),
        vec![vec![70_000, 1]]
    );
    assert!(err_string(readers::write_token_file(
        &dir.join("x.u16"),
        FileKind::U16,
        &[70_000]
    ))
    .contains("does not fit in u16"));

    let odd = dir.join("odd.u16");
    std::fs::write(&odd, [1u8, 0, 2]).unwrap();
    let msg = err_string(readers::read_token_file(&odd, FileKind::U16, eos));
    assert!(
        msg.contains("odd.u16") && msg.contains("not a multiple of 2"),
        "{msg}"
    );
    let bad = dir.join("bad.bin");
    std::fs::write(&bad, vec![0u8; 1030]).unwrap();
    assert!(
        err_string(readers::read_token_file(&bad, FileKind::Bin, eos))
            .contains("not an llm.c token shard")
    );
}

#[test]
fn pre_tokenized_dataset_checks_ids_and_counts_bytes() {
    let dir = temp_dir("pretok");
    let text = ["hello world", "ab", "the third one"];
    let ids: Vec<u32> = text
        .iter()
        .flat_map(|d| d.bytes().map(u32::from).chain([256]))
        .collect();
    readers::write_token_file(&dir.join("x.u16"), FileKind::U16, &ids).unwrap();
    let mut cfg = byte_cfg(dir.to_str().unwrap());
    cfg.seq_len = 4;
    let data = Dataset::prepare(&cfg, None).unwrap();
    assert_eq!(data.train().tokens(), &ids[..]);
    assert_eq!(data.stats().train_bytes, 26);
    // "auto" cannot train on token ids.
    cfg.tokenizer = "auto".into();
    assert!(err_string(Dataset::prepare(&cfg, None))
        .contains("pre-tokenized source needs the tokenizer"));
    // An id outside the vocabulary names the file and position.
    readers::write_token_file(&dir.join("x.u16"), FileKind::U16, &[1, 2, 300]).unwrap();
    cfg.tokenizer = "byte".into();
    let msg = err_string(Dataset::prepare(&cfg, None));
    assert!(
        msg.contains("x.u16") && msg.contains("token 2: id 300"),
        "{msg}"
    );
    // Text and token files cannot be mixed.
    write(&dir.join("y.txt"), "text");
    assert!(err_string(Dataset::prepare(&cfg, None)).contains("mixes text files and pre-tokenized"));
}

// ----------------------------------------------------------------------------------------
// Packing.

fn doc(ids: Vec<u32>) -> TokenizedDoc {
    let bytes = ids.iter().map(|&i| i % 3).collect();
    TokenizedDoc {
        ids,
        bytes,
        labels: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn packing_covers_the_stream_exactly(
        lens in proptest::collection::vec(1usize..20, 1..12),
        seq_len in 1usize..9,
    ) {
        let eos = 1000u32;
        let docs: Vec<TokenizedDoc> = lens
            .iter()
            .enumerate()
            .map(|(d, &n)| doc((0..n as u32).map(|i| (d as u32 * 37 + i * 11) % 997).collect()))
            .collect();
        let split = PackedSplit::pack(&docs, eos, seq_len).unwrap();
        // The stream is the documents, each followed by EOS, in order.
        let want: Vec<u32> = docs.iter().flat_map(|d| d.ids.iter().copied().chain([eos])).collect();
        prop_assert_eq!(split.tokens(), &want[..]);
        // Rows of seq_len + 1 with stride seq_len cover tokens[..rows·T + 1] exactly.
        let rows = split.num_rows();
        prop_assert_eq!(rows, (want.len() - 1) / seq_len);
        let mut covered: Vec<u32> = Vec::new();
        for r in 0..rows {
            let row = split.row(r).unwrap();
            prop_assert_eq!(row.len(), seq_len + 1);
            covered.extend_from_slice(if r == 0 { row } else { &row[1..] });
        }
        prop_assert!(split.row(rows).is_none());
        if rows > 0 {
            prop_assert_eq!(&covered[..], &want[..rows * seq_len + 1]);
            prop_assert_eq!(split.dropped_tokens(), want.len() - covered.len());
        }
        // Batches: targets are the inputs shifted by one, doc ids step right after EOS,
        // bytes are the byte counts of the targets.
        let all: Vec<usize> = (0..rows).collect();
        let batch = split.batch(&all, true).unwrap();
        let doc_ids = batch.doc_ids.as_ref().unwrap();
        let stream_bytes: Vec<u32> = docs.iter().flat_map(|d| d.bytes.iter().copied().chain([0])).collect();
        let mut want_bytes = 0u64;
        for r in 0..rows {
            let (inp, tgt) = (&batch.inputs[r * seq_len..(r + 1) * seq_len], &batch.targets[r * seq_len..(r + 1) * seq_len]);
            let row = split.row(r).unwrap();
            prop_assert_eq!(inp, &row[..seq_len]);
            prop_assert_eq!(tgt, &row[1..]);
            let ids = &doc_ids[r * seq_len..(r + 1) * seq_len];
            prop_assert_eq!(ids[0], 0);
            for i in 1..seq_len {
                prop_assert_eq!(ids[i], ids[i - 1] + u32::from(inp[i - 1] == eos));
            }
            want_bytes += stream_bytes[r * seq_len + 1..r * seq_len + seq_len + 1].iter().map(|&b| b as u64).sum::<u64>();
        }
        prop_assert_eq!(batch.bytes, want_bytes);
        prop_assert!(split.batch(&[rows], false).is_err());
    }
}

#[test]
fn split_by_documents_is_deterministic_and_disjoint() {
    let (t1, v1) = split_documents(100, 0.1, 3).unwrap();
    let (t2, v2) = split_documents(100, 0.1, 3).unwrap();
    assert_eq!((t1.clone(), v1.clone()), (t2, v2));
    assert_eq!(v1.len(), 10);
    let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert_ne!(split_documents(100, 0.1, 4).unwrap().1, v1);
    assert_eq!(split_documents(3, 0.01, 0).unwrap().1.len(), 1);
    assert_eq!(
        split_documents(5, 0.0, 0).unwrap(),
        ((0..5).collect(), vec![])
    );
    assert!(err_string(split_documents(1, 0.5, 0)).contains("at least 2 documents"));
}

fn take(it: &mut mor_models::data::TrainBatches, n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|_| it.next().unwrap().inputs).collect()
}

#[test]
fn shuffling_is_deterministic_per_seed_and_per_epoch() {
    let data = builtin_byte(11, true, false);
    let n = data.train().num_rows();
    let b = 4;
    let per_epoch = n / b;
    assert!(per_epoch >= 3, "{n} rows");
    let a = take(&mut data.train_batches(b, None).unwrap(), 2 * per_epoch);
    let a2 = take(&mut data.train_batches(b, None).unwrap(), 2 * per_epoch);
    assert_eq!(a, a2, "same seed, same order");
    // Same rows, another shuffle seed: another order.
    let other = DataCursor {
        epoch: 0,
        index: 0,
        rng: Rng::new(99),
    };
    let c = take(&mut data.train_batches(b, Some(other)).unwrap(), per_epoch);
    assert_ne!(a[..per_epoch], c[..]);
    // The second epoch is reshuffled.
    assert_ne!(a[..per_epoch], a[per_epoch..]);
    // An epoch is a permutation of the rows (b divides what it serves).
    let t = data.config().seq_len;
    let mut served: Vec<Vec<u32>> = a[..per_epoch]
        .iter()
        .flat_map(|x| x.chunks(t).map(<[u32]>::to_vec))
        .collect();
    let mut rows: Vec<Vec<u32>> = (0..n)
        .map(|r| data.train().row(r).unwrap()[..t].to_vec())
        .collect();
    served.sort();
    served.dedup();
    assert_eq!(served.len(), per_epoch * b, "no row twice in an epoch");
    rows.sort();
    assert!(served.iter().all(|s| rows.binary_search(s).is_ok()));
    // Without shuffling, rows come in order.
    let plain = builtin_byte(11, false, false);
    let first = plain.train_batches(b, None).unwrap().next().unwrap();
    let want: Vec<u32> = (0..b)
        .flat_map(|r| plain.train().row(r).unwrap()[..t].to_vec())
        .collect();
    assert_eq!(first.inputs, want);
}

#[test]
fn cursor_roundtrip_resumes_the_identical_batch_sequence() {
    let data = builtin_byte(5, true, true);
    let b = 3;
    let per_epoch = data.train().num_rows() / b;
    let mut it = data.train_batches(b, None).unwrap();
    for _ in 0..per_epoch - 2 {
        it.next().unwrap();
    }
    let saved = serde_json::to_string(it.cursor()).unwrap();
    // Continue across the epoch boundary.
    let rest: Vec<_> = (0..6).map(|_| it.next().unwrap()).collect();
    assert_eq!(it.cursor().epoch, 1);
    let cursor: DataCursor = serde_json::from_str(&saved).unwrap();
    let mut resumed = data.train_batches(b, Some(cursor)).unwrap();
    let again: Vec<_> = (0..6).map(|_| resumed.next().unwrap()).collect();
    assert_eq!(rest, again);
    // A cursor past the rows is refused.
    let bad = DataCursor {
        epoch: 0,
        index: 10_000,
        rng: Rng::new(0),
    };
    assert!(err_string(data.train_batches(b, Some(bad))).contains("past the"));
}

#[test]
fn validation_batches_cover_every_row_in_order_with_byte_counts() {
    let data = builtin_byte(2, true, false);
    let val = data.val();
    let t = val.seq_len();
    let batches: Vec<_> = data.val_batches(3).unwrap().collect();
    assert_eq!(batches.iter().map(|b| b.b).sum::<usize>(), val.num_rows());
    let inputs: Vec<u32> = batches.iter().flat_map(|b| b.inputs.clone()).collect();
    let want: Vec<u32> = (0..val.num_rows())
        .flat_map(|r| val.row(r).unwrap()[..t].to_vec())
        .collect();
    assert_eq!(inputs, want);
    // Byte tokenizer: every target byte counts 1, EOS 0.
    let eos = data.tokenizer().eos_id();
    for b in &batches {
        assert_eq!(
            b.bytes,
            b.targets.iter().filter(|&&x| x != eos).count() as u64
        );
        assert!(b.doc_ids.is_none());
    }
    // The validation text's byte count is the sum of its documents.
    let docs = builtin_docs(2, 40);
    let (_, val_idx) = split_documents(40, 0.1, 2).unwrap();
    assert_eq!(
        data.val_bytes(),
        val_idx
            .iter()
            .map(|&i| docs[i].text.len() as u64)
            .sum::<u64>()
    );
    assert_eq!(data.stats().val_documents, 4);
}

// ----------------------------------------------------------------------------------------
// Tokenizers.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn byte_tokenizer_roundtrips(s in "\\PC{0,40}") {
        let tok = Tokenizer::byte_level();
        let enc = tok.encode_with_offsets(&s).unwrap();
        prop_assert_eq!(enc.ids.len(), s.len());
        prop_assert!(enc.ids.iter().all(|&i| i < 256));
        prop_assert_eq!(tok.decode(&enc.ids).unwrap(), s.clone());
        prop_assert_eq!(enc.byte_counts(s.len()).iter().sum::<u32>() as usize, s.len());
    }
}

#[test]
fn byte_tokenizer_json_is_a_real_hf_tokenizer() {
    let tok = Tokenizer::byte_level();
    assert_eq!(
        (tok.eos_id(), tok.vocab_size(), tok.kind()),
        (256, 257, TokenizerKind::Byte)
    );
    // The saved file, read by the tokenizers crate itself, gives the same ids.
    let hf = tokenizers::Tokenizer::from_str(&tok.to_json().unwrap()).unwrap();
    for text in ["héllo wörld\n\t 42!", "  spaces  ", "日本語"] {
        let ids = hf.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, tok.encode(text).unwrap(), "{text:?}");
        assert_eq!(hf.decode(&ids, true).unwrap(), text);
    }
    assert_eq!(hf.token_to_id(EOS_TOKEN), Some(256));
    // Save and load recognise the byte-level tokenizer.
    let dir = temp_dir("bytetok");
    let path = tok.save(&dir).unwrap();
    assert_eq!(path, dir.join(TOKENIZER_FILE));
    let back = Tokenizer::load(&dir).unwrap();
    assert_eq!(back.kind(), TokenizerKind::Byte);
    assert_eq!(tok.decode(&[104, 105, 256, 300]).unwrap(), "hi");
}

fn trained_bpe() -> (Tokenizer, Vec<String>) {
    let texts: Vec<String> = builtin_docs(1, 120).into_iter().map(|d| d.text).collect();
    (Tokenizer::train_bpe(&texts, 400).unwrap(), texts)
}

#[test]
fn trained_bpe_is_deterministic_bounded_and_roundtrips() {
    let (tok, texts) = trained_bpe();
    assert_eq!(tok.kind(), TokenizerKind::Hf);
    assert!(
        tok.vocab_size() <= 400 && tok.vocab_size() > 300,
        "vocab {}",
        tok.vocab_size()
    );
    assert_eq!(tok.eos_id(), 0);
    // Deterministic: a second training gives the same file.
    let again = Tokenizer::train_bpe(&texts, 400).unwrap();
    assert_eq!(tok.to_json().unwrap(), again.to_json().unwrap());
    // Merges compress the corpus text.
    let n_tokens: usize = texts.iter().map(|t| tok.encode(t).unwrap().len()).sum();
    let n_bytes: usize = texts.iter().map(String::len).sum();
    assert!(
        (n_tokens as f64) < 0.6 * n_bytes as f64,
        "{n_tokens} tokens for {n_bytes} bytes"
    );
    // Roundtrip, ids in range, and byte counts summing to the text length.
    for text in texts
        .iter()
        .take(20)
        .chain([&"Ünïcödé 日本 ( [ ] ) 12 + 7 = 19\n\n  x".to_string()])
    {
        let enc = tok.encode_with_offsets(text).unwrap();
        assert!(enc.ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&enc.ids).unwrap(), *text);
        assert_eq!(
            enc.byte_counts(text.len())
                .iter()
                .map(|&b| b as usize)
                .sum::<usize>(),
            text.len()
        );
    }
    // Save then load gives identical ids.
    let dir = temp_dir("bpe");
    tok.save(&dir).unwrap();
    let back = Tokenizer::load(&dir).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    for text in texts.iter().take(10) {
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
    }
    assert!(err_string(Tokenizer::train_bpe(&texts, 200)).contains("vocab_size >= 257"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn trained_bpe_roundtrips_arbitrary_text(s in "\\PC{0,60}") {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        let tok = TOK.get_or_init(|| trained_bpe().0);
        let ids = tok.encode(&s).unwrap();
        prop_assert_eq!(tok.decode(&ids).unwrap(), s);
    }
}

/// The raw Hugging Face tokenizer behind `tok`, to encode a text whole, as before texts were
/// cut into pieces.
fn raw_hf(tok: &Tokenizer) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_str(&tok.to_json().unwrap()).unwrap()
}

/// Ids and offsets of `text` encoded whole by `hf`.
fn whole_encoding(hf: &tokenizers::Tokenizer, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
    let enc = hf.encode(text, false).unwrap();
    (enc.get_ids().to_vec(), enc.get_offsets().to_vec())
}

const WORDS: [&str; 17] = [
    "the",
    "Ünï",
    "日本",
    "42",
    "1907",
    "it's",
    "'ll",
    "'d",
    "(x)",
    "--",
    "a.b",
    "é",
    "🙂",
    "x1",
    "'",
    "<|endoftext|>",
    "«»",
];
const SPACES: [&str; 11] = [
    " ", "  ", "\n", "\n\n", " \n", "\n ", "\t", " \t ", "\r\n", "\u{a0}", "\u{3000}",
];

/// Text of words (letters, digits, punctuation, contractions, non-ASCII) and short runs of
/// whitespace of every kind the byte-level pattern treats specially.
fn wordy_text() -> impl Strategy<Value = String> {
    let word = prop::sample::select(WORDS.to_vec());
    let space = prop::sample::select(SPACES.to_vec());
    prop::collection::vec((space, word), 0..80).prop_map(|parts| {
        parts
            .into_iter()
            .map(|(s, w)| format!("{s}{w}"))
            .collect::<String>()
    })
}

/// A BPE trained on built-in documents and on every word after every whitespace run, so it
/// has merges of whitespace runs ("\n\n", "  ", ...) whose tokens change if a text is cut
/// at the wrong place.
fn shared_bpe() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let mut texts: Vec<String> = builtin_docs(1, 60).into_iter().map(|d| d.text).collect();
        for s in SPACES {
            for w in WORDS {
                texts.push(format!("{w}{s}{w}{s}{w}{s}{s}{w}{s}{s}{s}{w}").repeat(3));
            }
        }
        Tokenizer::train_bpe(&texts, 700).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The pieces concatenate to the text, at their offsets, each within the size.
    #[test]
    fn text_chunks_cover_the_text_within_the_size(
        s in "[ a\n\té日🙂]{0,120}",
        max in 1usize..40,
    ) {
        let mut joined = String::new();
        for (offset, piece) in text_chunks(&s, max) {
            prop_assert_eq!(offset, joined.len());
            prop_assert!(!piece.is_empty() && piece.len() <= max.max(4));
            joined.push_str(piece);
        }
        prop_assert_eq!(joined, s);
    }

    /// Encoding the pieces of a text one by one gives exactly the tokens and offsets of the
    /// whole text (the cut points are where the pre-tokenizer cuts anyway), and so does the
    /// tokenizer, which works in pieces on long texts.
    #[test]
    fn pieces_encode_exactly_as_the_whole_text(text in wordy_text(), max in 40usize..120) {
        let tok = shared_bpe();
        let hf = raw_hf(tok);
        let (ids, offsets) = whole_encoding(&hf, &text);
        let (mut got_ids, mut got_offsets) = (Vec::new(), Vec::new());
        for (start, piece) in text_chunks(&text, max) {
            let (i, o) = whole_encoding(&hf, piece);
            got_ids.extend(i);
            got_offsets.extend(o.into_iter().map(|(a, b)| (a + start, b + start)));
        }
        prop_assert_eq!(&got_ids, &ids);
        prop_assert_eq!(&got_offsets, &offsets);
        let enc = tok.encode_with_offsets(&text).unwrap();
        prop_assert_eq!(enc.ids, ids);
        prop_assert_eq!(enc.offsets, offsets);
    }
}

/// Some built-in documents joined into one text of `n` bytes or more, with their labels.
fn long_labelled_text(n: usize) -> (String, Vec<u8>) {
    let (mut text, mut labels) = (String::new(), Vec::new());
    let mut i = 0;
    while text.len() < n {
        let d = builtin_doc(5, i);
        text.push_str(&d.text);
        labels.extend_from_slice(&d.labels);
        text.push(' ');
        labels.push(EASY);
        i += 1;
    }
    (text, labels)
}

#[test]
fn long_texts_tokenize_and_train_as_whole_texts() {
    let tok = shared_bpe();
    assert!(tok.is_chunk_exact() && Tokenizer::byte_level().is_chunk_exact());
    let hf = raw_hf(tok);
    // A text several pieces long: the same ids, offsets, byte counts and labels as encoding
    // it whole.
    let (text, labels) = long_labelled_text(3 * CHUNK_BYTES + 1000);
    assert!(tok.encoding_chunks(&text).len() >= 4);
    let (ids, offsets) = whole_encoding(&hf, &text);
    assert_eq!(tok.encode(&text).unwrap(), ids);
    let enc = tok.encode_with_offsets(&text).unwrap();
    assert_eq!((&enc.ids, &enc.offsets), (&ids, &offsets));
    let whole = mor_models::tokenizer::Encoding {
        ids: ids.clone(),
        offsets: offsets.clone(),
    };
    let doc = TokenizedDoc::from_text(tok, &text, Some(&labels)).unwrap();
    assert_eq!(doc.ids, ids);
    assert_eq!(doc.bytes, whole.byte_counts(text.len()));
    assert_eq!(
        doc.labels.unwrap(),
        label_tokens(&text, &labels, &whole.offsets)
    );
    // The byte-level tokenizer: one token per byte, each counting one byte and carrying its
    // byte's label.
    let doc = TokenizedDoc::from_text(&Tokenizer::byte_level(), &text, Some(&labels)).unwrap();
    assert_eq!(doc.ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(doc.bytes, vec![1; text.len()]);
    assert_eq!(doc.labels.unwrap(), labels);
    // Training on the pieces of a text learns the merges of the whole text: for a text of
    // one piece (trained whole) and for a text of several (trained in pieces).
    for n in [CHUNK_BYTES / 2, 3 * CHUNK_BYTES] {
        let (text, _) = long_labelled_text(n);
        let pieces: Vec<&str> = text_chunks(&text, 300).map(|(_, p)| p).collect();
        assert!(pieces.len() > 10);
        assert_eq!(
            Tokenizer::train_bpe(&[text.as_str()], 400)
                .unwrap()
                .to_json()
                .unwrap(),
            Tokenizer::train_bpe(&pieces, 400)
                .unwrap()
                .to_json()
                .unwrap(),
            "text of {} bytes",
            text.len()
        );
    }
}

#[test]
fn tokenizers_with_a_normalizer_encode_texts_up_to_a_mebibyte_whole() {
    let mut json: serde_json::Value =
        serde_json::from_str(&shared_bpe().to_json().unwrap()).unwrap();
    json["normalizer"] = serde_json::json!({ "type": "Lowercase" });
    let tok = Tokenizer::from_json_str(&json.to_string(), "lowercase BPE").unwrap();
    assert!(!tok.is_chunk_exact());
    let (text, _) = long_labelled_text(3 * CHUNK_BYTES);
    assert_eq!(tok.encoding_chunks(&text), vec![(0, text.as_str())]);
    let (ids, _) = whole_encoding(&raw_hf(&tok), &text);
    assert_eq!(tok.encode(&text).unwrap(), ids);
    let big = "word ".repeat(WHOLE_TEXT_MAX_BYTES / 5 + 10);
    let chunks = tok.encoding_chunks(&big);
    assert!(chunks.len() == 2 && chunks.iter().all(|c| c.1.len() <= WHOLE_TEXT_MAX_BYTES));
}

#[test]
fn tokenizer_file_errors_are_clear() {
    let dir = temp_dir("tokerr");
    let msg = err_string(Tokenizer::from_file(&dir.join("nope.json")));
    assert!(
        msg.contains("nope.json") && msg.contains("does not exist"),
        "{msg}"
    );
    write(&dir.join("broken.json"), "{");
    assert!(err_string(Tokenizer::from_file(&dir.join("broken.json"))).contains("not valid JSON"));
    // A valid tokenizer without an end-of-text token.
    let json = Tokenizer::byte_level()
        .to_json()
        .unwrap()
        .replace(EOS_TOKEN, "<pad>");
    write(&dir.join("noeos.json"), &json);
    let msg = err_string(Tokenizer::from_file(&dir.join("noeos.json")));
    assert!(msg.contains("no end-of-text token"), "{msg}");
}

// ----------------------------------------------------------------------------------------
// The built-in corpus.

#[test]
fn builtin_corpus_is_deterministic_per_seed() {
    let a = builtin_docs(7, 30);
    assert_eq!(a, builtin_docs(7, 30));
    assert_ne!(a, builtin_docs(8, 30));
    assert_eq!(builtin_doc(7, 5), a[5]);
    assert_eq!(builtin_docs(7, 10)[..], a[..10]);
}

fn is_num(w: &str) -> bool {
    !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit())
}

/// Byte positions a separate, naive reading of the text says are computed, checking each
/// construct on the way. Returns the positions and how many of each construct were seen.
fn naive_computed(text: &str) -> (Vec<usize>, [usize; 4]) {
    let mut out = Vec::new();
    let mut seen = [0usize; 4];
    // Words with their byte offsets (split on spaces and newlines; keep punctuation).
    let mut words: Vec<(usize, &str)> = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        if c == ' ' || c == '\n' {
            if let Some(s) = start.take() {
                words.push((s, &text[s..i]));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    let strip = |w: &str| w.trim_end_matches('.').to_string();
    // The hero: the word after "named" in the first sentence.
    let hero = strip(
        words
            .iter()
            .position(|w| w.1 == "named")
            .map(|i| words[i + 1].1)
            .unwrap(),
    );
    for i in 0..words.len() {
        // Arithmetic: a op b = c.
        if words[i].1 == "=" {
            let (a, op, b) = (words[i - 3].1, words[i - 2].1, words[i - 1].1);
            let c = strip(words[i + 1].1);
            assert!(is_num(a) && is_num(b) && is_num(&c), "{a} {op} {b} = {c}");
            let (a, b, c): (u64, u64, u64) =
                (a.parse().unwrap(), b.parse().unwrap(), c.parse().unwrap());
            let want = match op {
                "+" => a + b,
                "-" => a - b,
                "*" => a * b,
                _ => panic!("operator {op}"),
            };
            assert_eq!(c, want, "{a} {op} {b} = {c}");
            out.extend(words[i + 1].0..words[i + 1].0 + c.to_string().len());
            seen[0] += 1;
        }
        // Brackets: a run starting after "drew".
        if words[i].1 == "drew" && i + 1 < words.len() && "([{".contains(words[i + 1].1) {
            let mut stack = Vec::new();
            let mut j = i + 1;
            while j < words.len() && words[j].1.len() == 1 && "()[]{}".contains(words[j].1) {
                let ch = words[j].1.chars().next().unwrap();
                match ch {
                    '(' | '[' | '{' => stack.push(ch),
                    _ => {
                        let open = stack.pop().expect("closer without opener");
                        assert!(
                            matches!((open, ch), ('(', ')') | ('[', ']') | ('{', '}')),
                            "{open}{ch}"
                        );
                        out.push(words[j].0);
                    }
                }
                j += 1;
            }
            assert!(stack.is_empty(), "unbalanced brackets in {text}");
            assert_eq!(
                words[j].1, "on",
                "the bracket run ends balanced before \"on the wall\""
            );
            seen[1] += 1;
        }
        // Sorting: sorted xs into ys.
        if words[i].1 == "sorted" {
            let into = (i..words.len()).find(|&j| words[j].1 == "into").unwrap();
            let mut xs: Vec<u32> = words[i + 1..into]
                .iter()
                .map(|w| w.1.parse().unwrap())
                .collect();
            let k = xs.len();
            let ys: Vec<u32> = words[into + 1..into + 1 + k]
                .iter()
                .map(|w| strip(w.1).parse().unwrap())
                .collect();
            xs.sort_unstable();
            assert_eq!(xs, ys);
            for w in &words[into + 1..into + 1 + k] {
                out.extend(w.0..w.0 + strip(w.1).len());
            }
            seen[3] += 1;
        }
    }
    // Copies: the name after each cue is the hero.
    for cue in mor_models::data::builtin::COPY_CUES {
        for (pos, _) in text.match_indices(cue) {
            let s = pos + cue.len();
            let name: String = text[s..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            assert_eq!(name, hero, "a copy names the hero");
            out.extend(s..s + name.len());
            seen[2] += 1;
        }
    }
    out.sort_unstable();
    (out, seen)
}

#[test]
fn builtin_spans_are_correct_and_labels_mark_exactly_the_computed_bytes() {
    let mut totals = [0usize; 4];
    for d in builtin_docs(3, 150) {
        assert_eq!(d.labels.len(), d.text.len());
        let (want, seen) = naive_computed(&d.text);
        let got: Vec<usize> = (0..d.labels.len())
            .filter(|&i| d.labels[i] == COMPUTED)
            .collect();
        assert_eq!(got, want, "computed bytes of {:?}", d.text);
        assert!(d.labels.iter().all(|&l| l <= COMPUTED));
        // Spaces and punctuation are easy; the hero's introduction is content.
        for (i, b) in d.text.bytes().enumerate() {
            if b == b' ' || b == b'.' || b == b'\n' || b == b'=' || b == b'+' {
                assert_eq!(d.labels[i], EASY, "byte {i} {:?}", b as char);
            }
        }
        let named = d.text.find(" named ").unwrap() + 7;
        assert_eq!(d.labels[named], CONTENT);
        // The reported spans agree with the text.
        for k in 0..4 {
            totals[k] += seen[k];
        }
        let kinds = [
            SpanKind::Arithmetic,
            SpanKind::Brackets,
            SpanKind::Copy,
            SpanKind::Sort,
        ];
        for (k, kind) in kinds.iter().enumerate() {
            assert_eq!(
                d.spans.iter().filter(|s| s.kind == *kind).count(),
                seen[k],
                "{kind:?}"
            );
        }
        for s in &d.spans {
            assert!(d.labels[s.start..s.end].contains(&COMPUTED));
        }
    }
    assert!(
        totals.iter().all(|&n| n > 30),
        "every construct occurs: {totals:?}"
    );
}

#[test]
fn token_labels_take_the_max_over_each_tokens_bytes() {
    assert_eq!(
        label_tokens(
            "abcd",
            &[0, 2, 1, 0],
            &[(0, 1), (1, 3), (3, 4), (4, 4), (2, 9)]
        ),
        vec![0, 2, 0, 0, 1]
    );
    let (tok, _) = trained_bpe();
    for d in builtin_docs(9, 20) {
        let enc = tok.encode_with_offsets(&d.text).unwrap();
        let labels = label_tokens(&d.text, &d.labels, &enc.offsets);
        assert_eq!(labels.len(), enc.ids.len());
        for (k, &(s, e)) in enc.offsets.iter().enumerate() {
            let naive = (s..e).map(|i| d.labels[i]).max().unwrap_or(0);
            assert_eq!(labels[k], naive);
        }
        // Every computed byte lands in a computed token.
        let computed_bytes = d.labels.iter().filter(|&&l| l == COMPUTED).count();
        let covered: usize = enc
            .offsets
            .iter()
            .zip(&labels)
            .filter(|(_, &l)| l == COMPUTED)
            .map(|(&(s, e), _)| (s..e).filter(|&i| d.labels[i] == COMPUTED).count())
            .sum();
        assert_eq!(covered, computed_bytes);
    }
}

#[test]
fn builtin_dataset_with_bpe_labels_targets_and_saves_the_tokenizer() {
    let dir = temp_dir("run");
    let cfg = DataConfig {
        builtin_docs: 60,
        seq_len: 64,
        vocab_size: 384,
        val_fraction: 0.1,
        seed: 4,
        ..DataConfig::default()
    };
    let data = Dataset::prepare(&cfg, Some(&dir)).unwrap();
    assert_eq!(data.tokenizer().kind(), TokenizerKind::Hf);
    assert!(dir.join(TOKENIZER_FILE).is_file());
    let s = data.stats();
    assert_eq!(
        (s.documents, s.train_documents, s.val_documents),
        (60, 54, 6)
    );
    let docs = builtin_docs(4, 60);
    assert_eq!(
        s.train_bytes + s.val_bytes,
        docs.iter().map(|d| d.text.len() as u64).sum::<u64>()
    );
    assert!(s.to_string().contains("60 documents"));
    // Each token's byte count is exact: the stream's bytes sum to the text's.
    assert_eq!(
        data.train()
            .token_bytes()
            .iter()
            .map(|&b| b as u64)
            .sum::<u64>(),
        s.train_bytes
    );
    // Difficulty of each target = the label of that token in the stream.
    let batch = data.train_batches(2, None).unwrap().next().unwrap();
    let diff = batch.difficulty.as_ref().unwrap();
    assert_eq!(diff.len(), batch.targets.len());
    assert!(diff.contains(&COMPUTED) || diff.contains(&CONTENT));
    let labels = data.train().token_labels().unwrap();
    let eos = data.tokenizer().eos_id();
    for (p, &id) in data.train().tokens().iter().enumerate() {
        if id == eos {
            assert_eq!(labels[p], CONTENT);
        }
    }
    // Preparing again in the same run folder reuses the saved tokenizer: identical streams.
    let again = Dataset::prepare(&cfg, Some(&dir)).unwrap();
    assert_eq!(again.train().tokens(), data.train().tokens());
    assert_eq!(
        again.tokenizer().to_json().unwrap(),
        data.tokenizer().to_json().unwrap()
    );
}

// ----------------------------------------------------------------------------------------
// Multiple-choice tasks.

#[test]
fn builtin_mc_tasks_have_one_right_answer() {
    let sets = builtin_mc_tasks(3, 25);
    assert_eq!(
        sets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        BUILTIN_TASKS
    );
    assert_eq!(sets, builtin_mc_tasks(3, 25));
    for set in &sets {
        assert_eq!(set.items.len(), 25);
        let mut gold_positions = std::collections::HashSet::new();
        for item in &set.items {
            assert!(item.gold < item.choices.len());
            gold_positions.insert(item.gold);
            let mut uniq = item.choices.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), item.choices.len(), "distinct choices");
            assert!(
                !item.context.ends_with(' ') && item.choices.iter().all(|c| c.starts_with(' '))
            );
            let gold = item.choices[item.gold].trim();
            let words: Vec<&str> = item.context.split(' ').collect();
            match set.name.as_str() {
                "arithmetic" => {
                    let n = words.len();
                    let (a, op, b): (i64, &str, i64) = (
                        words[n - 4].parse().unwrap(),
                        words[n - 3],
                        words[n - 2].parse().unwrap(),
                    );
                    let c = match op {
                        "+" => a + b,
                        "-" => a - b,
                        _ => a * b,
                    };
                    assert_eq!(gold, c.to_string());
                }
                "brackets" => {
                    let mut stack = Vec::new();
                    for w in &words[2..] {
                        match *w {
                            "(" => stack.push(")"),
                            "[" => stack.push("]"),
                            "{" => stack.push("}"),
                            _ => {
                                stack.pop();
                            }
                        }
                    }
                    assert_eq!(Some(&gold), stack.last());
                }
                "copy" => {
                    let hero = item
                        .context
                        .split(" named ")
                        .nth(1)
                        .unwrap()
                        .split('.')
                        .next()
                        .unwrap();
                    assert_eq!(gold, hero);
                }
                "sorting" => {
                    let into = words.iter().position(|w| *w == "into").unwrap();
                    let mut xs: Vec<u32> =
                        words[2..into].iter().map(|w| w.parse().unwrap()).collect();
                    xs.sort_unstable();
                    let want: Vec<String> = xs.iter().map(u32::to_string).collect();
                    assert_eq!(gold, want.join(" "));
                }
                _ => {
                    assert_eq!(item.choices.len(), 2);
                    // The third-person form ends in "s"; plural nouns here do too, except irregular ones.
                    let (sg_verb, pl_verb) = if item.choices[0].len() > item.choices[1].len() {
                        (&item.choices[0], &item.choices[1])
                    } else {
                        (&item.choices[1], &item.choices[0])
                    };
                    let noun = words[2];
                    let plural = noun.ends_with('s') || ["children", "mice"].contains(&noun);
                    assert_eq!(
                        item.choices[item.gold],
                        if plural {
                            pl_verb.clone()
                        } else {
                            sg_verb.clone()
                        },
                        "{noun}"
                    );
                }
            }
        }
        assert!(
            gold_positions.len() > 1,
            "{}: the gold position varies",
            set.name
        );
    }
}

#[test]
fn mc_task_files_parse_and_name_bad_lines() {
    let dir = temp_dir("mc");
    let f = dir.join("piqa_mini.jsonl");
    write(
        &f,
        "{\"context\": \"To boil water\", \"choices\": [\" heat it\", \" cool it\"], \"gold\": 0, \"extra\": 1}\n\n\
         {\"context\": \"2 + 2 =\", \"choices\": [\" 3\", \" 4\", \" 5\"], \"gold\": 1}\n",
    );
    let set = load_mc_tasks(&f).unwrap();
    assert_eq!(set.name, "piqa_mini");
    assert_eq!(set.items.len(), 2);
    assert_eq!(set.items[1].choices[set.items[1].gold], " 4");
    let cases = [
        (
            "{\"context\": \"x\", \"choices\": [\" a\", \" b\"], \"gold\": 5}",
            "`gold` = 5 is out of range for 2 choices",
        ),
        (
            "{\"context\": \"x\", \"choices\": [\" a\", \" b\"], \"gold\": -1}",
            "non-negative integer",
        ),
        (
            "{\"choices\": [\" a\", \" b\"], \"gold\": 0}",
            "missing field `context`",
        ),
        (
            "{\"context\": \"x\", \"choices\": [\" a\"], \"gold\": 0}",
            "at least 2 entries",
        ),
        (
            "{\"context\": \"x\", \"choices\": [\" a\", 3], \"gold\": 0}",
            "choices[1] is not a string",
        ),
        ("[1, 2]", "expected a JSON object"),
        (
            "{\"context\": \"\", \"choices\": [\" a\", \" b\"], \"gold\": 0}",
            "field `context` is \"\": it must hold text",
        ),
        (
            "{\"context\": \" \\n\", \"choices\": [\" a\", \" b\"], \"gold\": 0}",
            "field `context` is \" \\n\": it must hold text",
        ),
        (
            "{\"context\": \"x\", \"choices\": [\" a\", \"\"], \"gold\": 0}",
            "choices[1] is \"\": every choice must hold text",
        ),
        (
            "{\"context\": \"x\", \"choices\": [\"  \", \" b\"], \"gold\": 1}",
            "choices[0] is \"  \": every choice must hold text",
        ),
        (
            "{\"context\": \"x\", \"choices\": [], \"gold\": 0}",
            "`choices` needs at least 2 entries, got 0",
        ),
    ];
    for (line, want) in cases {
        let g = dir.join("bad.jsonl");
        write(
            &g,
            &format!(
                "{{\"context\": \"ok\", \"choices\": [\" a\", \" b\"], \"gold\": 1}}\n{line}\n"
            ),
        );
        let msg = err_string(load_mc_tasks(&g));
        assert!(msg.contains("bad.jsonl:2:") && msg.contains(want), "{msg}");
    }
    assert!(err_string(load_mc_tasks(&dir.join("none.jsonl"))).contains("does not exist"));
}

// ----------------------------------------------------------------------------------------
// Corpus statistics.

#[test]
fn corpus_stats_match_an_independent_count() {
    let dir = temp_dir("stats");
    // Three documents of distinct lengths; one is held out for validation.
    let texts = [
        "Short one.".to_string(),
        "A second document, somewhat longer than the first.".to_string(),
        "The third document is the longest of all three: ".repeat(3),
    ];
    for (i, t) in texts.iter().enumerate() {
        write(&dir.join(format!("{i}.txt")), t);
    }
    let total_bytes: usize = texts.iter().map(String::len).sum();
    for (tokenizer, vocab) in [("byte", 300), ("bpe", 320)] {
        let cfg = DataConfig {
            source: dir.display().to_string(),
            tokenizer: tokenizer.into(),
            val_fraction: 0.34,
            seq_len: 8,
            vocab_size: vocab,
            ..DataConfig::default()
        };
        let data = Dataset::prepare(&cfg, None).unwrap();
        let s = data.corpus_stats();
        assert_eq!(s.source, dir.display().to_string());
        assert_eq!(s.tokenizer_choice, tokenizer);
        assert_eq!((s.documents, s.train_documents, s.val_documents), (3, 2, 1));
        assert_eq!(s.vocab_size, vocab);
        assert_eq!(s.tokenizer_vocab, data.tokenizer().vocab_size());
        // Each document's tokens, counted here with the dataset's tokenizer, plus one EOS.
        let counts: Vec<(usize, usize)> = texts
            .iter()
            .map(|t| (data.tokenizer().encode(t).unwrap().len() + 1, t.len()))
            .collect();
        let held_out: Vec<&(usize, usize)> = counts
            .iter()
            .filter(|&&(_, bytes)| bytes as u64 == s.val_bytes)
            .collect();
        assert_eq!(held_out.len(), 1, "{s}");
        assert_eq!(s.val_tokens, held_out[0].0);
        assert_eq!(
            s.train_tokens + s.val_tokens,
            counts.iter().map(|c| c.0).sum::<usize>()
        );
        assert_eq!(s.train_bytes + s.val_bytes, total_bytes as u64);
        if tokenizer == "byte" {
            assert_eq!(s.tokenizer, "byte");
            assert_eq!(s.train_tokens + s.val_tokens, total_bytes + 3);
        } else {
            assert_eq!(s.tokenizer, "hf");
            assert!(s.train_tokens + s.val_tokens < total_bytes);
        }
        let line = s.to_string();
        assert!(
            line.contains("3 documents (2 train / 1 val)")
                && line.contains(&format!(
                    "tokens {} train / {} val",
                    s.train_tokens, s.val_tokens
                ))
                && line.contains(&format!("model vocabulary {vocab}")),
            "{line}"
        );
        let back: CorpusStats = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}

// ----------------------------------------------------------------------------------------
// Errors.

#[test]
fn bad_sources_give_clear_errors() {
    let dir = temp_dir("errors");
    let missing = dir.join("no/such/place");
    let msg = err_string(Dataset::prepare(&byte_cfg(missing.to_str().unwrap()), None));
    assert!(
        msg.contains("does not exist") && msg.contains("no/such/place"),
        "{msg}"
    );

    let empty = dir.join("empty");
    write(&empty.join("a.txt"), "");
    write(&empty.join("sub/b.txt"), "  \n\n ");
    let msg = err_string(Dataset::prepare(&byte_cfg(empty.to_str().unwrap()), None));
    assert!(
        msg.contains("is empty") && msg.contains("no non-empty document") && msg.contains("empty"),
        "{msg}"
    );

    let unsupported = dir.join("docs");
    write(&unsupported.join("README.md"), "not data");
    write(&unsupported.join("x/data.csv"), "a,b");
    let msg = err_string(Dataset::prepare(
        &byte_cfg(unsupported.to_str().unwrap()),
        None,
    ));
    assert!(
        msg.contains("contains no supported data file")
            && msg.contains(".jsonl")
            && msg.contains("docs"),
        "{msg}"
    );

    let msg = err_string(Dataset::prepare(
        &byte_cfg(unsupported.join("README.md").to_str().unwrap()),
        None,
    ));
    assert!(
        msg.contains("README.md") && msg.contains("unsupported extension"),
        "{msg}"
    );

    // Settings.
    let cfg = DataConfig {
        val_fraction: 1.5,
        ..byte_cfg("builtin")
    };
    assert!(err_string(Dataset::prepare(&cfg, None)).contains("`val_fraction`: must be in [0, 1)"));
    let cfg = DataConfig {
        vocab_size: 100,
        ..byte_cfg("builtin")
    };
    assert!(err_string(Dataset::prepare(&cfg, None))
        .contains("the tokenizer has 257 ids but the model's vocab_size is 100"));
    let cfg = DataConfig {
        tokenizer: "/no/tokenizer.json".into(),
        ..byte_cfg("builtin")
    };
    assert!(err_string(Dataset::prepare(&cfg, None)).contains("nor an existing tokenizer.json"));
    let cfg = DataConfig {
        tokenizer: "auto".into(),
        vocab_size: 200,
        ..byte_cfg("builtin")
    };
    assert!(err_string(Dataset::prepare(&cfg, None)).contains("below the 257 ids"));
    let cfg = DataConfig {
        builtin_docs: 3,
        seq_len: 100_000,
        ..byte_cfg("builtin")
    };
    assert!(err_string(Dataset::prepare(&cfg, None)).contains("fewer than seq_len + 1"));
    let cfg = DataConfig {
        builtin_docs: 20,
        seq_len: 1000,
        val_fraction: 0.05,
        ..byte_cfg("builtin")
    };
    assert!(err_string(Dataset::prepare(&cfg, None)).contains("the validation split has"));
    let data = builtin_byte(1, true, false);
    assert!(err_string(data.train_batches(0, None)).contains("does not fit"));
    assert!(err_string(data.train_batches(1_000_000, None)).contains("does not fit"));
}

/// Tokenization speed on a few MB of built-in text (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn tokenization_throughput() {
    let t0 = std::time::Instant::now();
    let cfg = DataConfig {
        builtin_docs: 6000,
        seq_len: 256,
        vocab_size: 2048,
        ..DataConfig::default()
    };
    let data = Dataset::prepare(&cfg, None).unwrap();
    let s = data.stats();
    let mb = (s.train_bytes + s.val_bytes) as f64 / 1e6;
    println!("{s}");
    println!(
        "{mb:.2} MB: tokenize {:.2}s ({:.1} MB/s), total prepare incl. generation and BPE training {:.2}s",
        s.tokenize_secs,
        mb / s.tokenize_secs,
        t0.elapsed().as_secs_f64()
    );
}
