"""The PyTorch row of benchmarks/speed/bench.py: mlxlab's decoder and BERT classifier in PyTorch,
trained CPU eager on the batches the mlxlab row saved, in a process that never imports mlxlab,
MLX or mlxlab's OpenBLAS (checked: with them loaded PyTorch ran 3.7x slower).

    python benchmarks/speed/bench_torch.py --spec SPEC.json     (started by bench.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h  # noqa: E402


def torch_models():
    """The mlxlab decoder and BERT classifier in PyTorch, same sizes and formulations."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim, heads, bias, rope_theta=None):
            super().__init__()
            self.heads, self.rope_theta = heads, rope_theta
            self.query, self.key, self.value, self.out = (nn.Linear(dim, dim, bias=bias)
                                                          for _ in range(4))
            self.rope_cache: dict[int, tuple] = {}

        def rope(self, x):  # MLX nn.RoPE(traditional=False): rotate the two halves of a head
            t, d = x.shape[2], x.shape[3]
            key = (t, x.device)  # made on the input's device (a GPU run: cuda)
            if key not in self.rope_cache:
                arange = partial(torch.arange, dtype=torch.float32, device=x.device)
                freqs = self.rope_theta ** (-arange(0, d // 2) / (d // 2))
                angles = arange(t)[:, None] * freqs[None, :]
                self.rope_cache[key] = (angles.cos(), angles.sin())
            cos, sin = self.rope_cache[key]
            x1, x2 = x[..., : d // 2], x[..., d // 2 :]
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

        def forward(self, x, mask=None, causal=False):
            b, t, d = x.shape

            def heads(z):
                return z.view(b, t, self.heads, -1).transpose(1, 2)

            q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
            if self.rope_theta is not None:
                q, k = self.rope(q), self.rope(k)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            return self.out(o.transpose(1, 2).reshape(b, t, d))

    class SwiGLU(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.gate = nn.Linear(dim, hidden, bias=False)
            self.up = nn.Linear(dim, hidden, bias=False)
            self.down = nn.Linear(hidden, dim, bias=False)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    class DecoderBlock(nn.Module):
        def __init__(self, dim, heads, hidden, theta):
            super().__init__()
            self.attention = Attention(dim, heads, bias=False, rope_theta=theta)
            self.attention_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
            self.mlp = SwiGLU(dim, hidden)

        def forward(self, x):
            x = x + self.attention(self.attention_norm(x), causal=True)
            return x + self.mlp(self.mlp_norm(x))

    class Transformer(nn.Module):
        """RMSNorm, SwiGLU, RoPE, tied embeddings:
        mlxlab.models.decoders.transformer.Transformer."""

        def __init__(self, vocab_size, dim, num_layers, num_heads, mlp_dim=None,
                     rope_theta=10000.0, **cfg):
            super().__init__()
            unsupported = {
                k: v for k, v in cfg.items()
                if k in ("norm", "mlp", "positions", "tie_embeddings", "num_kv_heads", "dropout")
                and v not in ("rmsnorm", "swiglu", "rope", True, None, 0.0)
            }
            if unsupported:
                raise ValueError(f"the PyTorch decoder implements the default preset only: {unsupported}")
            hidden = mlp_dim or (int(8 * dim / 3) + 63) // 64 * 64
            self.embed_tokens = nn.Embedding(vocab_size, dim)
            self.layers = nn.ModuleList(DecoderBlock(dim, num_heads, hidden, rope_theta)
                                        for _ in range(num_layers))
            self.norm = nn.RMSNorm(dim, eps=1e-5)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed_tokens(input_ids)
            for layer in self.layers:
                h = layer(h)
            return F.linear(self.norm(h), self.embed_tokens.weight)

    class EncoderBlock(nn.Module):
        def __init__(self, dim, heads, hidden, dropout, eps, pre_norm):
            super().__init__()
            self.pre_norm = pre_norm
            self.attention = Attention(dim, heads, bias=True)
            self.attention_norm = nn.LayerNorm(dim, eps=eps)
            self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.mlp_norm = nn.LayerNorm(dim, eps=eps)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x, mask):  # pre-LN (mlxlab's default) or post-LN (original BERT)
            if self.pre_norm:
                x = x + self.dropout(self.attention(self.attention_norm(x), mask))
                return x + self.dropout(self.down(F.gelu(self.up(self.mlp_norm(x)))))
            x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
            return self.mlp_norm(x + self.dropout(self.down(F.gelu(self.up(x)))))

    class BertClassifier(nn.Module):
        """mlxlab.models.encoders.bert.BertClassifier (pre- or post-LN, exact GELU, optional pooler,
        token type 0)."""

        def __init__(self, vocab_size, num_labels, hidden_size, num_layers, num_heads,
                     intermediate_size=None, max_position=512, type_vocab_size=2, dropout=None,
                     norm_position="post", pooler=None, layer_norm_eps=1e-12, **cfg):
            super().__init__()
            if cfg.get("pretrained"):
                raise ValueError("the PyTorch BERT implements models trained from scratch only")
            # None = mlxlab's choice from scratch (models/encoders/bert.py; not imported here): no
            # pooler, dropout 0.3
            dropout = 0.3 if dropout is None else dropout
            d, eps = hidden_size, layer_norm_eps
            self.word_embeddings = nn.Embedding(vocab_size, d)
            self.position_embeddings = nn.Embedding(max_position, d)
            self.token_type_embeddings = nn.Embedding(type_vocab_size, d)
            self.embed_norm, self.dropout = nn.LayerNorm(d, eps=eps), nn.Dropout(dropout)
            self.layers = nn.ModuleList(
                EncoderBlock(d, num_heads, intermediate_size or 4 * d, dropout, eps,
                             norm_position == "pre")
                for _ in range(num_layers)
            )
            self.final_norm = nn.LayerNorm(d, eps=eps) if norm_position == "pre" else nn.Identity()
            self.pooler = nn.Linear(d, d) if pooler else None
            self.classifier = nn.Linear(d, num_labels)

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            h = self.word_embeddings(input_ids) + self.position_embeddings.weight[:t]
            h = self.dropout(self.embed_norm(h + self.token_type_embeddings.weight[0]))
            mask = attention_mask.bool()[:, None, None, :]
            for layer in self.layers:
                h = layer(h, mask)
            h = self.final_norm(h)[:, 0]
            if self.pooler is not None:
                h = torch.tanh(self.pooler(h))
            return self.classifier(self.dropout(h))

    return Transformer, BertClassifier


def torch_warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """mlxlab's warmup_cosine with PyTorch's own schedulers: linear from lr/warmup to lr over the
    warmup steps, then cosine to min_lr_ratio * lr at total_steps."""
    import torch

    sched = torch.optim.lr_scheduler
    warmup_steps = min(warmup_steps, total_steps - 1)
    lr = optimizer.param_groups[0]["lr"]
    cosine = sched.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=lr * min_lr_ratio)
    if warmup_steps <= 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                            total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def worker_torch(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    ref = spec["reference"]
    meta, hp = ref["meta"], ref["trainer"]
    batches = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
               for b in h.load_batches(spec["batches"])]
    for b in batches:
        for key in ("input_ids", "labels"):
            b[key] = b[key].long()
    base = h.rss_mb()
    Transformer, BertClassifier = torch_models()
    cfg = {k: v for k, v in ref["model_cfg"].items() if k not in ("_target_", "lora")}
    if meta["task"] == "lm":
        cfg.pop("max_seq_len", None)
        model = Transformer(meta["vocab_size"], **cfg)
    else:
        model = BertClassifier(meta["vocab_size"], meta["num_labels"], **cfg)
    model.train()
    adamw = partial(torch.optim.AdamW, model.parameters(), lr=hp["learning_rate"],
                    weight_decay=hp["weight_decay"])
    try:
        optimizer = adamw(fused=True)
    except (RuntimeError, TypeError):
        optimizer = adamw(foreach=True)

    def loss_of(batch):
        if meta["task"] == "lm":
            logits = model(batch["input_ids"])
            ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"].flatten()
            return (ce * mask).sum() / mask.sum().clamp(min=1.0)
        return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    times = [h.clock()]
    for k, batch in enumerate(batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        optimizer.step()
        times.append(h.clock())
        if k == spec["warmup"]:
            h.reset_peak_rss()
    return {
        "times": times, "mx_peak_mb": None, "rss_mb": h.peak_rss_mb() - base,
        "params": sum(p.numel() for p in model.parameters()),
        "optimizer": "fused" if optimizer.defaults.get("fused") else "foreach",
    }


def smoke_spec(folder: Path) -> Path:
    """A spec of bench.py's shape without bench.py: a 1-layer decoder, 3 steps of random ids."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 64, (2, 17)) for _ in range(3)]
    h.save_batches(folder / "batches.npz", [
        {"input_ids": i[:, :-1], "labels": i[:, 1:], "loss_mask": np.ones((2, 16), np.float32)}
        for i in ids])
    spec = {"threads": 1, "warmup": 1, "batches": str(folder / "batches.npz"),
            "result": str(folder / "result.json"),
            "reference": {"meta": {"task": "lm", "vocab_size": 64, "num_labels": None},
                          "trainer": {"learning_rate": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0},
                          "model_cfg": {"dim": 32, "num_layers": 1, "num_heads": 2}}}
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_options(parser, spec=(None, "the JSON spec bench.py writes"))
    args = parser.parse_args()
    if args.smoke:
        args.spec = str(smoke_spec(h.smoke_dir("bench_torch")))
    if not args.spec:
        parser.error("--spec is required")
    spec = json.loads(Path(args.spec).read_text())
    result = worker_torch(spec)
    h.refuse_foreign("bench_torch")
    result["clean"] = True
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
