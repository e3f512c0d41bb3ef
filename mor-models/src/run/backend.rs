//! Runs across backends: a run folder loaded for inference on another backend than the one
//! it was trained on ([`read_run_config`], [`RunConfig::load_model`]), the rule that lets an
//! unfinished run continue on another backend only when asked ([`BackendSwitch`]), and the
//! record of the backend each training segment ran on ([`SEGMENTS_FILE`]).
//!
//! The weights of a run are backend-independent f32 tensors, and loading them (or a
//! checkpoint's optimiser moments) moves them to the model's device, so a run trained on
//! `cuda` can be evaluated on `cpu` and continued there. The numbers are not bit-identical
//! across backends (their kernels sum in other orders), so a switch is never silent.

use crate::model::MorModel;
use crate::{Error, Result};
use mor_core::config::{apply_override, Config, PluginSpec, Precision, ResolvedConfig};
use mor_core::Family;
use std::path::Path;

/// The file of a run folder that lists the training segments of the run, one JSON
/// [`Segment`] per line: the step each invocation started from and the backend it ran on.
pub const SEGMENTS_FILE: &str = "segments.jsonl";

/// Prefix of the resolved-config keys that name the backend (`backend.kind`,
/// `backend.params.*`, e.g. the `cuda` backend's `ordinal`).
const BACKEND_KEY: &str = "backend.";

/// Whether an unfinished run may continue on another backend than the one it started on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendSwitch {
    /// The backend is part of the run's config: a resume on another one is refused, and
    /// the refusal names `--backend KIND`.
    #[default]
    Refuse,
    /// Asked for explicitly (`--backend KIND`): a run whose config differs from the given
    /// one only in its backend continues on the given backend, with a notice; the switch is
    /// recorded in [`SEGMENTS_FILE`].
    Allow,
}

/// One training segment of a run: an invocation of `train` or `ablate` that trained it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// The optimiser step it started from (0 for the start of the run, the checkpoint's step
    /// for a resume).
    pub from_step: usize,
    /// The backend it ran on.
    pub backend: PluginSpec,
}

/// Whether a `key: old -> new` line of [`super::config_differences`] names a backend key.
pub(crate) fn is_backend_difference(diff: &str) -> bool {
    diff.starts_with(BACKEND_KEY)
}

/// The registered backend names, comma-separated (for messages).
pub(crate) fn registered_backends() -> String {
    mor_core::registry::names(Family::Backend).join(", ")
}

/// Checks that `kind` names a registered backend.
///
/// # Errors
/// When it does not: `--backend KIND: …`, listing the registered backends.
pub fn check_backend(kind: &str) -> Result<()> {
    // The registry's message lists the registered backends.
    mor_core::registry::find(Family::Backend, kind)
        .map(|_| ())
        .map_err(|e| Error::msg(format!("--backend {kind}: {e}")))
}

/// `cfg` with its backend set to `kind`: the config is resolved again from its source with
/// `runtime.backend = "kind"`, so the backend's own checks run. When `kind` is already the
/// config's backend, the config is returned as it is (its backend parameters kept).
///
/// # Errors
/// When `kind` is not a registered backend (the message lists the registered ones), the
/// config does not resolve with it, or the config resolved again differs from `cfg` in
/// anything but its backend (a config resolved by an older version, whose defaults have
/// changed since: the differing keys are named).
pub fn with_backend(cfg: &ResolvedConfig, kind: &str) -> Result<ResolvedConfig> {
    check_backend(kind)?;
    if cfg.backend.kind == kind {
        return Ok(cfg.clone());
    }
    let mut table = cfg.source.clone();
    apply_override(
        &mut table,
        "runtime.backend",
        toml::Value::String(kind.to_string()),
    )?;
    let moved = Config::from_table(table).map_err(|e| {
        Error::msg(format!(
            "--backend {kind}: the run's config does not resolve on this backend: {e}"
        ))
    })?;
    let others: Vec<String> = super::config_differences(cfg, &moved)
        .into_iter()
        .filter(|d| !is_backend_difference(d))
        .collect();
    if !others.is_empty() {
        return Err(Error::msg(format!(
            "--backend {kind}: the config resolved again for `{kind}` differs from the given one \
             in more than its backend (it was resolved by another version, whose defaults \
             differ):\n  {}\nset these keys in the config explicitly, or use the run's own \
             backend",
            others.join("\n  ")
        )));
    }
    Ok(moved)
}

/// A run folder's config read for inference, on the backend asked for.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The config the model is built from (the run's, with `--backend` applied).
    pub cfg: ResolvedConfig,
    /// The backend the run's own config names.
    pub recorded: PluginSpec,
    /// Whether `--backend` replaced the run's backend.
    pub overridden: bool,
}

impl RunConfig {
    /// The one-line notice of a replaced backend, naming both (`None` without a change).
    pub fn notice(&self) -> Option<String> {
        self.overridden.then(|| {
            format!(
                "note: the run was trained on backend `{}`; using backend `{}` (--backend)",
                self.recorded.kind, self.cfg.backend.kind
            )
        })
    }

