"""The optimizer and its learning-rate schedule: AdamW or Muon, warmup then a cosine or a
warmup-stable-decay decay over steps, or over the time spent under ``--time_budget``."""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim

from tlm import parallel
from tlm.config import TrainConfig

FINAL_RATE = 0.1  # the decay ends at this fraction of the peak learning rate


def decay(config: TrainConfig, fraction: mx.array) -> mx.array:
    """The peak rate's multiplier after warmup, ``fraction`` of the way through training: a
    cosine from 1 to a tenth, or with ``--lr_cooldown C`` 1 until the last C of training, then
    linear to a tenth (the warmup-stable-decay schedule of the modded-nanoGPT speedruns)."""
    f = mx.clip(fraction, 0.0, 1.0)
    shape = mx.minimum(1.0, (1 - f) / config.lr_cooldown) if config.lr_cooldown else 0.5 * (1 + mx.cos(math.pi * f))
    return FINAL_RATE + (1 - FINAL_RATE) * shape


def cooling(config: dict, step: int, elapsed: float) -> bool:
    """Whether a run (its recorded ``config``) at ``step``, ``elapsed`` seconds of training, has
    begun its ``--lr_cooldown``: the checkpoint before that is where it can be trained on (a
    branch) without its rate climbing back from a finished cooldown."""
    if not config.get("lr_cooldown"):
        return False
    if config.get("time_budget"):
        fraction = max(elapsed / (config["time_budget"] * 60), step / config["num_iters"])
    else:
        warm = min(config.get("lr_warmup", 0), config["num_iters"])
        fraction = (step - warm) / max(config["num_iters"] - warm, 1)
    return fraction > 1 - config["lr_cooldown"]


def make_schedule(config: TrainConfig, peak: Optional[float] = None) -> Callable | float:
    """Linear warmup to the peak rate (default ``--learning_rate``), then :func:`decay` over the steps.

    With ``--time_budget`` the rate is the peak until the trainer sets it from
    the time spent (:func:`follow_budget`).
    """
    peak = config.learning_rate if peak is None else peak
    if config.time_budget:
        return peak
    warmup = min(config.lr_warmup, config.num_iters)
    span = max(config.num_iters - warmup, 1)

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)  # the optimizer's count is unsigned: step - warmup would wrap
        return peak * (mx.minimum(1.0, step / warmup) if warmup else 1.0) * decay(config, (step - warmup) / span)
    return schedule


class Muon(optim.Muon):
    """MLX's Muon with AdamW's decoupled weight decay (the weights shrink by
    ``lr * weight_decay`` each step) instead of decay added to the gradient, where the
    orthogonalisation would normalise it together with the gradient."""

    def __init__(self, learning_rate: Callable | float, weight_decay: float):
        super().__init__(learning_rate, weight_decay=0.0)
        self.decoupled_decay = weight_decay

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        shrink = 1 - self.learning_rate.astype(parameter.dtype) * self.decoupled_decay
        return super().apply_single(gradient, parameter * shrink, state)


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    """AdamW, or Muon for the blocks' weight matrices with AdamW for the rest.

    Muon (orthogonalised momentum) is what the modded-nanoGPT speedruns train
    matrices with; on Tiny Shakespeare it reached validation loss 1.73 where
    AdamW reached 2.06 after the same 650 steps (``benchmarks/race.py``).
    Embeddings, the output layer and the norms stay on AdamW, as there.
    """
    adamw = optim.AdamW(learning_rate=make_schedule(config), weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        optimizer = adamw
    else:
        muon = Muon(learning_rate=make_schedule(config, config.muon_learning_rate),
                    weight_decay=config.weight_decay)
        for_adamw = lambda path, p: p.ndim < 2 or not path.startswith("model.layers.")
        optimizer = optim.MultiOptimizer([adamw, muon], [for_adamw])
    parallel.spread_updates(optimizer)
    return optimizer


def follow_budget(optimizer: optim.Optimizer, config: TrainConfig, step: int, spent: float) -> None:
    """Set the rates for ``--time_budget``: :func:`make_schedule`'s warmup over steps, times its
    :func:`decay` over the fraction of the budget ``spent`` (or of ``--num_iters``, where those
    end training first) instead of the steps.

    A slower machine then takes fewer steps, but still ends on a decayed rate on time.
    """
    warm = min(1.0, step / config.lr_warmup) if config.lr_warmup else 1.0
    factor = decay(config, mx.array(max(spent, step / config.num_iters)))
    parts = getattr(optimizer, "optimizers", [optimizer])  # make_optimizer's order: AdamW, Muon
    for part, peak in zip(parts, (config.learning_rate, config.muon_learning_rate)):
        part.learning_rate = peak * warm * factor

