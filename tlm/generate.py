"""Text generation: prefill the prompt once, then one token per step with a KV cache.

Past the training context, generation keeps going with a sliding window over
the cache. Sampling: temperature (0 is greedy), top-k, top-p, min-p and a
repetition penalty, all reproducible from a seed; stops at ``<eos>`` (word
level), ``max_tokens`` or a stop string.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import mlx.core as mx

from tlm.vocab import Tokenizer

if TYPE_CHECKING:
    from tlm.checkpoint import Checkpoint
from tlm.model import Model


@dataclass
class SampleConfig:
    max_tokens: int = 100
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True


def sample_token(logits: mx.array, cfg: SampleConfig, key: mx.array,
                 history: Optional[list[int]] = None) -> int:
    """One token id from next-token logits (shape ``(vocab,)``)."""
    if cfg.repetition_penalty != 1.0 and history:
        seen = mx.array(sorted(set(history)))
        picked = logits[seen]
        logits[seen] = mx.where(picked > 0, picked / cfg.repetition_penalty,
                                picked * cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(mx.argmax(logits).item())
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-cfg.top_k]
        logits = mx.where(logits < kth, -mx.inf, logits)
    probs = mx.softmax(logits)
    if cfg.min_p > 0:
        logits = mx.where(probs < cfg.min_p * probs.max(), -mx.inf, logits)
    if cfg.top_p < 1:
        order = mx.argsort(-probs)
        ranked = probs[order]
        keep = (mx.cumsum(ranked) - ranked) < cfg.top_p  # the smallest set reaching top_p
        logits = mx.where(keep[mx.argsort(order)], logits, -mx.inf)
    return int(mx.random.categorical(logits, key=key).item())


def generate(model: Model, prompt: list[int], cfg: SampleConfig, context_size: int,
             eos: Optional[int] = None) -> Iterator[int]:
    """Yield new token ids after ``prompt`` (its last ``context_size`` tokens are used).

    Uses its own RNG key, so sampling never disturbs a training run's RNG state.
    """
    training = model.training
    model.eval()
    try:
        key = mx.random.key(cfg.seed)
        cache = model.make_cache(max_size=context_size)
        history = list(prompt[-context_size:]) or [eos or 0]
        logits = model(mx.array([history]), cache=cache)[0, -1]
        for _ in range(cfg.max_tokens):
            key, sub = mx.random.split(key)
            token = sample_token(logits, cfg, sub, history)
            if cfg.stop_at_eos and eos is not None and token == eos:
                return
            yield token
            history.append(token)
            logits = model(mx.array([[token]]), cache=cache)[0, -1]
    finally:
        model.train(training)


def generate_text(model: Model, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig,
                  context_size: int) -> Iterator[str]:
    """Stream the continuation of ``prompt`` as text pieces, honouring stop strings.

    Decoding the whole continuation at each step keeps multi-byte characters
    and BPE merges intact across token boundaries.
    """
    lead = " " if tokenizer.kind == "word" and prompt else ""
    ids: list[int] = []
    shown = ""
    for token in generate(model, tokenizer.encode(prompt), cfg, context_size, tokenizer.eos):
        ids.append(token)
        text = lead + tokenizer.decode(ids)
        hit = min((text.find(s) for s in cfg.stop if s in text), default=-1)
        if hit >= 0:
            yield text[len(shown):hit]
            return
        yield text[len(shown):]
        shown = text


class ModelCache:
    """Recently used checkpoints' models, so repeated sampling skips loading and hashing.

    Checkpoints are content-addressed (SHA1 names), so a cached model stays
    valid as long as its file is unchanged; the newest checkpoint is found from
    names and headers alone.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: OrderedDict[tuple[str, str], tuple[int, "Checkpoint", Model]] = OrderedDict()

    def load(self, save_dir: str, identifier: Optional[str], warn=lambda m: None
             ) -> tuple["Checkpoint", Model, bool]:
        """The checkpoint and its model, and whether they came from the cache."""
        from tlm import checkpoint

        name = identifier if identifier and len(identifier) == 40 else None
        name = name or (None if identifier else checkpoint.newest_name(save_dir))
        key = (str(save_dir), name or "")
        hit = self.entries.get(key)
        if name and hit:
            try:
                if hit[0] == (Path(save_dir) / f"{name}.safetensors").stat().st_mtime_ns:
                    self.entries.move_to_end(key)
                    return hit[1], hit[2], True
            except FileNotFoundError:
                pass
        ckpt = checkpoint.find(save_dir, identifier, warn=warn)
        if ckpt is None:
            raise checkpoint.CheckpointError(
                f"no checkpoint in {save_dir}: train one first, e.g. `tlm train --save_dir {save_dir}`")
        model = ckpt.load_model()
        self.entries[(str(save_dir), ckpt.identifier)] = (ckpt.weights_path.stat().st_mtime_ns, ckpt, model)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return ckpt, model, False


MODELS = ModelCache()


def sample_checkpoint(save_dir: str, identifier: Optional[str], prompt: str, cfg: SampleConfig,
                      num_samples: int = 1, warn=lambda m: None) -> dict:
    """Continuations of ``prompt`` from a checkpoint (seeds ``cfg.seed``, ``cfg.seed + 1``, ...)."""
    ckpt, model, cached = MODELS.load(save_dir, identifier, warn)
    tokenizer = ckpt.tokenizer
    context = ckpt.state["config"]["context_size"]
    samples = ["".join(generate_text(model, tokenizer, prompt, replace(cfg, seed=cfg.seed + i), context))
               for i in range(num_samples)]
    return {"checkpoint": ckpt.identifier, "step": ckpt.step, "samples": samples,
            "unknown": tokenizer.unknown(prompt), "model_cached": cached}
