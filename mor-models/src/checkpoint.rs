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
//!   any point leaves the previous checkpoint intact. A `manifest.json` beside `state.json`
//!   holds the size and hash of all three files, so `state.json` is covered too.
//! - A run folder has a `manifest.json` of the same form: every file the run writes
//!   (config, tokenizer, data record, weights, metrics, evaluation, summary) is recorded as it
//!   is written, and readers check the files they load against it ([`verify_files`]).

use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Format version of `state.json`. Version 2 checkpoints hold a `manifest.json` covering
/// every file (`state.json` included); version 1 checkpoints (no manifest) still load.
pub const FORMAT_VERSION: u32 = 2;

/// The file listing the size and hash of every other file of a folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The contents of a `manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Size and hash per file name (relative to the folder).
    pub files: BTreeMap<String, FileDigest>,
}

/// Reads `dir/manifest.json`; `None` when there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let p = dir.join(MANIFEST_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let raw = fs::read(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| Error::Checkpoint {
            path: p,
            reason: format!("manifest.json is corrupt: {e}"),
        })
}

/// Records the current size and hash of the files `names` of `dir` in `dir/manifest.json`
/// (other entries are kept; the manifest is replaced atomically).
pub fn record_files(dir: &Path, names: &[&str]) -> Result<()> {
    let mut m = read_manifest(dir)?.unwrap_or_default();
    for n in names {
        m.files.insert(n.to_string(), digest(&dir.join(n))?);
    }
    let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&dir.join(MANIFEST_FILE), &json)
}

/// Checks the files `names` of `dir` against `dir/manifest.json`: each must be listed and
/// have its recorded size and hash. Without a manifest, `require` decides: refuse, or accept
/// unchecked with a one-line notice on stderr (once per folder; runs written before
/// manifests existed stay usable).
pub fn verify_files(dir: &Path, names: &[&str], require: bool) -> Result<()> {
    let Some(m) = read_manifest(dir)? else {
        if require {
            return Err(Error::Checkpoint {
                path: dir.join(MANIFEST_FILE),
                reason: "missing: the files of this folder cannot be checked for corruption \
                         (written by an older version or not by mor)"
                    .into(),
            });
        }
        static NOTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
        if !noted.iter().any(|d| d == dir) {
            noted.push(dir.to_path_buf());
            eprintln!(
                "note: {} has no {MANIFEST_FILE} (written by an older version): its files are used without a corruption check",
                dir.display()
            );
        }
        return Ok(());
    };
    for n in names {
        let want = m.files.get(*n).ok_or_else(|| Error::Checkpoint {
            path: dir.join(n),
            reason: format!("not listed in {MANIFEST_FILE}, so it cannot be checked"),
        })?;
        check_digest(&dir.join(n), want)?;
    }
    Ok(())
}

fn check_digest(p: &Path, want: &FileDigest) -> Result<()> {
    if !p.exists() {
        return Err(Error::Checkpoint {
            path: p.into(),
            reason: "file missing".into(),
        });
    }
    let got = digest(p)?;
    if got.bytes != want.bytes {
        return Err(Error::Checkpoint {
            path: p.into(),
            reason: format!(
                "truncated or altered: {} bytes, expected {}",
                got.bytes, want.bytes
            ),
        });
    }
    if got.fnv64 != want.fnv64 {
        return Err(Error::Checkpoint {
            path: p.into(),
            reason: "contents do not match the recorded hash (corrupt)".into(),
        });
    }
    Ok(())
}

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
    let mut h = Fnv64::default();
    h.update(data);
    h.0
}

/// 64-bit FNV-1a state fed in pieces: `Fnv64::default()`, then [`Fnv64::update`].
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(pub u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Feeds everything `r` yields, read in 1 MiB pieces; returns the number of bytes fed.
    ///
    /// # Errors
    /// A read error, naming `path` (what `r` reads).
    pub fn update_from(&mut self, r: &mut impl std::io::Read, path: &Path) -> Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = r.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                return Ok(bytes);
            }
            self.update(&buf[..n]);
            bytes += n as u64;
        }
    }
}