    /// A freshly initialised model of the config, on its backend.
    ///
    /// # Errors
    /// When the backend cannot be built here: without `--backend`, the message says that the
    /// run's own backend is unavailable and suggests `--backend cpu`; with it, it names the
    /// flag (a bf16 run on a backend without bf16 gets the backend's precision message).
    pub fn build_model(&self) -> Result<MorModel> {
        MorModel::new(&self.cfg).map_err(|e| {
            let backend = &self.cfg.backend;
            match (unbuildable(&self.cfg), self.overridden) {
                (false, _) => e,
                (true, false) if backend.kind != "cpu" => Error::msg(format!(
                    "the run's backend `{}` cannot be built here: {e}\n\
                     its weights load on any backend: pass --backend cpu to use the CPU \
                     (registered backends: {})",
                    backend.kind,
                    registered_backends()
                )),
                (true, false) => e,
                // The backend builds here in f32: only the run's precision is missing.
                (true, true) if !unbuildable_in(&self.cfg, Precision::F32) => Error::msg(format!(
                    "--backend {}: {e}\nthe run was trained with train.precision = \"{}\" on \
                     backend `{}`; choose a backend that builds here and implements it \
                     (registered backends: {})",
                    backend.kind,
                    self.cfg.train.precision.as_str(),
                    self.recorded.kind,
                    registered_backends()
                )),
                (true, true) => Error::msg(format!(
                    "--backend {}: {e}\nchoose a backend that builds here (registered backends: {})",
                    backend.kind,
                    registered_backends()
                )),
            }
        })
    }

    /// [`RunConfig::build_model`], then the run's trained weights (`model.safetensors`)
    /// loaded onto the model's device: what `eval`, `generate` and `export` compute with.
    ///
    /// # Errors
    /// As [`RunConfig::build_model`], or when the weights are missing, corrupt or do not
    /// fit the config (`loading the weights of DIR: …`).
    pub fn load_model(&self, dir: &Path) -> Result<MorModel> {
        let model = self.build_model()?;
        Self::load_weights(dir, &model)?;
        Ok(model)
    }

    /// The run's trained weights (`model.safetensors` of `dir`) loaded into `model`, built by
    /// [`RunConfig::build_model`] (for a command that checks the model before it loads them).
    ///
    /// # Errors
    /// When the weights are missing, corrupt or do not fit the config (`loading the weights
    /// of DIR: …`).
    pub fn load_weights(dir: &Path, model: &MorModel) -> Result<()> {
        crate::checkpoint::load_run_model(dir, model)
            .map_err(|e| Error::msg(format!("loading the weights of {}: {e}", dir.display())))
    }
}

/// Whether `cfg`'s backend cannot be built here (its feature missing, no device, or its
/// precision not implemented).
pub(crate) fn unbuildable(cfg: &ResolvedConfig) -> bool {
    unbuildable_in(cfg, cfg.train.precision)
}

/// Whether `cfg`'s backend cannot be built here in `precision`.
fn unbuildable_in(cfg: &ResolvedConfig, precision: Precision) -> bool {
    let ctx = mor_kernels::BackendCtx::new(candle_core::Device::Cpu).with_precision(precision);
    mor_kernels::build_backend(&cfg.backend.kind, &cfg.backend.params, &ctx).is_err()
}

/// Reads a run folder's config (`config.toml`, else the resolved `config.json` of an
/// imported run), checks it and `tokenizer.json` against the folder's manifest, and applies
/// `backend` (`--backend KIND`) when given.
///
/// # Errors
/// When the folder holds no config, a file does not match its recorded hash, the config
/// does not resolve, or `backend` is not a registered backend (the registered ones are
/// listed).
pub fn read_run_config(dir: &Path, backend: Option<&str>) -> Result<RunConfig> {
    let config_file = if dir.join("config.toml").is_file() {
        "config.toml"
    } else if dir.join("config.json").is_file() {
        "config.json"
    } else {
        return Err(Error::msg(format!(
            "{} is not a run folder (no config.toml or config.json)",
            dir.display()
        )));
    };
    // Checked before it is parsed: a damaged file is named as such, not as a bad config.
    crate::checkpoint::verify_files(dir, &[config_file, crate::tokenizer::TOKENIZER_FILE], false)
        .map_err(|e| Error::msg(format!("cannot trust the files of {}: {e}", dir.display())))?;
    let path = dir.join(config_file);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let cfg = if config_file == "config.toml" {
        Config::from_toml_str(&text).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?
    } else {
        serde_json::from_str::<ResolvedConfig>(&text)
            .map_err(|e| Error::msg(format!("{}: corrupt: {e}", path.display())))?
    };
    let recorded = cfg.backend.clone();
    let (cfg, overridden) = match backend {
        Some(kind) => {
            let c = with_backend(&cfg, kind)?;
            let changed = c.backend != recorded;
            (c, changed)
        }
        None => (cfg, false),
    };
    Ok(RunConfig {
        cfg,
        recorded,
        overridden,
    })
}

