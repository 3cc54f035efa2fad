"""Text generation: prefill the prompt once, then one token per step with a KV cache.

Past the training context, generation keeps going with a sliding window over
the cache. Sampling: temperature (0 is greedy), top-k, top-p, min-p and a
repetition penalty, all on the device and reproducible from a seed; word-level
``<eos>`` reads as a line break (``stop_at_eos`` stops there) and ``<unk>`` is
never sampled (``allow_unk``); stops at ``max_tokens`` or a stop string.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx

from tlm import checkpoint
from tlm.checkpoint import Checkpoint
from tlm.model import Model
from tlm.vocab import Tokenizer


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
    stop_at_eos: bool = False  # word level: <eos> is a line break unless this is set
    allow_unk: bool = False  # word level: never sample <unk> unless this is set


def make_sampler(cfg: SampleConfig, vocab_size: int, banned: Optional[int] = None
                 ) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """``sample(logits, history, key) -> token``, all on the device (no host round trip).

    ``logits`` (vocab,), ``history`` the ids so far (repetition penalty). top-k
    by partition, not a full sort; top-p sorts only the kept candidates.
    """
    top_k = cfg.top_k if 0 < cfg.top_k < vocab_size else 0

    def sample(logits: mx.array, history: mx.array, key: mx.array) -> mx.array:
        if banned is not None:
            logits = logits.at[banned].add(-mx.inf)
        if cfg.repetition_penalty != 1.0:
            picked = logits[history]
            logits[history] = mx.where(picked > 0, picked / cfg.repetition_penalty,
                                       picked * cfg.repetition_penalty)
        if cfg.temperature == 0:
            return mx.argmax(logits)
        logits = logits / cfg.temperature
        if top_k:
            kth = mx.partition(logits, -top_k)[-top_k]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if cfg.min_p > 0 or cfg.top_p < 1:
            probs = mx.softmax(logits)
            if cfg.min_p > 0:
                logits = mx.where(probs < cfg.min_p * probs.max(), -mx.inf, logits)
            if cfg.top_p < 1:
                order = mx.argsort(-probs)
                ranked = probs[order]
                keep = (mx.cumsum(ranked) - ranked) < cfg.top_p  # the smallest set reaching top_p
                logits = mx.where(keep[mx.argsort(order)], logits, -mx.inf)
        return mx.random.categorical(logits, key=key)
    return sample


def generate(model: Model, prompt: list[int], cfg: SampleConfig, context_size: int,
             eos: Optional[int] = None, unk: Optional[int] = None) -> Iterator[int]:
    """Yield new token ids after ``prompt`` (its last ``context_size`` tokens are used).

    As mlx-lm's ``generate_step``: the next step is queued (``mx.async_eval``)
    before the current token is read, so the device never waits on Python.
    Uses its own RNG key, so sampling never disturbs a training run's RNG state.
    ``unk`` is never sampled unless ``cfg.allow_unk``.
    """
    training = model.training
    model.eval()
    sample = make_sampler(cfg, model.args.vocab_size, None if cfg.allow_unk else unk)
    cache = model.make_cache(max_size=context_size)
    history = mx.array(list(prompt[-context_size:]) or [eos or 0])
    key = mx.random.key(cfg.seed)

    # Greedy decoding needs no keys, and only a repetition penalty needs the history.
    keyed, track = cfg.temperature > 0, cfg.repetition_penalty != 1.0

    def step(tokens: mx.array, history: mx.array, key: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        key, sub = mx.random.split(key) if keyed else (key, key)
        token = sample(model(tokens[None], cache=cache)[0, -1], history, sub)
        return token, mx.concatenate([history, token[None]]) if track else history, key

    try:
        token, history, key = step(history, history, key)
        mx.async_eval(token, history)
        for n in range(cfg.max_tokens):
            if n + 1 < cfg.max_tokens:
                ahead = step(token[None], history, key)
                mx.async_eval(*ahead)
            value = token.item()
            if cfg.stop_at_eos and eos is not None and value == eos:
                return
            yield value
            if n + 1 < cfg.max_tokens:
                token, history, key = ahead
    finally:
        model.train(training)


def generate_text(model: Model, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig,
                  context_size: int) -> Iterator[str]:
    """Stream the continuation of ``prompt`` as text pieces, honouring stop strings.

    Decoding the whole continuation at each step keeps multi-byte characters
    and BPE merges intact across token boundaries; word-level ``<eos>`` reads as
    a line break.
    """
    ids: list[int] = []
    shown = ""
    for token in generate(model, tokenizer.encode(prompt), cfg, context_size, tokenizer.eos,
                          tokenizer.unk):
        ids.append(token)
        text = tokenizer.decode(ids)
        if tokenizer.kind == "word" and prompt and not text.startswith("\n"):
            text = " " + text
        hit = min((text.find(s) for s in cfg.stop if s and s in text), default=-1)
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
        ckpt, model = checkpoint.read(save_dir, identifier, lambda c: c.load_model(), warn)
        if ckpt is None or model is None:
            raise checkpoint.CheckpointError(
                f"no checkpoint in {save_dir}: train one first, e.g. `tlm train --save_dir {save_dir}`")
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
