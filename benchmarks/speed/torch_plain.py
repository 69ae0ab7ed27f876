"""A plain PyTorch training script of mlxlab's decoder, written as a PyTorch user would, with
nothing from mlxlab or the harness: the reference bench.py checks its PyTorch row against.
Prints one JSON line: tokens/s over the steps after --warmup (random tokens), each step's seconds.

    python benchmarks/speed/torch_plain.py --vocab 3776 --dim 256 --layers 4 --heads 4 --batch 16 --seq 128
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the two halves of each head (MLX nn.RoPE with traditional=False)."""
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    return torch.cat((lo * cos - hi * sin, lo * sin + hi * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (w(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v,
                                           is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, hidden: int, theta: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        half = dim // heads // 2
        self.inv_freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(tokens.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x) @ self.embed.weight.T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = ("vocab", "dim", "layers", "heads", "batch", "seq")  # required, but not by --smoke
    for name in sizes:
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--mlp-dim", type=int, default=None, help="default: 8/3 dim rounded up to 64")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-3)
    # (written out here, not benchmarks.harness's: this script shares no code with the harness)
    p.add_argument("--smoke", action="store_true",
                   help="the smallest run through this script's code path; figures mean nothing")
    args = p.parse_args()
    if args.smoke:  # a 1-layer decoder, 1 + 2 steps
        args.vocab, args.dim, args.layers, args.heads, args.batch, args.seq = 64, 32, 1, 2, 2, 16
        args.warmup, args.steps = 1, 2
    if missing := [f"--{k}" for k in sizes if getattr(args, k) is None]:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = args.mlp_dim or math.ceil(8 * args.dim / 3 / 64) * 64
    model = Decoder(args.vocab, args.dim, args.layers, args.heads, hidden, args.rope_theta)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    seconds = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    print(json.dumps({
        "tokens_per_s": args.batch * args.seq * len(seconds) / sum(seconds),
        "step_s": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }))


if __name__ == "__main__":
    main()
