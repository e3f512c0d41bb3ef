//! Helpers shared by the `xtask` integration tests: the micro run they train and their
//! temporary folders.

use std::path::PathBuf;

/// A micro MoR model (d = 32, 5 layers, expert choice) on the built-in corpus, trained for
/// `steps` steps with a checkpoint every `checkpoint_every`.
pub fn config(steps: u64, checkpoint_every: u64) -> String {
    format!(
        r#"
[model]
preset = "micro"
vocab_size = 300
hidden_size = 32
num_heads = 4
num_kv_heads = 2
head_dim = 8
intermediate_size = 48
num_layers = 5
seq_len = 16
[recursion]
num_recursions = 3
sharing = {{ kind = "middle_cycle" }}
[router]
kind = "expert_choice"
[runtime]
seed = 7
threads = 1
[data]
source = "builtin"
builtin_docs = 80
tokenizer = "byte"
[eval]
max_batches = 1
[train]
budget = {{ steps = {steps} }}
batch_seqs = 4
micro_batch_seqs = 4
checkpoint_every = {checkpoint_every}
"#
    )
}

/// A fresh, empty temporary folder `mor-{prefix}-{tag}-{pid}` (the caller removes it).
pub fn tmp(prefix: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mor-{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
