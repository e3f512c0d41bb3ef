//! Model files and training checkpoints, written atomically and validated on load.
//!
//! - Model weights: `model.safetensors` with Llama-style names for the unique blocks and a
//!   `config.json` beside it. Loading refuses a file whose tensor names, shapes or dtypes do
//!   not match the config, naming each mismatch.
//! - A training checkpoint is a folder `step-NNNNNNN/` with `model.safetensors`,
//!   `optim.safetensors` (AdamW moments), `state.json` (step, data position, RNG, schedule,
//!   router buffers, and the size and FNV-1a hash of every file). It is written into a
//!   temporary folder, every file fsynced, then renamed into place, the parent fsynced, and
//!   only then does the `latest` pointer (itself replaced by rename) move to it. A crash at
//!   any point leaves the previous checkpoint intact.

use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Format version of `state.json`.
pub const FORMAT_VERSION: u32 = 1;

/// Size and hash of one checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Bytes.
    pub bytes: u64,
    /// FNV-1a 64 of the contents, hex.
    pub fnv64: String,
}

/// 64-bit FNV-1a of `data`.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn digest(path: &Path) -> Result<FileDigest> {
    let data = fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(FileDigest {
        bytes: data.len() as u64,
        fnv64: format!("{:016x}", fnv64(&data)),
    })
}

fn fsync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn fsync_dir(path: &Path) -> Result<()> {
    // Directory fsync makes the rename durable; not every platform supports it.
    match fs::File::open(path) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync_dir(dir)
}

/// Saves named tensors as safetensors at `path` (not atomic by itself).
fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    fsync_file(path)
}

/// Loads safetensors, mapping parse failures to a checkpoint refusal.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::Checkpoint {
            path: path.into(),
            reason: "file not found".into(),
        });
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Checkpoint {
        path: path.into(),
        reason: format!("not a valid safetensors file: {e}"),
    })
}

/// Checks that `tensors` holds exactly the parameters `vars` (names, shapes, dtypes) and
/// copies them in. Nothing is modified when any check fails.
pub fn assign_params(
    path: &Path,
    vars: &[(String, Var)],
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, var) in vars {
        match tensors.get(name) {
            None => problems.push(format!("missing tensor `{name}`")),
            Some(t) => {
                if t.dims() != var.as_tensor().dims() {
                    problems.push(format!(
                        "`{name}` has shape {:?}, the config needs {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ));
                } else if t.dtype() != var.dtype() {
                    problems.push(format!(
                        "`{name}` has dtype {:?}, the model uses {:?}",
                        t.dtype(),
                        var.dtype()
                    ));
                }
            }
        }
    }
    let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    for k in extra {
        problems.push(format!("unexpected tensor `{k}` (not part of this config)"));
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(Error::Checkpoint {
            path: path.into(),
            reason: format!(
                "tensors do not match the config:\n  - {}",
                problems.join("\n  - ")
            ),
        });
    }
    for (name, var) in vars {
        var.set(&tensors[name])?;
    }
    Ok(())
}

/// Saves model weights (`model.safetensors`) and `config.json` into `dir`, atomically per
/// file.
pub fn save_model(
    dir: &Path,
    vars: &[(String, Var)],
    config_json: &serde_json::Value,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".model.safetensors.tmp-{}", std::process::id()));
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&tmp, &tensors)?;
    let dst = dir.join("model.safetensors");
    fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(config_json)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    fsync_dir(dir)
}

/// Loads `model.safetensors` from `dir` into `vars`, refusing mismatches.
pub fn load_model(dir: &Path, vars: &[(String, Var)]) -> Result<()> {
    let path = dir.join("model.safetensors");
    let tensors = load_tensors(&path)?;
    assign_params(&path, vars, &tensors)
}

