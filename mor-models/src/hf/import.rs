//! Reading a Hugging Face Llama-family folder into a vanilla mor model (and run folder).

use super::config::HfConfig;
use crate::checkpoint::{record_files, save_model};
use crate::tokenizer::{Tokenizer, TOKENIZER_FILE};
use crate::{Error, MorModel, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use mor_core::config::ResolvedConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The single-file weights of a Hugging Face folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A checked Hugging Face model, ready to be loaded into a [`MorModel`] or written as a
/// run folder.
#[derive(Debug)]
pub struct HfImport {
    /// The folder it was read from.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub hf: HfConfig,
    /// The equivalent vanilla mor config.
    pub config: ResolvedConfig,
    /// The weights in f32 under mor's parameter names (which are Llama's), on the host.
    pub tensors: BTreeMap<String, Tensor>,
    /// Its `tokenizer.json`.
    pub tokenizer: Tokenizer,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Maps the weight files of `dir` (single file or sharded index); returns the mapped
/// files and, per tensor name, the file that holds it.
fn map_weights(dir: &Path) -> Result<(MmapedSafetensors, BTreeMap<String, PathBuf>)> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(INDEX_FILE);
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(&index, "no `weight_map` object"))?;
        let mut shards = BTreeSet::new();
        for (name, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| bad(&index, format!("`weight_map.{name}` is not a file name")))?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(bad(
                    &index,
                    format!("`weight_map.{name}` names `{f}`, which is not a file of this folder"),
                ));
            }
            shards.insert(f.to_string());
        }
        let mut files = Vec::new();
        for s in shards {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(bad(
                    &index,
                    format!("shard `{s}` is named in the index but absent"),
                ));
            }
            files.push(p);
        }
        if files.is_empty() {
            return Err(bad(&index, "`weight_map` is empty"));
        }
        files
    } else {
        return Err(bad(
            dir,
            format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is in this folder"),
        ));
    };
    let mut owner = BTreeMap::new();
    for f in &files {
        // SAFETY: the file is mapped read-only for the duration of the import; it is a
        // model file nobody is expected to modify meanwhile (candle's own loaders do the
        // same).
        let one = unsafe { MmapedSafetensors::new(f) }
            .map_err(|e| bad(f, format!("not a valid safetensors file: {e}")))?;
        for (name, _) in one.tensors() {
            if let Some(prev) = owner.insert(name.clone(), f.clone()) {
                return Err(bad(
                    f,
                    format!("tensor `{name}` is also in {}", prev.display()),
                ));
            }
        }
    }
    // SAFETY: as above.
    let all = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| bad(&files[0], format!("not a valid safetensors file: {e}")))?;
    Ok((all, owner))
}

/// Buffers older Llama checkpoints carry that are not weights.
fn is_ignored(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// The Llama parameter names and shapes of the vanilla model of `cfg` (mor's names are
/// Llama's; see [`MorModel::named_vars`]).
pub fn expected_shapes(cfg: &ResolvedConfig) -> Vec<(String, Vec<usize>)> {
    let m = &cfg.model;
    let (d, q, kv, di) = (
        m.hidden_size,
        m.num_heads * m.head_dim,
        m.num_kv_heads * m.head_dim,
        m.intermediate_size,
    );
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![m.vocab_size, d],
    )];
    for b in 0..cfg.plan.num_blocks {
        let n = |s: &str| format!("model.layers.{b}.{s}");
        v.push((n("input_layernorm.weight"), vec![d]));
        v.push((n("post_attention_layernorm.weight"), vec![d]));
        v.push((n("self_attn.q_proj.weight"), vec![q, d]));
        v.push((n("self_attn.k_proj.weight"), vec![kv, d]));
        v.push((n("self_attn.v_proj.weight"), vec![kv, d]));
        v.push((n("self_attn.o_proj.weight"), vec![d, q]));
        v.push((n("mlp.gate_proj.weight"), vec![di, d]));
        v.push((n("mlp.up_proj.weight"), vec![di, d]));
        v.push((n("mlp.down_proj.weight"), vec![d, di]));
    }
    v.push(("model.norm.weight".into(), vec![d]));
    if !m.tie_embeddings {
        v.push(("lm_head.weight".into(), vec![m.vocab_size, d]));
    }
    v
}

