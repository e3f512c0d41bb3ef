"""One training step of the speed-target model in PyTorch eager, for comparison with
`cargo run --release -p mor-bench --example step_profile cpu`.

Same model as `step_profile`: Llama-style decoder, d=256, 4 layers, 4 heads (head_dim 64,
no GQA), SwiGLU 704, RMSNorm eps 1e-5, RoPE theta 1e4 (non-interleaved), tied embeddings,
N(0, 0.02) init, vocabulary 4096, batch 8 x 256, f32, AdamW (lr 1e-3, betas 0.9/0.95,
weight decay 0.1), fused cross-entropy from PyTorch.

    python3 torch_train_step.py [steps] [manual|sdpa] [threads] [--amp]

`--amp` runs the forward pass and the loss under `torch.autocast("cpu", dtype=torch.bfloat16)`
(PyTorch's mixed precision: bf16 matrix products, f32 master weights and optimiser), the
counterpart of `step_profile cpu STEPS bf16`.

Prints the same line format as `step_profile`. Needs only `torch`.
"""

import contextlib

import math
import sys
import time

import torch
import torch.nn.functional as F

AMP = "--amp" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--amp"]
STEPS = int(ARGS[0]) if len(ARGS) > 0 else 5
ATTN = ARGS[1] if len(ARGS) > 1 else "manual"
THREADS = int(ARGS[2]) if len(ARGS) > 2 else 2
torch.set_num_threads(THREADS)
torch.manual_seed(1)

V, D, L, H, DH, FF, B, T = 4096, 256, 4, 4, 64, 704, 8, 256


class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rope_tables(t, dh):
    inv = 1.0 / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    f = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    return torch.cos(f), torch.sin(f)


def rope(x, cos, sin):
    # non-interleaved: rotate (first half, second half) pairs
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = RMSNorm(D), RMSNorm(D)
        self.q = torch.nn.Linear(D, H * DH, bias=False)
        self.k = torch.nn.Linear(D, H * DH, bias=False)
        self.v = torch.nn.Linear(D, H * DH, bias=False)
        self.o = torch.nn.Linear(H * DH, D, bias=False)
        self.gate = torch.nn.Linear(D, FF, bias=False)
        self.up = torch.nn.Linear(D, FF, bias=False)
        self.down = torch.nn.Linear(FF, D, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, t, H, DH).transpose(1, 2)
        k = self.k(h).view(b, t, H, DH).transpose(1, 2)
        v = self.v(h).view(b, t, H, DH).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if ATTN == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(DH) + mask
            a = torch.softmax(s, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, H * DH))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.layers = torch.nn.ModuleList([Layer() for _ in range(L)])
        self.norm = RMSNorm(D)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, 0.02)
        cos, sin = rope_tables(T, DH)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("mask", torch.triu(torch.full((T, T), float("-inf")), 1))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.mask)
        return self.norm(x) @ self.emb.weight.t()


model = Model()
decay = [p for p in model.parameters() if p.dim() == 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
    lr=1e-3,
    betas=(0.9, 0.95),
    eps=1e-8,
)
ids = torch.randint(0, V, (B, T))
tgt = (ids + 1) % V
tot = [0.0] * 4
for s in range(STEPS + 1):
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if AMP else contextlib.nullcontext()
    t0 = time.perf_counter()
    with amp:
        logits = model(ids)
    t1 = time.perf_counter()
    with amp:
        loss = F.cross_entropy(logits.view(-1, V), tgt.view(-1))
    loss.item()
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    opt.step()
    t4 = time.perf_counter()
    if s > 0:
        for i, (a, z) in enumerate([(t0, t1), (t1, t2), (t2, t3), (t3, t4)]):
            tot[i] += z - a
n = STEPS
step = sum(tot) / n
print(
    f"torch-{ATTN}{'-amp' if AMP else ''}: forward {tot[0]/n:.3f}s, loss {tot[1]/n:.3f}s, backward {tot[2]/n:.3f}s, "
    f"optimiser {tot[3]/n:.3f}s, step {step:.3f}s = {B*T/step:.0f} tokens/s (threads: {THREADS})"
)
