#!/usr/bin/env python3
"""Loads folders written by `cargo xtask export --format hf` with transformers'
`LlamaForCausalLM.from_pretrained` and compares its logits with mor's.

Each `DIR/<name>` folder is checked against `DIR/<name>.logits.safetensors` (`input_ids`
i64 [b, t], `logits` f32 [b, t, vocab]), which `mor-models/tests/hf_export.rs` writes when
run with `MOR_HF_CHECK_DIR=DIR`:

    MOR_HF_CHECK_DIR=/tmp/hfx cargo test -p mor-models --test hf_export
    python mor-models/python/check_hf_export.py /tmp/hfx

Needs torch and transformers; CI never runs this. Exits 1 when a relative difference
(max |a - b| / max |b|) exceeds --tol (default 1e-5).
"""
import argparse
import glob
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    refs = sorted(glob.glob(os.path.join(args.dir, "*.logits.safetensors")))
    if not refs:
        print(f"no *.logits.safetensors in {args.dir}", file=sys.stderr)
        return 1
    worst = 0.0
    for ref in refs:
        name = os.path.basename(ref)[: -len(".logits.safetensors")]
        folder = os.path.join(args.dir, name)
        r = load_file(ref)
        model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        try:
            AutoTokenizer.from_pretrained(folder)
            tok = "tokenizer loads"
        except Exception as e:  # noqa: BLE001 - report, the weights are what is checked
            tok = f"tokenizer does not load with AutoTokenizer: {e}"
        with torch.no_grad():
            got = model(input_ids=r["input_ids"]).logits.float()
        want = r["logits"]
        diff = (got - want).abs().max().item()
        rel = diff / want.abs().max().item()
        worst = max(worst, rel)
        print(f"{name}: max |diff| {diff:.3e}, relative {rel:.3e}; {tok}")
    print(f"worst relative difference {worst:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
