//! Memory of the data pipeline on a text made of one multi-megabyte line: every stage (the
//! `.txt` and `.jsonl` readers, BPE training, tokenization and `Dataset::prepare`) must stay
//! within a few times the input size, whatever the line length.
//!
//! A counting global allocator records the live heap bytes and their peak; each stage is
//! measured as its peak above the live bytes when it starts. The whole file is one test, so no
//! other test allocates while a stage is measured.

use mor_core::rng::Rng;
use mor_models::data::readers;
use mor_models::data::{DataConfig, Dataset, TokenizedDoc};
use mor_models::tokenizer::Tokenizer;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to `System` with the same arguments; the counters only
// observe the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the peak heap bytes above those live at its start.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

/// A fresh empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("mor-long-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// `n` bytes of English-like text without a newline: words from a small vocabulary with
/// spaces, punctuation and numbers, drawn from a fixed seed.
fn long_line(n: usize) -> String {
    const WORDS: [&str; 24] = [
        "the", "river", "ran", "past", "an", "old", "mill,", "and", "children", "counted", "42",
        "stones;", "nobody", "knew", "why", "it's", "quiet.", "Later", "they", "wrote", "1907",
        "letters", "home", "again",
    ];
    let mut rng = Rng::new(7);
    let mut s = String::with_capacity(n + 16);
    while s.len() < n {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.below(WORDS.len())]);
    }
    s.truncate(n);
    s
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Peak of `f` in multiples of `input` bytes, printed with `what`.
fn ratio_of<T>(what: &str, input: usize, f: impl FnOnce() -> T) -> (T, f64) {
    let (out, peak) = peak_of(f);
    let r = peak as f64 / input as f64;
    eprintln!("{what}: peak {peak} bytes = {r:.2} x the input");
    (out, r)
}

/// Every stage on a 4 MiB line, on two threads (the per-thread working memory of the
/// tokenizer is a constant, a few megabytes, so the thread count is pinned). The bounds are
/// what each stage must hold at least once (the text, the token ids and byte counts, 8 bytes
/// per token: about 1.7 x the text for this BPE, 8 x for the byte-level tokenizer) plus a
/// margin; before the readers and the tokenizer worked in pieces the same stages took 3 x
/// (readers), 81 x (BPE training and encoding) and 24 x (byte-level).
#[test]
fn a_multi_megabyte_line_stays_within_a_few_times_its_size() {
    const N: usize = 4 << 20;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let dir = temp_dir("line");
        let line = long_line(N);
        assert!(!line.contains('\n') && line.len() == N);
        let txt = dir.0.join("book.txt");
        write(&txt, &line);

        // Readers: the file once, plus the document for JSONL (the text is moved out).
        let (docs, r) = ratio_of("read_txt", N, || readers::read_txt(&txt).unwrap());
        assert_eq!(docs, vec![line.trim_end().to_string()]);
        assert!(r <= 1.5, "read_txt took {r:.2} x");
        drop(docs);
        let jsonl = dir.0.join("book.jsonl");
        write(
            &jsonl,
            &format!("{}\n", serde_json::json!({ "text": line, "id": 1 })),
        );
        let (docs, r) = ratio_of("read_jsonl", N, || {
            readers::read_jsonl(&jsonl, "text").unwrap()
        });
        assert_eq!(docs, vec![line.clone()]);
        assert!(r <= 2.5, "read_jsonl took {r:.2} x");
        drop(docs);
        std::fs::remove_file(&jsonl).unwrap();

        // BPE training: word counts of pieces, never the whole line at once, so its memory
        // does not grow with the line (this text has a fixed set of words).
        let eighth = &line[..N / 8];
        let (_, r_eighth) = ratio_of("train_bpe (an eighth of the line)", N, || {
            Tokenizer::train_bpe(&[eighth], 512).unwrap()
        });
        let (bpe, r) = ratio_of("train_bpe", N, || {
            Tokenizer::train_bpe(&[line.as_str()], 512).unwrap()
        });
        assert!(r <= 2.0, "BPE training took {r:.2} x");
        assert!(
            r <= 1.5 * r_eighth,
            "BPE training grew with the line: {r:.2} x vs {r_eighth:.2} x for an eighth"
        );
        assert!(bpe.is_chunk_exact());

        // Encoding: ids and byte counts of the pieces, then their concatenation.
        let (doc, r) = ratio_of("from_text (bpe)", N, || {
            TokenizedDoc::from_text(&bpe, &line, None).unwrap()
        });
        assert_eq!(doc.bytes.iter().map(|&b| b as usize).sum::<usize>(), N);
        assert!(r <= 3.5, "BPE encoding took {r:.2} x");
        drop(doc);
        let (doc, r) = ratio_of("from_text (byte)", N, || {
            TokenizedDoc::from_text(&Tokenizer::byte_level(), &line, None).unwrap()
        });
        assert_eq!(doc.ids.len(), N);
        assert!(r <= 8.5, "byte-level encoding took {r:.2} x");
        drop(doc);

        // The whole pipeline from the file.
        for (tokenizer, vocab, bound) in [("bpe", 512, 4.5), ("byte", 257, 9.5)] {
            let cfg = DataConfig {
                source: txt.display().to_string(),
                tokenizer: tokenizer.into(),
                val_fraction: 0.0,
                seq_len: 64,
                vocab_size: vocab,
                ..DataConfig::default()
            };
            let (data, r) = ratio_of(&format!("prepare ({tokenizer})"), N, || {
                Dataset::prepare(&cfg, None).unwrap()
            });
            assert_eq!(data.stats().train_bytes, N as u64);
            assert!(r <= bound, "prepare with {tokenizer} took {r:.2} x");
        }

        // A pre-tokenized file holding one document of N / 2 ids: the ids and byte counts
        // (4 bytes each) are 4 x the file.
        let ids: Vec<u32> = line.bytes().take(N / 2).map(u32::from).collect();
        let u16_file = dir.0.join("book.u16");
        readers::write_token_file(&u16_file, readers::FileKind::U16, &ids).unwrap();
        drop(ids);
        let cfg = DataConfig {
            source: u16_file.display().to_string(),
            tokenizer: "byte".into(),
            val_fraction: 0.0,
            seq_len: 64,
            vocab_size: 257,
            ..DataConfig::default()
        };
        let (data, r) = ratio_of("prepare (u16 tokens)", N, || {
            Dataset::prepare(&cfg, None).unwrap()
        });
        assert_eq!(data.stats().train_tokens, N / 2 + 1);
        assert!(r <= 4.5, "prepare from token file took {r:.2} x");
    });
}