/// The training segments recorded in `dir` (empty when there is no [`SEGMENTS_FILE`]: a
/// run started by an older version, or one that never trained). The file is checked
/// against the folder's manifest when the manifest lists it.
///
/// # Errors
/// When the file does not match its recorded hash, is unreadable, or a line is corrupt; the
/// message says how to go on (remove the file: the run then starts a new record).
pub fn read_segments(dir: &Path) -> Result<Vec<Segment>> {
    let p = dir.join(SEGMENTS_FILE);
    if !p.exists() {
        return Ok(Vec::new());
    }
    let damaged = |e: &dyn std::fmt::Display| {
        Error::msg(format!(
            "{e}\nthe record of the run's training segments is damaged: restore it, or remove \
             {} to go on without it (the next resume starts a new record, from the backend of \
             the run's config)",
            p.display()
        ))
    };
    let listed =
        crate::checkpoint::read_manifest(dir)?.is_some_and(|m| m.files.contains_key(SEGMENTS_FILE));
    if listed {
        crate::checkpoint::verify_files(dir, &[SEGMENTS_FILE], true).map_err(|e| damaged(&e))?;
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| damaged(&format!("{}: line {} is corrupt: {e}", p.display(), i + 1)))
        })
        .collect()
}

/// Appends `seg` to `dir`'s [`SEGMENTS_FILE`] (written atomically, recorded in the
/// manifest). A resumed run of an older version, which has no such file, first gets the
/// segment it started with: `from_step` 0 on `started_on`, the backend of its config.
pub(crate) fn record_segment(dir: &Path, seg: Segment, started_on: &PluginSpec) -> Result<()> {
    let mut segs = read_segments(dir)?;
    if segs.is_empty() && seg.from_step > 0 {
        segs.push(Segment {
            from_step: 0,
            backend: started_on.clone(),
        });
    }
    // A resume from the same step (a segment that stopped before its first checkpoint)
    // replaces the segment it repeats.
    segs.retain(|s| s.from_step < seg.from_step);
    segs.push(seg);
    let mut text = String::new();
    for s in &segs {
        text.push_str(&serde_json::to_string(s).map_err(|e| Error::msg(e.to_string()))?);
        text.push('\n');
    }
    crate::checkpoint::write_atomic(&dir.join(SEGMENTS_FILE), text.as_bytes())?;
    crate::checkpoint::record_files(dir, &[SEGMENTS_FILE])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(backend: &str) -> ResolvedConfig {
        let _ = crate::builtin::link();
        Config::from_toml_str(&format!(
            "[model]\npreset = \"micro\"\n[runtime]\nbackend = \"{backend}\"\n\
             [train]\nbudget = {{ steps = 1 }}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_switch_that_changes_more_than_the_backend_is_refused_naming_the_keys() {
        let own = cfg("reference");
        let moved = with_backend(&own, "cpu").unwrap();
        assert_eq!(moved.backend.kind, "cpu");
        assert!(super::super::config_differences(&own, &moved)
            .iter()
            .all(|d| is_backend_difference(d)));
        // As an older version resolved it, with another default learning rate than its
        // source resolves to today.
        let mut old = own.clone();
        old.train.lr *= 2.0;
        let err = with_backend(&old, "cpu").unwrap_err().to_string();
        assert!(
            err.contains("--backend cpu") && err.contains("train.lr"),
            "{err}"
        );
    }

    #[test]
    fn an_unbuildable_backend_names_the_precision_only_when_it_builds_in_f32() {
        let own = cfg("reference");
        let cuda = with_backend(&own, "cuda").unwrap();
        if !unbuildable_in(&cuda, Precision::F32) {
            eprintln!("skipped: the cuda backend builds here");
            return;
        }
        let rc = RunConfig {
            cfg: cuda,
            recorded: own.backend.clone(),
            overridden: true,
        };
        let err = rc.build_model().unwrap_err().to_string();
        assert!(
            err.contains("--backend cuda") && !err.contains("precision"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_config_is_named_as_not_matching_its_hash() {
        let dir = std::env::temp_dir().join(format!("mor-backend-hash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), cfg("cpu").to_toml_string()).unwrap();
        crate::tokenizer::Tokenizer::byte_level()
            .save(&dir)
            .unwrap();
        crate::checkpoint::record_files(&dir, &["config.toml", crate::tokenizer::TOKENIZER_FILE])
            .unwrap();
        assert!(read_run_config(&dir, None).is_ok());
        std::fs::write(dir.join("config.toml"), "[model\n").unwrap();
        let err = read_run_config(&dir, None).unwrap_err().to_string();
        assert!(
            err.contains("config.toml")
                && (err.contains("truncated or altered") || err.contains("recorded hash")),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
