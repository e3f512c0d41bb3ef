//! Named model presets: the paper's four sizes (spec §1.1) and three small CPU sizes.

use super::ModelDims;

/// Every preset name accepted by `model.preset`, smallest first.
pub const PRESETS: [&str; 7] = ["micro", "tiny", "small", "135m", "360m", "730m", "1.7b"];

/// The SmolLM-v1 family shares these (spec §1.1).
fn paper(
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    intermediate_size: usize,
) -> ModelDims {
    ModelDims {
        vocab_size: 49_152,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim: 64,
        intermediate_size,
        seq_len: 2048,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        init_std: 0.02,
        tie_embeddings: true,
    }
}

/// A CPU-sized model with the paper's constants.
#[allow(clippy::too_many_arguments)]
fn cpu(
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    intermediate_size: usize,
    seq_len: usize,
) -> ModelDims {
    ModelDims {
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size,
        seq_len,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        init_std: 0.02,
        tie_embeddings: true,
    }
}

impl ModelDims {
    /// The preset called `name` (one of [`PRESETS`]).
    pub fn preset(name: &str) -> Option<ModelDims> {
        Some(match name {
            "micro" => Self::micro(),
            "tiny" => Self::tiny(),
            "small" => Self::small(),
            "135m" => Self::smollm_135m(),
            "360m" => Self::smollm_360m(),
            "730m" => Self::mor_730m(),
            "1.7b" => Self::smollm_1_7b(),
            _ => return None,
        })
    }

    /// `micro`: d = 64, 4 layers, 4 heads (2 KV) of 16, vocab 512, context 64; unit tests.
    pub fn micro() -> ModelDims {
        cpu(512, 64, 4, 4, 2, 16, 176, 64)
    }

    /// `tiny`: d = 128, 6 layers, 4 heads (2 KV) of 32, vocab 2048, context 128; smoke runs.
    pub fn tiny() -> ModelDims {
        cpu(2048, 128, 6, 4, 2, 32, 352, 128)
    }

    /// `small`: d = 256, 8 layers, 4 heads (2 KV) of 64, vocab 4096, context 256; CPU studies.
    pub fn small() -> ModelDims {
        cpu(4096, 256, 8, 4, 2, 64, 704, 256)
    }

    /// Vanilla 135M (SmolLM-135M): 30 layers, d = 576, 9 heads (3 KV), d_inter 1536.
    pub fn smollm_135m() -> ModelDims {
        paper(576, 30, 9, 3, 1536)
    }

    /// Vanilla 360M (SmolLM-360M): 32 layers, d = 960, 15 heads (5 KV), d_inter 2560.
    pub fn smollm_360m() -> ModelDims {
        paper(960, 32, 15, 5, 2560)
    }

    /// Vanilla 730M (the paper's custom size): 26 layers, d = 1536, 24 heads (8 KV),
    /// d_inter 4096.
    pub fn mor_730m() -> ModelDims {
        paper(1536, 26, 24, 8, 4096)
    }

    /// Vanilla 1.7B (SmolLM-1.7B): 24 layers, d = 2048, 32 heads (32 KV), d_inter 8192.
    pub fn smollm_1_7b() -> ModelDims {
        paper(2048, 24, 32, 32, 8192)
    }
}
