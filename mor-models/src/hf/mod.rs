//! Hugging Face Llama-family models in and out.
//!
//! - [`read_hf`] reads a Llama / SmolLM / Mistral (no sliding window) folder:
//!   `config.json`, `model.safetensors` or a sharded `model.safetensors.index.json`
//!   (memory-mapped; f32, bf16 or f16 converted to f32) and `tokenizer.json`, checks every
//!   tensor, and gives a vanilla [`MorModel`](crate::MorModel) or a mor run folder
//!   ([`HfImport::write_run`]).
//! - [`export_hf`] writes a vanilla model back as a `LlamaForCausalLM` folder.
//! - [`apply_init`] fills a recursive or MoR model from a pretrained one (`[init]`,
//!   uptraining, spec §2).
//!
//! Layout notes. mor's parameter names are Llama's (`model.layers.{i}.self_attn.q_proj.weight`,
//! …), with the same `[out, in]` orientation. Both use rotate-half RoPE on each head
//! (dimension `i` pairs with `i + head_dim/2`, not interleaved pairs), and the query
//! projection's rows are head-major with grouped-query attention sharing K/V head
//! `j = i / (num_heads / num_kv_heads)` with query head `i` (Hugging Face's `repeat_kv`),
//! so weights are copied unchanged. The fixture test checks both against `transformers`.

pub mod config;
pub mod export;
pub mod import;
pub mod init;

pub use config::{HfConfig, MODEL_TYPES};
pub use export::{export_hf, hf_refusal, hf_tensors};
pub use import::{read_hf, write_dir_atomically, HfImport, INDEX_FILE, WEIGHTS_FILE};
pub use init::{
    apply_init, init_mapping, pretrained_layers, read_pretrained, InitReport, Pretrained,
};