/// Reads and checks a Hugging Face Llama-family folder: `config.json`, the weights
/// (memory-mapped; f32, bf16 or f16, converted to f32) and `tokenizer.json`.
///
/// # Errors
/// A clear refusal naming the file (and tensor) for: an unsupported `config.json`, missing
/// weights or a shard named in the index but absent, a missing or unexpected tensor, a
/// shape that does not fit the config, a dtype other than f32/bf16/f16, a NaN or infinite
/// weight, a missing or invalid `tokenizer.json`, or a tokenizer whose vocabulary is larger
/// than the model's.
pub fn read_hf(dir: &Path) -> Result<HfImport> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::from_file(&cfg_path)?;
    let config = hf
        .to_mor_config()
        .map_err(|e| bad(&cfg_path, format!("does not fit a mor config: {e}")))?;
    let (st, owner) = map_weights(dir)?;
    let expected = expected_shapes(&config);
    let mut problems = Vec::new();
    let mut tensors = BTreeMap::new();
    let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for (name, shape) in &expected {
        let Some(file) = owner.get(name) else {
            problems.push(format!("missing tensor `{name}` (shape {shape:?})"));
            continue;
        };
        let t = st.load(name, &Device::Cpu)?;
        if t.dims() != shape.as_slice() {
            problems.push(format!(
                "{}: tensor `{name}` has shape {:?}, config.json needs {shape:?}",
                file.display(),
                t.dims()
            ));
            continue;
        }
        if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            problems.push(format!(
                "{}: tensor `{name}` has dtype {:?}; f32, bf16 or f16 is needed",
                file.display(),
                t.dtype()
            ));
            continue;
        }
        let t = t.to_dtype(DType::F32)?;
        let bad_count = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|x| !x.is_finite())
            .count();
        if bad_count > 0 {
            problems.push(format!(
                "{}: tensor `{name}` has {bad_count} NaN or infinite value(s)",
                file.display()
            ));
            continue;
        }
        tensors.insert(name.clone(), t);
    }
    for (name, file) in &owner {
        if known.contains(name.as_str()) || is_ignored(name) {
            continue;
        }
        // A tied head saved anyway must equal the embedding.
        if name == "lm_head.weight" && hf.tie_embeddings {
            let head = st.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
            let same = tensors.get("model.embed_tokens.weight").is_some_and(|e| {
                e.dims() == head.dims()
                    && e.flatten_all()
                        .and_then(|a| a.to_vec1::<f32>())
                        .ok()
                        .zip(head.flatten_all().and_then(|b| b.to_vec1::<f32>()).ok())
                        .is_some_and(|(a, b)| a == b)
            });
            if same {
                continue;
            }
            problems.push(format!(
                "{}: tensor `lm_head.weight` differs from the embedding, but config.json has tie_word_embeddings = true",
                file.display()
            ));
            continue;
        }
        problems.push(format!(
            "{}: unexpected tensor `{name}` (not part of a {} model with this config.json)",
            file.display(),
            hf.model_type
        ));
    }
    if !problems.is_empty() {
        return Err(bad(
            dir,
            format!(
                "the weights do not fit config.json:\n  - {}",
                problems.join("\n  - ")
            ),
        ));
    }
    let tok_path = dir.join(TOKENIZER_FILE);
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    if tokenizer.vocab_size() > hf.vocab_size {
        return Err(bad(
            &tok_path,
            format!(
                "the tokenizer has {} tokens, more than the model's vocab_size {}",
                tokenizer.vocab_size(),
                hf.vocab_size
            ),
        ));
    }
    Ok(HfImport {
        dir: dir.to_path_buf(),
        hf,
        config,
        tensors,
        tokenizer,
    })
}

impl HfImport {
    /// The vanilla [`MorModel`] with these weights (f32, on the host).
    ///
    /// # Errors
    /// When the model cannot be built (backend) or the weights do not fit (never after
    /// [`read_hf`]'s checks).
    pub fn model(&self) -> Result<MorModel> {
        let model = MorModel::new(&self.config)?;
        self.load_into(&model)?;
        Ok(model)
    }

    /// Copies the weights into `model` (whose config must have this import's dimensions).
    ///
    /// # Errors
    /// When a tensor is missing or has another shape.
    pub fn load_into(&self, model: &MorModel) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        crate::checkpoint::assign_params(&self.dir, &model.named_vars(), &map)
    }

    /// Writes a mor run folder at `out` (config.toml, config.json, model.safetensors,
    /// tokenizer.json, manifest.json), usable by `eval --run`, `generate --run` and
    /// `bench infer`. Everything is written into a temporary sibling folder that is
    /// renamed to `out` at the end.
    ///
    /// # Errors
    /// When `out` exists and is not an empty folder, or a file cannot be written (the
    /// temporary folder is then removed).
    pub fn write_run(&self, out: &Path) -> Result<()> {
        let model = self.model()?;
        write_dir_atomically(out, |tmp| {
            fs::write(tmp.join("config.toml"), self.config.to_toml_string())
                .map_err(|e| Error::io(tmp.join("config.toml"), e))?;
            let json: serde_json::Value = serde_json::from_str(
                &self
                    .config
                    .to_json()
                    .map_err(|e| Error::msg(format!("cannot serialise the config: {e}")))?,
            )
            .map_err(|e| Error::msg(format!("cannot serialise the config: {e}")))?;
            save_model(tmp, &model.named_vars(), &json)?;
            self.tokenizer.save(tmp)?;
            record_files(tmp, &["config.toml", TOKENIZER_FILE])
        })
    }
}

/// Refuses an `out` that exists and is not an empty folder, runs `write` on a fresh
/// temporary sibling folder and renames it to `out`; the temporary folder is removed when
/// `write` fails.
pub fn write_dir_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(bad(
                out,
                "already exists and is not an empty folder; choose another output folder",
            ));
        }
    }
    let name = out
        .file_name()
        .and_then(|s| s.to_str())
        .ok_or_else(|| bad(out, "the output path has no folder name"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write(&tmp).and_then(|()| {
        if out.exists() {
            fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}
