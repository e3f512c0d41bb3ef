//! The record of the data a run was trained on (`data.json` in the run folder).
//!
//! A path source is recorded by its absolute path, its file count, its total size and a
//! content fingerprint: 64-bit FNV-1a over every data file's path (relative to the source),
//! size and bytes, in the reader's file order. The built-in corpus is recorded by its
//! generator settings (documents, seed) and the same fingerprint over the generated texts, so
//! a change of the generator shows too. `train --resume` and `eval` compare the data they are
//! about to use with this record and refuse a difference.

use crate::checkpoint::Fnv64;
use crate::data::{readers, DataConfig, Source};
use crate::{Error, Result};
use std::path::Path;

/// The file name of the record inside a run folder.
pub const DATA_FILE: &str = "data.json";

/// What identifies a run's data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataRecord {
    /// `builtin`, or the absolute path of the file or folder.
    pub source: String,
    /// Data files read (1 for the built-in corpus).
    pub files: u64,
    /// Total bytes of those files (of the generated texts for the built-in corpus).
    pub bytes: u64,
    /// FNV-1a 64 of every file's relative path, size and contents, hex.
    pub fingerprint: String,
    /// Documents of the built-in corpus (`data.builtin_docs`), when it is the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin_docs: Option<usize>,
    /// Seed of the built-in corpus, when it is the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin_seed: Option<u64>,
}

impl DataRecord {
    /// Reads and fingerprints the data `cfg` names (streaming the files in 1 MiB pieces).
    ///
    /// # Errors
    /// When the source is missing or unreadable, naming it.
    pub fn of(cfg: &DataConfig) -> Result<DataRecord> {
        let mut h = Fnv64::default();
        match cfg.source() {
            Source::Builtin => {
                let docs = crate::data::builtin_docs(cfg.seed, cfg.builtin_docs);
                let mut bytes = 0u64;
                for d in &docs {
                    h.update(&(d.text.len() as u64).to_le_bytes());
                    h.update(d.text.as_bytes());
                    bytes += d.text.len() as u64;
                }
                Ok(DataRecord {
                    source: "builtin".into(),
                    files: 1,
                    bytes,
                    fingerprint: format!("{:016x}", h.0),
                    builtin_docs: Some(cfg.builtin_docs),
                    builtin_seed: Some(cfg.seed),
                })
            }
            Source::Path(p) => {
                let files = readers::list_files(&p)?;
                let abs = std::fs::canonicalize(&p).map_err(|e| Error::io(&p, e))?;
                let mut bytes = 0u64;
                for (f, _) in &files {
                    // The path as the folder lists it (a symbolic link inside the folder is
                    // named by its own name, not its target's), so a moved copy of the same
                    // folder gives the same fingerprint.
                    let rel = if p.is_dir() {
                        f.strip_prefix(&p).unwrap_or(f)
                    } else {
                        Path::new(f.file_name().unwrap_or_default())
                    };
                    let rel = rel.to_string_lossy();
                    h.update(&(rel.len() as u64).to_le_bytes());
                    h.update(rel.as_bytes());
                    let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
                    let len = file.metadata().map_err(|e| Error::io(f, e))?.len();
                    h.update(&len.to_le_bytes());
                    bytes += h.update_from(&mut file, f)?;
                }
                Ok(DataRecord {
                    source: abs.display().to_string(),
                    files: files.len() as u64,
                    bytes,
                    fingerprint: format!("{:016x}", h.0),
                    builtin_docs: None,
                    builtin_seed: None,
                })
            }
        }
    }

    /// Reads `dir/data.json`; `None` when the run has no record.
    ///
    /// # Errors
    /// When the file exists but is not a valid record.
    pub fn read(dir: &Path) -> Result<Option<DataRecord>> {
        let p = dir.join(DATA_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::msg(format!("{}: not a valid data record: {e}", p.display())))
    }

    /// Writes `dir/data.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::msg(e.to_string()))?;
        crate::checkpoint::write_atomic(&dir.join(DATA_FILE), &json)
    }

    /// Whether `other` is the same data: same contents (fingerprint, size and file count);
    /// the path may differ (moved data is the same data).
    pub fn same_data(&self, other: &DataRecord) -> bool {
        self.fingerprint == other.fingerprint
            && self.bytes == other.bytes
            && self.files == other.files
    }

    /// A one-line description: source, files, bytes and fingerprint.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} file(s), {} bytes, fingerprint {})",
            self.source, self.files, self.bytes, self.fingerprint
        )
    }
}

