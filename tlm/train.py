"""The training loop: a compiled AdamW step, warmup + cosine schedule, whole-split evaluation.

``train()`` knows nothing of terminals or queues: callers pass a ``should_stop``
callback (checked after every step) and an ``on_progress`` callback that
receives :class:`Progress` events.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from tlm.config import ConfigError, TrainConfig
from tlm.data import Batches, Dataset, eval_windows, load_dataset
from tlm.model import Model, ModelArgs


@dataclass
class Progress:
    """One event of a training run, for whoever displays or records it."""

    kind: str  # "start", "report", "eval", "message", "done"
    step: int
    total: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    learning_rate: Optional[float] = None
    it_per_sec: Optional[float] = None
    tokens_per_sec: Optional[float] = None
    peak_memory_gb: Optional[float] = None
    message: str = ""
    bits_per_char: bool = False

    @property
    def val_metric(self) -> Optional[float]:
        """Perplexity for word-level data, bits per character for character-level data."""
        if self.val_loss is None:
            return None
        return self.val_loss / math.log(2) if self.bits_per_char else math.exp(self.val_loss)


@dataclass
class TrainResult:
    step: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    test_loss: Optional[float] = None
    stopped: bool = False
    history: list[Progress] = field(default_factory=list)


def model_args(config: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, hidden_size=config.dim,
                     num_hidden_layers=config.num_blocks, num_attention_heads=config.num_heads,
                     tie_word_embeddings=config.tie_embeddings, dropout=config.dropout)


def make_schedule(config: TrainConfig) -> Callable:
    """Linear warmup to the peak rate, then cosine decay to a tenth of it."""
    peak, warmup = config.learning_rate, min(config.lr_warmup, config.num_iters)
    decay = optim.cosine_decay(peak, max(config.num_iters - warmup, 1), peak * 0.1)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), decay], [warmup])


def loss_fn(model: Model, inputs: mx.array, targets: mx.array, checkpoint: bool = False) -> mx.array:
    logits = model(inputs, checkpoint=checkpoint)
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def evaluate(model: Model, tokens: np.ndarray, context_size: int, batch_size: int) -> float:
    """Mean cross-entropy over every token of a split (no sampling of batches)."""
    model.eval()

    @partial(mx.compile, inputs=model.state)
    def summed(x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="sum")

    total, count = mx.array(0.0), 0
    for x, y in eval_windows(tokens, context_size, batch_size):
        total = total + summed(mx.array(x), mx.array(y))
        count += y.size
        mx.eval(total)
    model.train()
    return total.item() / count


class Trainer:
    """Holds a run's model, optimizer and data position; ``run()`` trains it."""

    def __init__(self, config: TrainConfig, dataset: Dataset):
        config.validate()
        self.config, self.dataset = config, dataset
        mx.random.seed(config.seed)
        self.model = Model(model_args(config, dataset.vocab_size))
        mx.eval(self.model.parameters())
        self.optimizer = optim.AdamW(learning_rate=make_schedule(config),
                                     weight_decay=config.weight_decay)
        self.batches = Batches(dataset.train, config.context_size, config.batch_size, config.seed)
        self.step = 0
        self.best_val: Optional[float] = None
        self._train_step = self._compile_step()

    def _compile_step(self) -> Callable[[mx.array], mx.array]:
        model, optimizer, clip = self.model, self.optimizer, self.config.grad_clip
        loss_and_grad = nn.value_and_grad(model, partial(loss_fn, checkpoint=self.config.checkpoint))
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch: mx.array) -> mx.array:
            loss, grads = loss_and_grad(model, batch[:, :-1], batch[:, 1:])
            if clip > 0:
                grads, _ = optim.clip_grad_norm(grads, clip)
            optimizer.update(model, grads)
            return loss

        self._state = state
        return step

    def num_params(self) -> int:
        return sum(p.size for _, p in nn.utils.tree_flatten(self.model.parameters()))

    def evaluate(self, split: str = "valid") -> float:
        return evaluate(self.model, self.dataset.split(split), self.config.context_size,
                        self.config.batch_size)

    def run(self, on_progress: Callable[[Progress], None] = lambda p: None,
            should_stop: Callable[[], bool] = lambda: False) -> TrainResult:
        cfg = self.config
        tokens_per_step = cfg.batch_size * cfg.context_size
        char_level = self.dataset.level == "char"
        event = partial(Progress, total=cfg.num_iters, bits_per_char=char_level)
        result = TrainResult(step=self.step, train_loss=None, val_loss=None)

        def emit(p: Progress) -> None:
            result.history.append(p)
            on_progress(p)

        emit(event("start", self.step, message=f"{self.num_params():,} parameters"))
        losses: list[mx.array] = []
        tic = time.perf_counter()
        while self.step < cfg.num_iters:
            loss = self._train_step(mx.array(next(self.batches)))
            mx.eval(self._state, loss)
            losses.append(loss)
            self.step += 1
            if self.step % cfg.steps_per_report == 0 or self.step == cfg.num_iters:
                elapsed = time.perf_counter() - tic
                result.train_loss = mx.stack(losses).mean().item()
                emit(event("report", self.step, train_loss=result.train_loss,
                           learning_rate=float(self.optimizer.learning_rate),
                           it_per_sec=len(losses) / elapsed,
                           tokens_per_sec=len(losses) * tokens_per_step / elapsed,
                           peak_memory_gb=mx.get_peak_memory() / 1e9))
                losses, tic = [], time.perf_counter()
            if self.step % cfg.steps_per_eval == 0 or self.step == cfg.num_iters:
                result.val_loss = self.evaluate("valid")
                if self.best_val is None or result.val_loss < self.best_val:
                    self.best_val = result.val_loss
                emit(event("eval", self.step, val_loss=result.val_loss))
                tic = time.perf_counter()
            if should_stop():
                result.stopped = True
                break
        if cfg.eval_test and not result.stopped:
            result.test_loss = self.evaluate("test")
            emit(event("eval", self.step, val_loss=result.test_loss, message="test"))
        result.step = self.step
        emit(event("done", self.step, train_loss=result.train_loss, val_loss=result.val_loss))
        return result


def select_device(gpu: bool) -> str:
    """Use the Metal GPU when asked (and present), otherwise the CPU."""
    if gpu and not mx.metal.is_available():
        raise ConfigError("--gpu: no GPU backend (Metal) is available on this machine")
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    return "gpu" if gpu else "cpu"


def train(config: TrainConfig, on_progress: Callable[[Progress], None] = lambda p: None,
          should_stop: Callable[[], bool] = lambda: False,
          log: Callable[[str], None] = lambda m: None) -> TrainResult:
    """Prepare the data, build the model and train it per ``config``."""
    config.validate()
    select_device(config.gpu)
    data_dir = Path(config.save_dir) / "datasets"
    dataset = load_dataset(config.dataset, data_dir, config.data_mirror, log)
    return Trainer(config, dataset).run(on_progress, should_stop)
