"""Text generation: prefill the prompt once, then one token per step with a KV cache."""

from __future__ import annotations

from typing import Iterator, Optional

import mlx.core as mx

from tlm.model import Model


def sample_token(logits: mx.array, temperature: float, top_k: int, key: Optional[mx.array]) -> int:
    """Greedy at temperature 0, else sample from the ``top_k`` most likely tokens."""
    if temperature == 0:
        return int(mx.argmax(logits, axis=-1).item())
    if 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -top_k, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    return int(mx.random.categorical(logits / temperature, key=key).item())


def generate(model: Model, prompt: list[int], max_tokens: int, temperature: float = 0.5,
             top_k: int = 50, seed: int = 0) -> Iterator[int]:
    """Yield up to ``max_tokens`` new token ids after ``prompt``.

    Uses its own RNG key, so sampling never disturbs a training run's RNG state.
    """
    training = model.training
    model.eval()
    try:
        key = mx.random.key(seed)
        cache = model.make_cache()
        logits = model(mx.array([prompt]), cache=cache)[0, -1]
        for _ in range(max_tokens):
            key, sub = mx.random.split(key)
            token = sample_token(logits, temperature, top_k, sub)
            yield token
            logits = model(mx.array([[token]]), cache=cache)[0, -1]
    finally:
        model.train(training)