/// The data settings of `cfg` with `source` as the source.
pub fn with_source(cfg: &DataConfig, source: &str) -> DataConfig {
    DataConfig {
        source: source.to_string(),
        ..cfg.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(source: &str) -> DataConfig {
        DataConfig {
            source: source.into(),
            tokenizer: "byte".into(),
            text_column: "text".into(),
            doc_masking: false,
            shuffle: true,
            val_fraction: 0.1,
            builtin_docs: 10,
            seq_len: 16,
            vocab_size: 300,
            seed: 3,
        }
    }

    #[test]
    fn fingerprint_follows_contents_not_location() -> Result<()> {
        let root = std::env::temp_dir().join(format!("mor-prov-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["a", "b"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            std::fs::write(root.join(d).join("x.txt"), "one\ntwo\n").unwrap();
            std::fs::write(root.join(d).join("y.txt"), "three\n").unwrap();
        }
        let a = DataRecord::of(&cfg(&root.join("a").display().to_string()))?;
        let b = DataRecord::of(&cfg(&root.join("b").display().to_string()))?;
        assert_eq!((a.files, a.bytes), (2, 14));
        assert!(a.same_data(&b), "same files in another folder");
        assert_ne!(a.source, b.source);
        // One byte changed, same size: a different fingerprint.
        std::fs::write(root.join("b").join("y.txt"), "thref\n").unwrap();
        let b2 = DataRecord::of(&cfg(&root.join("b").display().to_string()))?;
        assert_eq!(b2.bytes, b.bytes);
        assert!(!a.same_data(&b2));
        // The contents moved between files: different (paths are hashed).
        std::fs::write(root.join("b").join("x.txt"), "one\ntwo\nthree\n").unwrap();
        std::fs::write(root.join("b").join("y.txt"), "").unwrap();
        let b3 = DataRecord::of(&cfg(&root.join("b").display().to_string()))?;
        assert_eq!(b3.bytes, a.bytes);
        assert!(!a.same_data(&b3));
        // Missing data is an error naming the path.
        let err = DataRecord::of(&cfg(&root.join("gone").display().to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gone"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    /// A file linked into the data folder by a relative symbolic link is named by its name
    /// in the folder: moving the whole tree (folder and link targets) keeps the fingerprint.
    #[cfg(unix)]
    #[test]
    fn a_linked_file_keeps_its_fingerprint_when_the_tree_moves() -> Result<()> {
        let base = std::env::temp_dir().join(format!("mor-prov-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let one = base.join("one");
        std::fs::create_dir_all(one.join("data")).unwrap();
        std::fs::create_dir_all(one.join("shared")).unwrap();
        std::fs::write(one.join("data/a.txt"), "alpha\n").unwrap();
        std::fs::write(one.join("shared/t.txt"), "tau\n").unwrap();
        std::os::unix::fs::symlink("../shared/t.txt", one.join("data/link.txt")).unwrap();
        let before = DataRecord::of(&cfg(&one.join("data").display().to_string()))?;
        assert_eq!((before.files, before.bytes), (2, 10));
        let two = base.join("two");
        std::fs::rename(&one, &two).unwrap();
        let after = DataRecord::of(&cfg(&two.join("data").display().to_string()))?;
        assert!(before.same_data(&after), "{before:?} vs {after:?}");
        let _ = std::fs::remove_dir_all(&base);
        Ok(())
    }

    #[test]
    fn builtin_records_its_settings() -> Result<()> {
        let a = DataRecord::of(&cfg("builtin"))?;
        assert_eq!(a.source, "builtin");
        assert_eq!((a.builtin_docs, a.builtin_seed), (Some(10), Some(3)));
        let mut c = cfg("builtin");
        c.builtin_docs = 11;
        assert!(!a.same_data(&DataRecord::of(&c)?));
        assert!(a.same_data(&DataRecord::of(&cfg("builtin"))?));
        Ok(())
    }
}
