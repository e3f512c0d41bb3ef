#!/usr/bin/env python3
"""Makes the tiny Hugging Face Llama fixture of `mor-models/tests/hf_import.rs`.

A random `LlamaForCausalLM` (hidden 64, 2 layers, 4 query heads / 2 KV heads of head_dim 8,
so head_dim != hidden / heads; intermediate 128; vocab 256; untied LM head; rope_theta
500000; rms_norm_eps 1e-6) saved as f32 safetensors with a small word-level
`tokenizer.json`, and transformers' logits for a fixed id sequence in
`reference.safetensors` (`input_ids` i64 [1, T], `logits` f32 [1, T, 256]).

Usage (needs torch, transformers and tokenizers; CI never runs this):
    python mor-models/python/make_hf_fixture.py [OUT_DIR]
OUT_DIR defaults to mor-models/tests/fixtures/hf_tiny.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 256
INPUT_IDS = [1, 17, 200, 3, 99, 42, 255, 0, 128, 7, 64, 31]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "tests", "fixtures", "hf_tiny")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).float().eval()
    # Norm weights away from 1 so that a norm loaded in the wrong place shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for i in range(2, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(out, "tokenizer.json"))

    ids = torch.tensor([INPUT_IDS], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file({"input_ids": ids, "logits": logits}, os.path.join(out, "reference.safetensors"))
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)
    print("wrote", out, "logits", tuple(logits.shape))


if __name__ == "__main__":
    main()