/// Size and FNV-1a hash of a file, read in 1 MiB pieces.
pub fn digest(path: &Path) -> Result<FileDigest> {
    let mut f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Fnv64::default();
    let bytes = h.update_from(&mut f, path)?;
    Ok(FileDigest {
        bytes,
        fnv64: format!("{:016x}", h.0),
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
    // Checkpoints are read on the host; each tensor goes to its parameter's device, so a
    // model trained on one device loads on another.
    for (name, var) in vars {
        var.set(&tensors[name].to_device(var.device())?)?;
    }
    Ok(())
}

/// Saves model weights (`model.safetensors`) and `config.json` into `dir`, atomically per
/// file, and records both in `dir/manifest.json`.
pub fn save_model(
    dir: &Path,
    vars: &[(String, Var)],
    config_json: &serde_json::Value,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_model_tensors(dir, &tensors, config_json)
}

/// Prefix of router buffers (e.g. the loss-free balancing bias) among model tensors.
pub const BUFFER_PREFIX: &str = "buffer.";

/// Everything a trained model computes with: its parameters, the auxiliary router's
/// parameters, and the router's buffers (named with [`BUFFER_PREFIX`]).
pub fn model_tensors(model: &crate::MorModel) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .chain(model.aux_named_vars())
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    if let Some(r) = model.router() {
        out.extend(
            r.buffers()
                .into_iter()
                .map(|(n, t)| (format!("{BUFFER_PREFIX}{n}"), t)),
        );
    }
    out
}

/// [`save_model`] of every tensor of [`model_tensors`]: a run folder's model, from which
/// `eval`, `generate` and `export` compute exactly what the trained model computed.
pub fn save_run_model(
    dir: &Path,
    model: &crate::MorModel,
    config_json: &serde_json::Value,
) -> Result<()> {
    save_model_tensors(dir, &model_tensors(model), config_json)
}

/// Loads a model saved by [`save_run_model`] into `model`: its parameters, its auxiliary
/// router and its router buffers, checked as [`load_model`] checks them. A model saved by
/// an older version without its auxiliary router or buffers loads with a notice.
pub fn load_run_model(dir: &Path, model: &crate::MorModel) -> Result<()> {
    let path = dir.join("model.safetensors");
    verify_files(dir, &["model.safetensors"], false)?;
    let mut tensors = load_tensors(&path)?;
    let buffer_names: Vec<String> = tensors
        .keys()
        .filter(|k| k.starts_with(BUFFER_PREFIX))
        .cloned()
        .collect();
    let buffers: Vec<(String, Tensor)> = buffer_names
        .iter()
        .filter_map(|k| {
            let t = tensors.remove(k)?;
            Some((k[BUFFER_PREFIX.len()..].to_string(), t))
        })
        .collect();
    let mut vars = model.named_vars();
    let aux = model.aux_named_vars();
    if aux.iter().any(|(n, _)| tensors.contains_key(n)) {
        vars.extend(aux);
    } else if !aux.is_empty() {
        eprintln!(
            "note: {} holds no auxiliary router (saved by an older version): causal routing uses an untrained one",
            path.display()
        );
    }
    assign_params(&path, &vars, &tensors)?;
    if let Some(r) = model.router() {
        let expected = r.buffers();
        if !expected.is_empty() && buffers.is_empty() {
            eprintln!(
                "note: {} holds no router buffers (saved by an older version): they keep their initial values",
                path.display()
            );
        }
        r.load_buffers(&buffers).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            reason: format!("router buffers: {e}"),
        })?;
    }
    Ok(())
}

/// The weights of [`save_run_model`] alone: `model.safetensors` written atomically and
/// recorded in `dir/manifest.json`; `config.json` is left as it is (a resumed run keeps the
/// config it started with, whatever backend it continued on).
pub fn save_run_weights(dir: &Path, model: &crate::MorModel) -> Result<()> {
    write_weights(dir, &model_tensors(model))?;
    fsync_dir(dir)?;
    record_files(dir, &["model.safetensors"])
}

/// Writes `dir/model.safetensors` through a temporary file and a rename.
fn write_weights(dir: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".model.safetensors.tmp-{}", std::process::id()));
    save_tensors(&tmp, tensors)?;
    let dst = dir.join("model.safetensors");
    fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))
}

fn save_model_tensors(
    dir: &Path,
    tensors: &[(String, Tensor)],
    config_json: &serde_json::Value,
) -> Result<()> {
    write_weights(dir, tensors)?;
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(config_json)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    fsync_dir(dir)?;
    record_files(dir, &["model.safetensors", "config.json"])
}

