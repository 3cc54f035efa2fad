"""The PyTorch reference for ``train_throughput.py``: nanoGPT's model and train step on the CPU.

A GPT as in nanoGPT's ``model.py`` (learned positions, LayerNorm, GELU MLP of
4x, causal ``scaled_dot_product_attention``, tied embeddings, no biases,
float32), trained as its ``train.py`` does on a CPU (AdamW, gradient clipping
at 1.0, no ``torch.compile``). Needs only torch and numpy, so it can run in
another environment than tlm's:

    python benchmarks/torch_reference.py SHAPE_JSON STEPS   # prints a JSON line
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, dim: int, blocks: int, heads: int, context: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def measure(dim: int, blocks: int, heads: int, context: int, batch: int, vocab: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = GPT(dim, blocks, heads, context, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    def step() -> None:
        data = torch.randint(0, vocab, (batch, context + 1))
        loss = model(data[:, :-1].contiguous(), data[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return {"tokens_per_sec": steps * batch * context / (time.perf_counter() - tic),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]), int(sys.argv[2]))))