/// Everything of a training checkpoint besides tensors.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Format version.
    pub format_version: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// AdamW step counter of the main optimiser.
    pub optimizer_t: u64,
    /// AdamW step counter of the aux-router optimiser.
    pub aux_optimizer_t: u64,
    /// Tokens consumed.
    pub tokens: u64,
    /// Data position (opaque to the checkpoint code).
    pub data_cursor: serde_json::Value,
    /// RNG state.
    pub rng: mor_core::rng::Rng,
    /// Recent losses of the spike detector.
    pub loss_window: Vec<f64>,
    /// Anything else the trainer keeps.
    pub extra: serde_json::Value,
    /// Size and hash of every file of the checkpoint.
    pub files: BTreeMap<String, FileDigest>,
}

/// The tensors of a training checkpoint.
#[derive(Debug, Default)]
pub struct CheckpointTensors {
    /// Model parameters (and router buffers).
    pub model: Vec<(String, Tensor)>,
    /// Optimiser moments (main and aux).
    pub optim: Vec<(String, Tensor)>,
}

/// Writes checkpoint `step` under `ckpt_root` atomically and moves `latest` to it.
/// Keeps at most `keep` checkpoints (the newest ones). Returns the folder.
pub fn save_checkpoint(
    ckpt_root: &Path,
    mut state: TrainState,
    tensors: &CheckpointTensors,
    keep: usize,
) -> Result<PathBuf> {
    fs::create_dir_all(ckpt_root).map_err(|e| Error::io(ckpt_root, e))?;
    let name = format!("step-{:07}", state.step);
    let final_dir = ckpt_root.join(&name);
    let tmp = ckpt_root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_tensors(&tmp.join("model.safetensors"), &tensors.model)?;
    save_tensors(&tmp.join("optim.safetensors"), &tensors.optim)?;
    state.files.clear();
    for f in ["model.safetensors", "optim.safetensors"] {
        state.files.insert(f.to_string(), digest(&tmp.join(f))?);
    }
    state.format_version = FORMAT_VERSION;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::msg(e.to_string()))?;
    {
        let p = tmp.join("state.json");
        let mut f = fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
        f.write_all(&json).map_err(|e| Error::io(&p, e))?;
        f.sync_all().map_err(|e| Error::io(&p, e))?;
    }
    fsync_dir(&tmp)?;
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    fsync_dir(ckpt_root)?;
    write_atomic(&ckpt_root.join("latest"), name.as_bytes())?;
    // Prune old checkpoints (never the one just written).
    if keep > 0 {
        let mut all: Vec<String> = fs::read_dir(ckpt_root)
            .map_err(|e| Error::io(ckpt_root, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("step-"))
            .collect();
        all.sort();
        let excess = all.len().saturating_sub(keep);
        for old in all.into_iter().take(excess) {
            if old != name {
                let _ = fs::remove_dir_all(ckpt_root.join(old));
            }
        }
    }
    Ok(final_dir)
}

/// The folder `latest` points to, if any.
pub fn latest_checkpoint(ckpt_root: &Path) -> Result<Option<PathBuf>> {
    let p = ckpt_root.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let name = name.trim();
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Err(Error::Checkpoint {
            path: p,
            reason: format!("`latest` holds an invalid name {name:?}"),
        });
    }
    Ok(Some(ckpt_root.join(name)))
}

