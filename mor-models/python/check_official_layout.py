#!/usr/bin/env python3
"""Loads mor's official-layout exports into the official model structure with a strict
`load_state_dict`, and compares logits where the computation is plain Llama.

Usage:
    MOR_OFFICIAL_CHECK_DIR=/tmp/offl cargo test -p mor-models --test official_roundtrip
    python mor-models/python/check_official_layout.py /tmp/offl

For every exported folder DIR/<name> (model.safetensors, config.json, mor_config.json) it

1. converts the weights to the `pytorch_model.bin` the official evaluation reads
   (`torch.load`), the one-line conversion documented in docs/official-layout.md:

       torch.save(safetensors.torch.load_file("model.safetensors"), "pytorch_model.bin")

2. builds the official module tree from `transformers`' `LlamaForCausalLM` (config.json)
   the way the official code does (read from raymin0223/mixture_of_recursions: the
   sharing strategy ties `nn.Parameter`s across positions, `model/sharing_strategy/llama.py`;
   the MoR transforms regroup the positions, `model/mor_model/modeling_llama.py`, with
   routers from `model/mor_model/util.py`). The official modules themselves are not
   imported: they pin a transformers 4.5x copy of `modeling_llama`, hydra and flash-attn.
   This script rebuilds the same module names and parameter shapes, so the key set it
   checks is the one their `state_dict()` has;
3. loads the converted file with `load_state_dict(strict=True)`, checks that every alias
   group still shares one storage, and saves `pytorch_model.bin` again from the tied model
   (shared storage, like the released checkpoints);
4. for vanilla and recursive models (plain Llama computation with tied weights), runs the
   forward on the ids mor used and reports the largest relative logit difference against
   DIR/<name>.logits.safetensors. MoR forwards (routing) are not re-implemented here.
"""

import json
import os
import sys

import safetensors.torch
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def groups(L, n, sharing):
    """Positions tied together by the official sharing strategy (spec §2)."""
    if sharing in ("cycle", "sequence"):
        b = L // n
        off = 0
    else:
        b = (L - 2) // n
        off = 1
    out = []
    for j in range(b):
        if sharing.endswith("cycle"):
            out.append([off + j + r * b for r in range(n)])
        else:
            out.append(list(range(off + j * n, off + (j + 1) * n)))
    return out


LAYER_PARAMS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
NORMS = ["input_layernorm", "post_attention_layernorm"]


def get(mod, path):
    for p in path.split("."):
        mod = getattr(mod, p)
    return mod


def tie(layers, idxs, ln_share):
    """Ties the weights of `layers[idxs]` to the first one (Parameter aliasing)."""
    names = LAYER_PARAMS + (NORMS if ln_share else [])
    for name in names:
        ref = get(layers[idxs[0]], name).weight
        for i in idxs[1:]:
            get(layers[i], name).weight = ref


class Router(nn.Module):
    """`router` is one bias-free Linear (linear) or Linear-GELU-Linear (mlp, wide_mlp)."""

    def __init__(self, h, out, kind):
        super().__init__()
        if kind == "linear":
            self.router = nn.Linear(h, out, bias=False)
        else:
            self.router = nn.Sequential(
                nn.Linear(h, 2 * h, bias=False), nn.GELU(), nn.Linear(2 * h, out, bias=False)
            )


class ExpertStep(nn.Module):
    def __init__(self, block, h, mor):
        super().__init__()
        self.block = nn.ModuleList(block)
        if not mor.get("rand_router"):
            self.mor_router = Router(h, 1, mor["router_type"])
            if mor["expert"].get("sampling") == "aux_router":
                self.mlp_router = Router(h, 1, mor["router_type"])


class TokenStack(nn.Module):
    def __init__(self, block_list, h, n, mor):
        super().__init__()
        self.block_list = nn.ModuleList([nn.ModuleList(b) for b in block_list])
        if not mor.get("rand_router"):
            self.mor_router = Router(h, n, mor["router_type"])
        if mor["token"].get("balancing") == "loss_free":
            self.register_parameter(
                "router_bias", nn.Parameter(torch.zeros(n), requires_grad=False)
            )


def build(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    s = json.load(open(os.path.join(folder, "mor_config.json")))
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    layers = model.model.layers
    L = len(layers)
    rec = s["recursive"]
    alias = []
    if rec["enable"]:
        alias = groups(L, rec["num_recursion"], rec["sharing"])
        for g in alias:
            tie(layers, g, rec["ln_share"])
    mor = s["mor"]
    if mor["enable"]:
        n = rec["num_recursion"]
        h = config.hidden_size
        middle = rec["sharing"] == "middle_cycle"
        b = (L - 2) // n if middle else L // n
        off = 1 if middle else 0
        steps = [[layers[off + j + r * b] for j in range(b)] for r in range(n)]
        if mor["type"] == "expert":
            mods = [ExpertStep(st, h, mor) for st in steps]
        else:
            assert middle, "token-choice runs middle_cycle only"
            mods = [TokenStack(steps, h, n, mor)]
        if middle:
            mods = [layers[0]] + mods + [layers[-1]]
        model.model.layers = nn.ModuleList(mods)
    return model, alias, s


def check(folder):
    name = os.path.basename(folder.rstrip("/"))
    sd = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
    bin_path = os.path.join(folder, "pytorch_model.bin")
    torch.save(sd, bin_path)
    model, alias, s = build(folder)
    loaded = torch.load(bin_path)
    res = model.load_state_dict(loaded, strict=True)
    assert not res.missing_keys and not res.unexpected_keys, res
    theirs = model.state_dict()
    assert set(theirs) == set(loaded), "key sets differ"
    for k, v in theirs.items():
        assert tuple(v.shape) == tuple(loaded[k].shape), k
    # Ties survive the load; the embedding and the LM head share when tied.
    shared = {}
    for k, v in theirs.items():
        shared.setdefault(v.data_ptr(), []).append(k)
    n_alias = sum(len(g) - 1 for g in shared.values())
    torch.save(theirs, bin_path)
    msg = f"{name}: strict load ok, {len(theirs)} keys, {len(shared)} storages ({n_alias} aliases)"
    logits_path = folder.rstrip("/") + ".logits.safetensors"
    if not s["mor"]["enable"] and os.path.exists(logits_path):
        ref = safetensors.torch.load_file(logits_path)
        with torch.no_grad():
            out = model(input_ids=ref["ids"]).logits
        rel = ((out - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
        msg += f", max relative logit difference vs mor {rel:.2e}"
        assert rel < 1e-5, msg
    print(msg)


def main():
    root = sys.argv[1]
    folders = sorted(
        os.path.join(root, d)
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d))
    )
    for f in folders:
        check(f)


if __name__ == "__main__":
    main()