/// Loads `model.safetensors` from `dir` into `vars`, refusing a file whose size or hash
/// differs from `dir/manifest.json` (or that the manifest does not list) and mismatched
/// tensors. A folder without a manifest (an older version's run) loads with a notice.
pub fn load_model(dir: &Path, vars: &[(String, Var)]) -> Result<()> {
    let path = dir.join("model.safetensors");
    verify_files(dir, &["model.safetensors"], false)?;
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
    let mut manifest = Manifest::default();
    for f in ["model.safetensors", "optim.safetensors", "state.json"] {
        manifest.files.insert(f.to_string(), digest(&tmp.join(f))?);
    }
    {
        let p = tmp.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::msg(e.to_string()))?;
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

/// Reads and validates a checkpoint folder: `manifest.json` lists `state.json` and both
/// tensor files with their sizes and hashes (format version 2; version 1 checkpoints have no
/// manifest), state.json parses, its format version is known, every file has its recorded
/// size and hash, and both safetensors files parse.
pub fn load_checkpoint(dir: &Path) -> Result<(TrainState, CheckpointTensorsMap)> {
    let sp = dir.join("state.json");
    let manifest = read_manifest(dir)?;
    if let Some(m) = &manifest {
        for f in ["state.json", "model.safetensors", "optim.safetensors"] {
            let want = m.files.get(f).ok_or_else(|| Error::Checkpoint {
                path: dir.join(MANIFEST_FILE),
                reason: format!("does not list `{f}`"),
            })?;
            check_digest(&dir.join(f), want)?;
        }
    }
    let raw = fs::read(&sp).map_err(|e| Error::Checkpoint {
        path: sp.clone(),
        reason: format!("cannot read state.json: {e}"),
    })?;
    let state: TrainState = serde_json::from_slice(&raw).map_err(|e| Error::Checkpoint {
        path: sp.clone(),
        reason: format!("state.json is corrupt: {e}"),
    })?;
    if state.format_version != FORMAT_VERSION && state.format_version != 1 {
        return Err(Error::Checkpoint {
            path: sp,
            reason: format!(
                "format version {} is not supported (expected 1 or {FORMAT_VERSION})",
                state.format_version
            ),
        });
    }
    if manifest.is_none() && state.format_version != 1 {
        return Err(Error::Checkpoint {
            path: dir.join(MANIFEST_FILE),
            reason: "missing (a version 2 checkpoint lists every file's hash there)".into(),
        });
    }
    for f in ["model.safetensors", "optim.safetensors"] {
        let want = state.files.get(f).ok_or_else(|| Error::Checkpoint {
            path: dir.into(),
            reason: format!("state.json does not list `{f}`"),
        })?;
        check_digest(&dir.join(f), want)?;
    }
    let model = load_tensors(&dir.join("model.safetensors"))?;
    let optim = load_tensors(&dir.join("optim.safetensors"))?;
    Ok((state, CheckpointTensorsMap { model, optim }))
}

/// The checkpoint a resumed run continues from: the one `latest` names when the pointer
/// exists (a refused checkpoint is then an error: nothing older is silently used), otherwise
/// the newest `step-*` folder that loads and validates. Also returns the folders scanned past
/// with the reason each was refused. `Ok(None)`: there is no checkpoint at all.
///
/// # Errors
/// When `latest` is unreadable or its checkpoint is refused, or when checkpoints exist but
/// none is valid (each refusal is listed).
#[allow(clippy::type_complexity)]
pub fn resume_checkpoint(
    ckpt_root: &Path,
) -> Result<Option<(PathBuf, TrainState, CheckpointTensorsMap, Vec<String>)>> {
    if let Some(dir) = latest_checkpoint(ckpt_root)? {
        let (s, t) = load_checkpoint(&dir)?;
        return Ok(Some((dir, s, t, Vec::new())));
    }
    if !ckpt_root.exists() {
        return Ok(None);
    }
    let mut names: Vec<String> = fs::read_dir(ckpt_root)
        .map_err(|e| Error::io(ckpt_root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let mut refused = Vec::new();
    for n in names.iter().rev() {
        let dir = ckpt_root.join(n);
        match load_checkpoint(&dir) {
            Ok((s, t)) => return Ok(Some((dir, s, t, refused))),
            Err(e) => refused.push(e.to_string()),
        }
    }
    if refused.is_empty() {
        return Ok(None);
    }
    Err(Error::Checkpoint {
        path: ckpt_root.into(),
        reason: format!(
            "no `latest` pointer and no valid checkpoint:\n  - {}",
            refused.join("\n  - ")
        ),
    })
}

/// Whether `name` is a temporary file or folder of [`write_atomic`], [`save_model`] or
/// [`save_checkpoint`] (`.NAME.tmp-PID`).
pub fn is_leftover_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the temporary files and folders (`.NAME.tmp-PID`) that an interrupted write left
/// in a run folder and its `checkpoints/`, except this process's own. Call it only while
/// holding the run folder's lock ([`crate::runlock::RunLock`]): no other process then
/// writes there. Returns what was removed.
pub fn remove_leftovers(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let own = format!(".tmp-{}", std::process::id());
    let mut removed = Vec::new();
    for dir in [run_dir.to_path_buf(), run_dir.join("checkpoints")] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if !is_leftover_name(&name) || name.ends_with(&own) {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|e| Error::io(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
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
    fn state_json_is_covered_by_the_manifest() -> Result<()> {
        let root = tmpdir("state");
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let tensors = CheckpointTensors {
            model: vec![("w".into(), t.clone())],
            optim: vec![("w.m".into(), t)],
        };
        let d = save_checkpoint(&root, state(4), &tensors, 2)?;
        // Change the step in state.json, keeping it valid JSON of the same length.
        let p = d.join("state.json");
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"step\": 4"), "{text}");
        fs::write(&p, text.replace("\"step\": 4", "\"step\": 9")).unwrap();
        let err = load_checkpoint(&d).unwrap_err().to_string();
        assert!(err.contains("state.json") && err.contains("hash"), "{err}");
        // Without its manifest a version-2 checkpoint is refused too.
        fs::write(&p, text).unwrap();
        assert!(load_checkpoint(&d).is_ok());
        fs::remove_file(d.join(MANIFEST_FILE)).unwrap();
        let err = load_checkpoint(&d).unwrap_err().to_string();
        assert!(err.contains("manifest.json"), "{err}");
        let _ = fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn resume_scans_when_latest_is_missing() -> Result<()> {
        let root = tmpdir("scan");
        assert!(resume_checkpoint(&root)?.is_none());
        let t = Tensor::new(&[1f32], &Device::Cpu)?;
        let tensors = CheckpointTensors {
            model: vec![("w".into(), t.clone())],
            optim: vec![("w.m".into(), t)],
        };
        save_checkpoint(&root, state(2), &tensors, 5)?;
        let d4 = save_checkpoint(&root, state(4), &tensors, 5)?;
        fs::remove_file(root.join("latest")).unwrap();
        let (dir, s, _, refused) = resume_checkpoint(&root)?.unwrap();
        assert_eq!((dir, s.step, refused.len()), (d4.clone(), 4, 0));
        // The newest one corrupt: the older valid one is used and the refusal reported.
        let p = d4.join("model.safetensors");
        let b = fs::read(&p).unwrap();
        fs::write(&p, &b[..b.len() - 1]).unwrap();
        let (dir, s, _, refused) = resume_checkpoint(&root)?.unwrap();
        assert_eq!((dir, s.step), (root.join("step-0000002"), 2));
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("step-0000004"), "{refused:?}");
        let _ = fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn leftovers_are_recognised_and_removed() -> Result<()> {
        assert!(is_leftover_name(".step-0000004.tmp-1234"));
        assert!(is_leftover_name(".model.safetensors.tmp-77"));
        assert!(!is_leftover_name("step-0000004"));
        assert!(!is_leftover_name(".step-1.tmp-"));
        assert!(!is_leftover_name("notes.tmp-12"));
        let root = tmpdir("left");
        let ck = root.join("checkpoints");
        fs::create_dir_all(ck.join(".step-0000004.tmp-999999")).unwrap();
        fs::write(ck.join(".step-0000004.tmp-999999/model.safetensors"), b"x").unwrap();
        fs::write(root.join(".metrics.jsonl.tmp-999998"), b"x").unwrap();
        let own = root.join(format!(".config.json.tmp-{}", std::process::id()));
        fs::write(&own, b"x").unwrap();
        fs::write(root.join("keep.txt"), b"x").unwrap();
        let mut removed = remove_leftovers(&root)?;
        removed.sort();
        assert_eq!(
            removed,
            vec![
                root.join(".metrics.jsonl.tmp-999998"),
                ck.join(".step-0000004.tmp-999999")
            ]
        );
        assert!(own.exists() && root.join("keep.txt").exists());
        let _ = fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn run_files_are_verified_against_the_manifest() -> Result<()> {
        let root = tmpdir("manifest");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("a.txt"), b"hello").unwrap();
        // No manifest: refused when required, accepted otherwise.
        assert!(verify_files(&root, &["a.txt"], true).is_err());
        verify_files(&root, &["a.txt"], false)?;
        record_files(&root, &["a.txt"])?;
        verify_files(&root, &["a.txt"], true)?;
        fs::write(root.join("a.txt"), b"hellO").unwrap();
        let err = verify_files(&root, &["a.txt"], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.txt") && err.contains("hash"), "{err}");
        let err = verify_files(&root, &["b.txt"], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not listed"), "{err}");
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