/// Reads and validates a checkpoint folder: state.json parses, format version matches,
/// every listed file has its recorded size and hash, and both safetensors files parse.
pub fn load_checkpoint(dir: &Path) -> Result<(TrainState, CheckpointTensorsMap)> {
    let sp = dir.join("state.json");
    let raw = fs::read(&sp).map_err(|e| Error::Checkpoint {
        path: sp.clone(),
        reason: format!("cannot read state.json: {e}"),
    })?;
    let state: TrainState = serde_json::from_slice(&raw).map_err(|e| Error::Checkpoint {
        path: sp.clone(),
        reason: format!("state.json is corrupt: {e}"),
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(Error::Checkpoint {
            path: sp,
            reason: format!(
                "format version {} is not supported (expected {FORMAT_VERSION})",
                state.format_version
            ),
        });
    }
    for f in ["model.safetensors", "optim.safetensors"] {
        let want = state.files.get(f).ok_or_else(|| Error::Checkpoint {
            path: dir.into(),
            reason: format!("state.json does not list `{f}`"),
        })?;
        let p = dir.join(f);
        if !p.exists() {
            return Err(Error::Checkpoint {
                path: p,
                reason: "file missing".into(),
            });
        }
        let got = digest(&p)?;
        if got.bytes != want.bytes {
            return Err(Error::Checkpoint {
                path: p,
                reason: format!(
                    "truncated or altered: {} bytes, expected {}",
                    got.bytes, want.bytes
                ),
            });
        }
        if got.fnv64 != want.fnv64 {
            return Err(Error::Checkpoint {
                path: p,
                reason: "contents do not match the recorded hash (corrupt)".into(),
            });
        }
    }
    let model = load_tensors(&dir.join("model.safetensors"))?;
    let optim = load_tensors(&dir.join("optim.safetensors"))?;
    Ok((state, CheckpointTensorsMap { model, optim }))
}

/// Tensors of a loaded checkpoint, by name.
#[derive(Debug)]
pub struct CheckpointTensorsMap {
    /// Model parameters (and buffers).
    pub model: HashMap<String, Tensor>,
    /// Optimiser moments.
    pub optim: HashMap<String, Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mor-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn state(step: usize) -> TrainState {
        TrainState {
            format_version: FORMAT_VERSION,
            step,
            optimizer_t: step as u64,
            aux_optimizer_t: 0,
            tokens: 0,
            data_cursor: serde_json::json!({"i": step}),
            rng: mor_core::rng::Rng::new(1),
            loss_window: vec![],
            extra: serde_json::Value::Null,
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn roundtrip_and_corruption_refused() -> Result<()> {
        let root = tmpdir("rt");
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        let tensors = CheckpointTensors {
            model: vec![("w".into(), t.clone())],
            optim: vec![("w.m".into(), t.clone())],
        };
        let d1 = save_checkpoint(&root, state(1), &tensors, 2)?;
        let d2 = save_checkpoint(&root, state(2), &tensors, 2)?;
        assert_eq!(latest_checkpoint(&root)?.as_deref(), Some(d2.as_path()));
        let (s, m) = load_checkpoint(&d2)?;
        assert_eq!(s.step, 2);
        assert_eq!(m.model["w"].to_vec1::<f32>()?, vec![1.0, 2.0, 3.0]);
        // Truncate the model file of step 2: refused, step 1 untouched.
        let p = d2.join("model.safetensors");
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let err = load_checkpoint(&d2).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        // Flip a byte, same size: refused by hash.
        let mut b2 = bytes.clone();
        let last = b2.len() - 1;
        b2[last] ^= 0xff;
        fs::write(&p, &b2).unwrap();
        let err = load_checkpoint(&d2).unwrap_err().to_string();
        assert!(err.contains("hash"), "{err}");
        assert!(load_checkpoint(&d1).is_ok());
        // keep = 2: a third checkpoint prunes the first.
        save_checkpoint(&root, state(3), &tensors, 2)?;
        assert!(!d1.exists());
        let _ = fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn mismatched_tensors_named() -> Result<()> {
        let dev = Device::Cpu;
        let vars = vec![
            (
                "a".to_string(),
                Var::from_tensor(&Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?)?,
            ),
            (
                "b".to_string(),
                Var::from_tensor(&Tensor::zeros(4, candle_core::DType::F32, &dev)?)?,
            ),
        ];
        let mut m = HashMap::new();
        m.insert(
            "a".to_string(),
            Tensor::zeros((3, 2), candle_core::DType::F32, &dev)?,
        );
        m.insert(
            "c".to_string(),
            Tensor::zeros(4, candle_core::DType::F32, &dev)?,
        );
        let err = assign_params(Path::new("x.safetensors"), &vars, &m)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`a` has shape [3, 2], the config needs [2, 3]"),
            "{err}"
        );
        assert!(err.contains("missing tensor `b`"), "{err}");
        assert!(err.contains("unexpected tensor `c`"), "{err}");
        Ok(())
    }
}
