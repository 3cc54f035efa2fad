"""A llama-style decoder-only Transformer (pre-norm, RMSNorm, RoPE, SwiGLU).

Parameter names and layout follow mlx-lm's ``models/llama.py`` so weights can
be exported as ``model_type: llama``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from tlm import fastmath


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 0  # 0: llama's rule, 8/3 * hidden rounded up to 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    embed_dropout: float = 0.0  # drops whole word types in training (see WordDropout)

    def __post_init__(self) -> None:
        if not self.intermediate_size:
            self.intermediate_size = -(-8 * self.hidden_size // 3 // 64) * 64

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class KVCache:
    """Keys and values of earlier positions, for incremental decoding.

    ``offset`` counts every position seen (the rotary position of the next
    token). The buffers grow in steps of ``STEP`` positions and are written in
    place (as mlx-lm's caches), not concatenated anew per token. At most
    ``max_size`` positions are kept: past that, each new position overwrites the
    oldest (a ring), so generation runs past the training context with a
    sliding window; a single query attends to all kept keys, whose rotary
    positions were applied before caching, so their order does not matter.
    """

    STEP = 256

    def __init__(self, max_size: Optional[int] = None) -> None:
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.max_size = max_size

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.max_size and self.offset >= self.max_size and n == 1:  # full: the ring
            i = self.offset % self.max_size
            self.keys[:, :, i:i + 1], self.values[:, :, i:i + 1] = keys, values
            self.offset += 1
            return self.keys, self.values
        held = 0 if self.keys is None else min(self.offset, self.keys.shape[2])
        if self.max_size and held + n > self.max_size:  # a long prefill into a window
            k = mx.concatenate([self.keys[:, :, :held], keys], axis=2) if held else keys
            v = mx.concatenate([self.values[:, :, :held], values], axis=2) if held else values
            self.keys, self.values = k[:, :, -self.max_size:], v[:, :, -self.max_size:]
            self.offset += n
            return k, v
        if self.keys is None or held + n > self.keys.shape[2]:
            size = -(-(held + n) // self.STEP) * self.STEP
            size = min(size, self.max_size) if self.max_size else size
            shape = (*keys.shape[:2], size, keys.shape[3])
            grown_k, grown_v = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if held:
                grown_k[:, :, :held], grown_v[:, :, :held] = self.keys[:, :, :held], self.values[:, :, :held]
            self.keys, self.values = grown_k, grown_v
        self.keys[:, :, held:held + n], self.values[:, :, held:held + n] = keys, values
        self.offset += n
        return self.keys[:, :, :held + n], self.values[:, :, :held + n]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, self.n_heads = args.hidden_size, args.num_attention_heads
        self.scale = args.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(args.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: Any, cache: Optional[KVCache] = None) -> mx.array:
        B, L, D = x.shape
        heads = lambda t: t.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fastmath.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.dropout = nn.Dropout(args.dropout)

    def __call__(self, x: mx.array, mask: Any, cache: Optional[KVCache] = None) -> mx.array:
        h = x + self.dropout(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.dropout(self.mlp(self.post_attention_layernorm(h)))


class WordDropout(nn.Module):
    """Embedding dropout (Gal & Ghahramani 2016, as in AWD-LSTM): in training, drop
    whole word types, so every occurrence of a dropped word in the batch loses its
    vector and the model cannot lean on memorised rare words."""

    def __init__(self, vocab_size: int, p: float):
        super().__init__()
        self.vocab_size, self.p = vocab_size, p

    def __call__(self, h: mx.array, inputs: mx.array) -> mx.array:
        if not self.training or self.p == 0:
            return h
        keep = mx.random.bernoulli(1 - self.p, (self.vocab_size,))
        return h * (keep[inputs] / (1 - self.p))[..., None]


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.word_dropout = WordDropout(args.vocab_size, args.embed_dropout)
        self.dropout = nn.Dropout(args.dropout)

    def __call__(self, inputs: mx.array, cache: Optional[list[KVCache]] = None,
                 checkpoint: bool = False) -> mx.array:
        h = self.dropout(self.word_dropout(self.embed_tokens(inputs), inputs))
        # A causal mask is only needed when several new tokens attend to each other.
        mask = "causal" if h.shape[1] > 1 else None
        cache = cache or [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            if checkpoint:
                h = nn.utils.checkpoint(layer)(h, mask)
            else:
                h = layer(h, mask, c)
        return self.dropout(self.norm(h))  # dropout before the output layer too, as AWD-LSTM


class Model(nn.Module):
    """Token ids (B, L) -> next-token logits (B, L, vocab)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # GPT-2/nanoGPT initialisation: N(0, 0.02), residual projections scaled
        # down by depth so the residual stream's variance does not grow.
        residual_std = 0.02 / (2 * args.num_hidden_layers) ** 0.5
        self.update(tree_map_with_path(
            lambda path, p: p if p.ndim < 2 else mx.random.normal(p.shape) * (
                residual_std if path.endswith(("o_proj.weight", "down_proj.weight")) else 0.02),
            self.parameters()))

    def __call__(self, inputs: mx.array, cache: Optional[list[KVCache]] = None,
                 checkpoint: bool = False) -> mx.array:
        h = self.model(inputs, cache, checkpoint)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self, max_size: Optional[int] = None) -> list[KVCache]:
        return [KVCache(max_size) for _ in self.model.layers]
