//! The official code's checkpoint layout (the PyTorch `state_dict` of the reference
//! implementation), out and in.
//!
//! - [`names`]: the mapping between mor's parameter names and the official keys
//!   (unrolled positions with tied aliases, per-step expert-choice routers, the
//!   token-choice router and its loss-free bias), and what the official code cannot
//!   express;
//! - [`export_official`]: a mor model as `model.safetensors` with every official key, the
//!   official settings (`mor_config.json`, `mor_config.yaml`), `config.json` and
//!   `tokenizer.json`;
//! - [`read_official`] / [`load_official`]: a checkpoint in that layout
//!   (`model.safetensors` or `pytorch_model.bin`) into a [`MorModel`](crate::MorModel),
//!   with the config given or inferred from the settings; every tensor is checked.
//!
//! docs/official-layout.md describes the layout and the conversion to the
//! `pytorch_model.bin` the official evaluation reads.

pub mod export;
pub mod import;
pub mod names;
pub mod settings;

pub use export::{export_official, official_tensors};
pub use import::{
    infer_config, load_official, read_official, read_weights, weights_path, OfficialImport,
    TORCH_WEIGHTS_FILE,
};
pub use names::{alias_groups, mor_names, official_keys, official_shape, OfficialKey, Source};
pub use settings::{
    config_from_settings, official_settings, parse_yaml, to_yaml, SETTINGS_JSON, SETTINGS_YAML,
};
