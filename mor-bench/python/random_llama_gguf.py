"""Write a randomly initialised Llama of the `bench infer` vanilla shape as a GGUF file.

llama.cpp's `llama-batched-bench` needs a model file; for a throughput comparison with
`cargo xtask bench infer` only the shapes matter, so the weights are random and the file
carries no tokenizer (`tokenizer.ggml.model = "none"`, with the vocabulary size set).

    python random_llama_gguf.py OUT.gguf [--layers 32] [--dtype bf16|f32|f16]

Needs numpy and llama.cpp's `gguf-py` on PYTHONPATH (it ships in llama.cpp's source tree,
e.g. the `llama-cpp-python` source package's `vendor/llama.cpp/gguf-py`).
Default shape: d 256, 4 heads / 2 KV heads (head dim 64), SwiGLU 704, vocabulary 4096.
"""

import argparse

import numpy as np
import gguf


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    a = p.parse_args()

    qtype = {
        "bf16": gguf.GGMLQuantizationType.BF16,
        "f16": gguf.GGMLQuantizationType.F16,
        "f32": gguf.GGMLQuantizationType.F32,
    }[a.dtype]
    rng = np.random.default_rng(0)
    d, hd = a.d_model, a.d_model // a.heads
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random-llama-{a.layers}")
    w.add_context_length(a.ctx)
    w.add_embedding_length(d)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ffn)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(a.vocab)
    w.add_tokenizer_model("none")
    w.add_file_type(
        {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "f32": gguf.LlamaFileType.ALL_F32}[a.dtype]
    )

    def mat(name, rows, cols):
        x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        else:
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    def norm(name):
        w.add_tensor(name, np.ones(d, dtype=np.float32))

    mat("token_embd.weight", a.vocab, d)
    for i in range(a.layers):
        norm(f"blk.{i}.attn_norm.weight")
        mat(f"blk.{i}.attn_q.weight", a.heads * hd, d)
        mat(f"blk.{i}.attn_k.weight", a.kv_heads * hd, d)
        mat(f"blk.{i}.attn_v.weight", a.kv_heads * hd, d)
        mat(f"blk.{i}.attn_output.weight", d, a.heads * hd)
        norm(f"blk.{i}.ffn_norm.weight")
        mat(f"blk.{i}.ffn_gate.weight", a.ffn, d)
        mat(f"blk.{i}.ffn_up.weight", a.ffn, d)
        mat(f"blk.{i}.ffn_down.weight", d, a.ffn)
    norm("output_norm.weight")
    mat("output.weight", a.vocab, d)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
