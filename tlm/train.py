"""The training loop: a compiled AdamW step, warmup and a decaying learning rate, whole-split
evaluation, and checkpoints that resume bit for bit.

``Trainer.run()`` knows nothing of terminals or queues: it reports to, and
asks, one :class:`TrainingHooks` object (as mlx-lm's ``TrainingCallback``):
``tlm train``'s console, the worker's registry reporting and a sweep trial's
report-and-prune are three implementations of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from tlm import checkpoint, fastmath, files, metrics, parallel, ranks
from tlm.checkpoint import Checkpoint, CheckpointError
from tlm.config import ConfigError, TrainConfig, default_save_dir
from tlm.data import Batches, Dataset, eval_windows, load_dataset
from tlm.generate import SampleConfig, generate_text
from tlm.hooks import TrainingHooks
from tlm.lease import DEFAULT_TTL, RunLease
from tlm.model import Model, ModelArgs

# Flags that fix a run's architecture, data or optimizer state: a resumed run takes
# them from its checkpoint.
ARCHITECTURE = ("dataset", "tokenizer", "dim", "num_blocks", "num_heads", "context_size",
                "tie_embeddings", "optimizer")
# Flags that describe this machine or this invocation, never taken from a checkpoint.
LOCAL = ("save_dir", "data_mirror", "identifier", "new_model", "gpu", "nodes", "backend", "more")
EVAL_TOKENS = 8192  # tokens per evaluation batch: big enough to keep matmuls efficient
FINAL_RATE = 0.1  # the decay ends at this fraction of the peak learning rate
EVAL_PROGRESS_SECONDS = 3.0  # an evaluation longer than this says how far it is
SHORT_RUN_EVAL_TOKENS = 4096  # the least a short run's validation scores (half a batch: one)


@dataclass
class Progress:
    """One event of a training run, for whoever displays or records it."""

    kind: str  # "start", "report", "eval", "save", "message", "done"
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
    checkpoint: Optional[str] = None  # the identifier, on "save"
    elapsed: Optional[float] = None  # seconds of training of this run so far, across resumes

    @property
    def val_metric(self) -> Optional[float]:
        """Perplexity for word-level data, bits per character for character-level data."""
        if self.val_loss is None:
            return None
        return self.val_loss / math.log(2) if self.bits_per_char else math.exp(self.val_loss)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> Optional[str]:
        """One human line (None for events with nothing to say)."""
        if self.kind == "report":
            return (f"iter {self.step}/{self.total}  train loss {self.train_loss:.3f}  "
                    f"{self.it_per_sec:.2f} it/s  {self.tokens_per_sec:,.0f} tok/s  "
                    f"lr {self.learning_rate:.2e}  peak mem {self.peak_memory_gb:.2f} GB")
        if self.kind == "eval":
            split = self.message or "valid"
            metric = f"{self.val_metric:.3f} bpc" if self.bits_per_char else f"ppl {self.val_metric:.2f}"
            return f"iter {self.step}  {split} loss {self.val_loss:.3f}  {split} {metric}"
        return self.message or None if self.kind in ("start", "save", "message") else None


@dataclass
class TrainResult:
    step: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    test_loss: Optional[float] = None
    stopped: bool = False
    checkpoint: Optional[str] = None


def model_args(config: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, hidden_size=config.dim,
                     num_hidden_layers=config.num_blocks, num_attention_heads=config.num_heads,
                     tie_word_embeddings=config.tie_embeddings, dropout=config.dropout,
                     embed_dropout=config.embed_dropout)


def check_memory(args: ModelArgs) -> None:
    """Refuse a model whose weights, gradients and optimizer state cannot fit in this
    machine's memory (allocating it would crash the process without a word)."""
    d, f, v, n = args.hidden_size, args.intermediate_size, args.vocab_size, args.num_hidden_layers
    params = n * (4 * d * d + 3 * d * f) + v * d * (1 if args.tie_word_embeddings else 2)
    need = params * 4 * 4  # float32 weights, gradients and AdamW's two moments
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ConfigError(f"the model has {params / 1e9:.1f}B parameters: training needs about "
                          f"{need / 2**30:,.0f} GiB for weights and optimizer state, and this "
                          f"machine has {have / 2**30:,.0f} GiB (lower --dim or --num_blocks)")


def decay(config: TrainConfig, fraction: mx.array) -> mx.array:
    """The peak rate's multiplier after warmup, ``fraction`` of the way through training: a
    cosine from 1 to a tenth, or with ``--lr_cooldown C`` 1 until the last C of training, then
    linear to a tenth (the warmup-stable-decay schedule of the modded-nanoGPT speedruns)."""
    f = mx.clip(fraction, 0.0, 1.0)
    shape = mx.minimum(1.0, (1 - f) / config.lr_cooldown) if config.lr_cooldown else 0.5 * (1 + mx.cos(math.pi * f))
    return FINAL_RATE + (1 - FINAL_RATE) * shape


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


def loss_fn(model: Model, inputs: mx.array, targets: mx.array, checkpoint: bool = False) -> mx.array:
    return fastmath.cross_entropy(model(inputs, checkpoint=checkpoint), targets).mean()


def evaluate(model: Model, tokens: np.ndarray, context_size: int,
             stride: Optional[int] = None, group: Optional[mx.distributed.Group] = None,
             tick: Callable[[], None] = lambda: None) -> float:
    """Mean cross-entropy over every token of a split (see ``eval_windows`` for ``stride``);
    with a ``group`` of ranks, each evaluates every size-th batch and the sums are added.
    ``tick`` is called after each batch (a rank's watchdog: evaluating is progress)."""
    model.eval()
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)

    @partial(mx.compile, inputs=model.state)
    def summed(x, y, w):
        shards = parallel.map_shards(lambda x, y, w: (fastmath.cross_entropy(model(x), y) * w).sum(),
                                     [x, y, w])
        return sum(result for _, result in shards)

    total, count = mx.array(0.0), 0.0
    batches = eval_windows(tokens, context_size, max(1, EVAL_TOKENS // context_size), stride)
    for x, y, w in itertools.islice(batches, rank, None, size):
        total = total + summed(mx.array(x), mx.array(y), mx.array(w))
        count += float(w.sum())
        mx.eval(total)
        tick()
    if size > 1:
        total, count = mx.distributed.all_sum(mx.stack([total, mx.array(count)]), group=group)
        count = count.item()
    model.train()
    return total.item() / count


class Diverged(RuntimeError):
    """The loss or the weights became non-finite; nothing of them was published."""


def select_device(gpu: bool) -> str:
    """Use MLX's GPU when asked (and present: Metal on macOS, CUDA on Linux), otherwise the CPU."""
    if gpu and not mx.is_available(mx.gpu):
        raise ConfigError("--gpu: no GPU backend (Metal or CUDA) is available on this machine")
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    return "gpu" if gpu else "cpu"


def resume_config(given: dict[str, Any], ckpt: Checkpoint) -> TrainConfig:
    """The checkpoint's configuration, overridden by the flags the user gave.

    Architecture flags that contradict the checkpoint are an error (the
    weights could not load); others override with the new value.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    stored = {**defaults, **ckpt.state["config"]}  # flags added since the checkpoint: defaults
    for name in ARCHITECTURE:
        if name in given and given[name] != stored[name]:
            had = stored[name] if stored[name] is not None else f"unset ({ckpt.tokenizer.kind})"
            raise ConfigError(f"checkpoint {ckpt.identifier[:12]} was trained with --{name} "
                              f"{had}, not {given[name]}: drop the flag or use --new_model")
    merged = {k: v for k, v in stored.items() if k not in LOCAL}
    merged.update({k: v for k, v in given.items()})
    return TrainConfig.from_dict(merged)


def open_run(given: dict[str, Any], warn: Callable[[str], None] = lambda m: None,
             refuse_spent: bool = False) -> tuple[TrainConfig, Optional[Checkpoint]]:
    """Validate the flags and find the checkpoint to resume (None for a new model).
    ``refuse_spent``: a run whose budget is spent is a ConfigError saying so (what a user
    who asks to train means; a job resumed in its final evaluation finishes instead)."""
    config = TrainConfig(**given)
    config.validate()
    shape = [n for n in ("dim", "num_blocks", "num_heads", "tie_embeddings") if n in given]
    if config.init_from and shape:
        raise ConfigError(f"--{shape[0]}: the model's shape comes from --init_from {config.init_from}")
    if config.new_model:
        return config, None
    try:
        ckpt = checkpoint.find(config.save_dir, config.identifier, warn)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if ckpt is not None and config.init_from:
        raise ConfigError(f"{config.save_dir} already has checkpoints (a run to resume): add "
                          "--new_model to start afresh from --init_from (they are set aside)")
    if ckpt is None:
        if config.more:  # nothing to go beyond: --more is the budget itself
            config = TrainConfig(**{**given, **more_budget(config.more, 0, 0.0)})
        return config, None
    config = resume_config(given, ckpt)
    if config.more:
        config = dataclasses.replace(config, **more_budget(config.more, ckpt.step,
                                                           ckpt.state.get("elapsed", 0.0)))
    config.validate()
    nothing = refuse_spent and nothing_to_train(config, ckpt)
    if nothing:
        raise ConfigError(nothing)
    return config, ckpt


def more_budget(more: str, step: int, elapsed: float) -> dict[str, Any]:
    """``--more 2m`` / ``--more 500`` as the budget flags of a run at ``step`` after ``elapsed``
    seconds of training: --time_budget and --num_iters count from the run's start."""
    if more.endswith("m"):
        return {"time_budget": elapsed / 60 + float(more[:-1]), "num_iters": max(step + 1, 10**9)}
    return {"num_iters": step + int(more), "time_budget": 0.0}


def nothing_to_train(config: TrainConfig, ckpt: Checkpoint) -> Optional[str]:
    """Why resuming would train no step (its budget is spent), in one line; None if it would."""
    elapsed = ckpt.state.get("elapsed", 0.0)
    if ckpt.step >= config.num_iters:
        why = f"is at iteration {ckpt.step} of --num_iters {config.num_iters}"
    elif config.time_budget and elapsed >= config.time_budget * 60:
        why = (f"has trained {elapsed / 60:.2f} of its --time_budget {config.time_budget:g} minutes "
               "(the budget counts from the run's start)")
    else:
        return None
    return (f"{config.save_dir} {why}: nothing to train. Give --more 2m or --more 500 to train "
            "that much more, or a larger budget")


class Trainer:
    """A run's model, optimizer and data position; ``run()`` trains and checkpoints it."""

    def __init__(self, config: TrainConfig, dataset: Dataset, resume: Optional[Checkpoint] = None,
                 hooks: Optional[TrainingHooks] = None, labels: Optional[dict[str, Any]] = None,
                 init: Optional[tuple[ModelArgs, dict[str, mx.array]]] = None,
                 group: Optional[mx.distributed.Group] = None, lease: Optional[RunLease] = None):
        config.validate()
        parallel.streams()  # a bad TLM_CPU_STREAMS fails here, before any training
        Path(config.save_dir).mkdir(parents=True, exist_ok=True)
        self.config, self.dataset = config, dataset
        self.hooks = hooks or TrainingHooks()
        self.log = self.hooks.log
        self.labels = labels or {}  # added to each metrics record (e.g. the worker)
        self.lease = lease  # the run directory's hold on its one trainer (rank 0's)
        # Data-parallel ranks: each takes its share of every batch, gradients are averaged,
        # and rank 0 alone writes (checkpoints, metrics) and reports.
        self.group = group
        self.rank, self.ranks = (group.rank(), group.size()) if group is not None else (0, 1)
        self.watchdog: Optional[ranks.Watchdog] = None  # while ranks train together
        mx.random.seed(config.seed)
        if resume is not None:
            self.args = ModelArgs(**resume.state["model_args"])
        elif init is not None:  # --init_from: a pretrained shape and weights
            self.args = dataclasses.replace(init[0], dropout=config.dropout,
                                            embed_dropout=config.embed_dropout)
        else:
            self.args = model_args(config, dataset.vocab_size)
        check_memory(self.args)
        if resume is None and config.new_model and self.rank == 0:
            aside = checkpoint.set_aside(config.save_dir)
            if aside is not None:
                self.log(f"--new_model: the earlier run's checkpoints and metrics moved to {aside}")
        self.model = Model(self.args)
        if init is not None and resume is None:
            self.model.load_weights(list(init[1].items()), strict=True)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(self.model.trainable_parameters())
        position = {k: resume.state[k] for k in ("epoch", "position")} if resume else {}
        shift = resume.state.get("shift", False) if resume else True  # older checkpoints: unshifted
        self.batches = Batches(dataset.train, config.context_size, config.batch_size, config.seed,
                               shift=shift, **position)
        self.step = 0
        self.elapsed = 0.0
        self.best_val: Optional[float] = None
        self.last_checkpoint: Optional[str] = None
        if resume is not None:
            self._restore(resume)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._train_step = self._compile_step()

    def _compile_step(self) -> Callable[[mx.array], mx.array]:
        model, optimizer, clip = self.model, self.optimizer, self.config.grad_clip
        loss_and_grad = nn.value_and_grad(model, partial(loss_fn, checkpoint=self.config.checkpoint))
        self._state = [model.state, optimizer.state, mx.random.state]

        group, ranks = self.group, self.ranks

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def step(batch: mx.array) -> mx.array:
            shards = parallel.map_shards(lambda b: loss_and_grad(model, b[:, :-1], b[:, 1:]), [batch])
            loss, grads = parallel.weighted_sum(shards)
            if ranks > 1:  # equal shares: the mean of the ranks' means is the batch's mean
                grads = nn.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / ranks
            if clip > 0:
                grads, _ = optim.clip_grad_norm(grads, clip)
            optimizer.update(model, grads)
            return loss

        return step

    # -- checkpoints ---------------------------------------------------------

    def _restore(self, ckpt: Checkpoint) -> None:
        state = ckpt.state
        if state["tokenizer"] != self.dataset.tokenizer.to_dict():
            raise CheckpointError(f"checkpoint {ckpt.identifier[:12]} was trained with another "
                                  f"vocabulary than the {self.dataset.name} data found now")
        self.model.load_weights(list(ckpt.load_weights().items()), strict=True)
        tensors = ckpt.load_tensors()
        self.optimizer.state = tree_unflatten(checkpoint.unflatten_prefix(tensors, "optimizer"))
        self.optimizer.init(self.model.trainable_parameters())
        if not np.array_equal(np.array(tensors["perm"]), self.batches.perm):
            raise CheckpointError(f"checkpoint {ckpt.identifier[:12]}: batch permutation mismatch")
        self.step, self.best_val = state["step"], state["best_val_loss"]
        self.elapsed = state.get("elapsed", 0.0)
        self.last_checkpoint = ckpt.identifier

    def _snapshot(self, val_loss: Optional[float]) -> tuple[dict, dict, dict]:
        weights = dict(tree_flatten(self.model.parameters()))
        tensors = {**checkpoint.flatten(self.optimizer.state, "optimizer"),
                   "perm": mx.array(self.batches.perm.astype(np.int32))}
        state = {"config": self.config.to_dict(), "model_args": dataclasses.asdict(self.args),
                 "dataset": self.dataset.name, "tokenizer": self.dataset.tokenizer.to_dict(),
                 "step": self.step, "elapsed": self.elapsed, **self.batches.state(),
                 "val_loss": val_loss, "best_val_loss": self.best_val}
        return weights, tensors, state

    def save(self, val_loss: Optional[float] = None) -> Checkpoint:
        """Publish a checkpoint, retrying with back-off while the old one stays intact."""
        snapshot = self._snapshot(val_loss)
        for attempt in itertools.count():
            try:
                ckpt = checkpoint.save(self.config.save_dir, *snapshot, before_publish=self._may_publish)
                break
            except OSError as e:
                if e.errno in files.SETUP:  # read-only, deleted, not ours: no retry helps
                    raise CheckpointError(f"cannot save a checkpoint in {self.config.save_dir}: "
                                          f"{e.strerror or e}") from None
                if attempt >= self.config.save_retries:
                    if files.transient(e):  # the disk may be fine on another machine, or later
                        e.filename = e.filename or f"saving a checkpoint in {self.config.save_dir}"
                        raise
                    raise CheckpointError(f"could not save a checkpoint in {self.config.save_dir} "
                                          f"after {attempt + 1} attempts: {e}") from None
                delay = min(2**attempt, 30)
                self.log(f"checkpoint save failed ({e.strerror or e}); the previous checkpoint is "
                         f"intact; retrying in {delay}s (Ctrl+C twice to give up)")
                time.sleep(delay)
        checkpoint.retain(self.config.save_dir, self.config.keep_last)
        self.last_checkpoint = ckpt.identifier
        return ckpt

    def sample(self, max_tokens: int = 30) -> str:
        """A short continuation of the validation text's first eight words (whole words, for
        character-level data too), as the seed prints."""
        tokenizer = self.dataset.tokenizer
        prompt = " ".join(tokenizer.decode([int(t) for t in self.dataset.valid[:64]]).split()[:8])
        cfg = SampleConfig(max_tokens=max_tokens, temperature=self.config.temperature,
                           top_k=self.config.top_k, seed=self.step, stop_at_eos=False)
        return prompt + " ..." + "".join(generate_text(self.model, tokenizer, prompt, cfg,
                                                       self.config.context_size))

    # -- the loop ------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.size for _, p in tree_flatten(self.model.parameters()))

    def validation_tokens(self) -> int:
        """How many validation tokens an evaluation scores: --eval_tokens; by default the whole
        split, but a run that trains on fewer tokens than that (a smoke test) scores as many
        as it trains on, at least SHORT_RUN_EVAL_TOKENS."""
        cfg, whole = self.config, len(self.dataset.valid) - 1
        if cfg.eval_tokens:
            return min(cfg.eval_tokens, whole)
        trained = cfg.num_iters * cfg.batch_size * cfg.context_size
        return whole if cfg.time_budget or trained >= whole else min(whole, max(trained, SHORT_RUN_EVAL_TOKENS))

    def evaluate(self, split: str = "valid") -> float:
        """Mean loss on a split, telling the hooks how far it is once it takes a few seconds."""
        tokens = self.dataset.split(split)
        if split == "valid":
            tokens = tokens[: self.validation_tokens() + 1]
        batches = -(-(len(tokens) - 1) // max(1, EVAL_TOKENS // self.config.context_size
                                              * self.config.context_size))
        started = shown = time.perf_counter()
        done = 0

        def tick() -> None:
            nonlocal shown, done
            done += self.ranks
            if self.watchdog:
                self.watchdog.beat()
            now = time.perf_counter()
            if now - shown >= EVAL_PROGRESS_SECONDS and done < batches:
                shown = now
                self._event("message", message=f"evaluating {split}: batch {done} of ~{batches}, "
                                                f"{now - started:.0f}s")
        return evaluate(self.model, tokens, self.config.context_size, self.config.eval_stride or None,
                        self.group, tick)

    # -- the run's clock and events ---------------------------------------------

    def _clock(self) -> float:
        """Seconds of training of this run, across resumes (what --time_budget counts)."""
        self.elapsed = self._before + time.perf_counter() - self._started
        return self.elapsed

    def _total(self) -> int:
        """The steps this run will end at: on a time budget, an estimate from the pace so far."""
        budget = self.config.time_budget * 60
        if not budget or self.step == self._first_step:
            return self.config.num_iters
        pace = (self.step - self._first_step) / (self.elapsed - self._before)
        return min(self.config.num_iters, self.step + round(max(budget - self.elapsed, 0) * pace))

    def _finished(self) -> bool:
        budget = self.config.time_budget * 60
        return self.step >= self.config.num_iters or bool(budget) and self._clock() >= budget

    def _event(self, kind: str, **fields) -> None:
        """Tell the hooks of an event, and append its record to metrics.jsonl (rank 0)."""
        self._clock()
        p = Progress(kind, self.step, self._total(), bits_per_char=self.dataset.bits_per_char,
                     elapsed=self.elapsed, **fields)
        rec = metrics.record(p, self.config.batch_size * self.config.context_size, self.labels)
        if rec and self.rank == 0:
            self._may_publish()
            metrics.append(self.config.save_dir, rec, self.log)
            self.hooks.on_record(rec)
        self.hooks.on_progress(p)

    def _may_publish(self) -> None:
        """Before each checkpoint and metrics record: this trainer still holds the run
        directory (its lease there) and, for the hooks, whatever else they hold (a job's fence)."""
        if self.lease is not None:
            self.lease.check()
        self.hooks.before_publish()

    def _checkpoint(self, result: TrainResult, val_loss: Optional[float]) -> None:
        """Publish a checkpoint (rank 0), unless the weights diverged."""
        finite = mx.all(mx.stack([mx.isfinite(p).all() for _, p in tree_flatten(self.model.parameters())]))
        if not finite.item():
            raise Diverged(f"training diverged at step {self.step}: non-finite weights, not "
                           "saved; the last good checkpoint stays the latest")
        if self.rank:
            return  # rank 0 publishes
        ckpt = self.save(val_loss)
        result.checkpoint = ckpt.identifier
        self._event("save", val_loss=val_loss, checkpoint=ckpt.identifier,
                    message=f"saved {ckpt.weights_path}\n  sample: "
                            + self.sample().replace("\n", "\n          "))

    def _validate(self, result: TrainResult) -> None:
        result.val_loss = self.evaluate("valid")
        self.best_val = result.val_loss if self.best_val is None else min(self.best_val, result.val_loss)
        self._event("eval", val_loss=result.val_loss)
        self._checkpoint(result, result.val_loss)

    # -- the loop ---------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to --num_iters or --time_budget, or until the hooks ask to stop (after a save)."""
        cfg = self.config
        tokens_per_step = cfg.batch_size * cfg.context_size
        self._started, self._before, self._first_step = time.perf_counter(), self.elapsed, self.step
        budget = cfg.time_budget * 60
        result = TrainResult(step=self.step, checkpoint=self.last_checkpoint)  # a resume with nothing left
        where = f"resuming {self.last_checkpoint[:12]} at iteration {self.step}" \
            if self.last_checkpoint else "new model"
        self.hooks.on_start(cfg.to_dict())
        self._event("start", message=f"{where}, {self.num_params():,} parameters")

        # A rank whose peers stop answering ends itself (an exception ends the process too),
        # once all are here: preparing the data may take one Mac longer than another.
        if self.ranks > 1:
            ranks.barrier(self.group)
            self.watchdog = ranks.Watchdog()
        losses: list[mx.array] = []
        tic = time.perf_counter()
        done = self._finished()
        while not done and not result.stopped:
            if budget:
                follow_budget(self.optimizer, cfg, self.step, self._clock() / budget)
            # The step's randomness (dropout) is a function of (seed, step, rank),
            # so a resumed run draws what an uninterrupted one would.
            mx.random.seed((cfg.seed * 1_000_003 + self.step) * self.ranks + self.rank)
            batch = next(self.batches)
            share = len(batch) // self.ranks  # this rank's rows of the global batch
            loss = self._train_step(mx.array(batch[self.rank * share:(self.rank + 1) * share]))
            mx.eval(self._state, loss)
            if not math.isfinite(loss.item()):
                raise Diverged(f"training diverged at step {self.step + 1}: loss {loss.item()} (try "
                               "a lower --learning_rate); the last good checkpoint stays the latest")
            losses.append(loss)
            self.step += 1
            done = self._finished()
            result.stopped = self.hooks.should_stop()
            if self.ranks > 1:  # every rank stops at the same step (clocks and signals differ)
                flags = mx.distributed.all_sum(mx.array([done, result.stopped]), group=self.group)
                done, result.stopped = (bool(f) for f in flags.tolist())
            if self.step % cfg.steps_per_report == 0 or done or result.stopped:
                elapsed = time.perf_counter() - tic
                result.train_loss = mx.stack(losses).mean().item()
                self._event("report", train_loss=result.train_loss,
                            learning_rate=self.optimizer.learning_rate.item(),
                            it_per_sec=len(losses) / elapsed,
                            tokens_per_sec=len(losses) * tokens_per_step / elapsed,
                            peak_memory_gb=mx.get_peak_memory() / 1e9)
                losses = []
                if self.step // cfg.steps_per_report == 2 and self.rank == 0:  # once: is it slow for want of cores?
                    note = busy_note(*_load())
                    if note:
                        self._event("message", message=note)
            if self.step % cfg.steps_per_eval == 0 or done:
                self._validate(result)
                if self.ranks == 1:  # a stop asked on the evaluation (a pruned trial): saved already
                    result.stopped = result.stopped or self.hooks.should_stop()
            elif result.stopped:
                self._checkpoint(result, None)
            tic = time.perf_counter() if not losses else tic
            if self.watchdog:
                self.watchdog.beat()
        if done and self.step < cfg.num_iters:  # said once: a preset's budget may cap a --num_iters given
            self._event("message", message=f"--time_budget {cfg.time_budget:g} minutes ended the run at "
                        f"iteration {self.step} of --num_iters {cfg.num_iters} (--time_budget 0: all of them)")
        if cfg.eval_test and not result.stopped:
            result.test_loss = self.evaluate("test")
            self._event("eval", val_loss=result.test_loss, message="test")
        if self.watchdog:  # no rank leaves (and has its job settled) before rank 0 has saved
            ranks.barrier(self.group)
            self.watchdog.stop()
        result.step = self.step
        self._event("done", train_loss=result.train_loss, val_loss=result.val_loss,
                    message=result.checkpoint or "")
        return result


def prepare(config: TrainConfig, ckpt: Optional[Checkpoint], log: Callable[[str], None]
            ) -> tuple[Dataset, Optional[tuple[ModelArgs, dict[str, mx.array]]]]:
    """The run's data, tokenized as its checkpoint or ``--init_from`` model expects,
    and the pretrained shape and weights for a new model started from one."""
    init, tokenizer = None, config.tokenizer
    if ckpt is not None:
        tokenizer = ckpt.tokenizer
    elif config.init_from:
        from tlm.export import load_pretrained
        try:
            args, weights, tokenizer = load_pretrained(config.init_from)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--init_from {config.init_from}: {e}") from None
        init = (args, weights)
        log(f"starting from {config.init_from}: {args.num_hidden_layers} blocks, dim {args.hidden_size}, "
            f"{tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} tokens")
    return load_dataset(config.dataset_source(), data_dir(config.save_dir), config.data_mirror, log,
                        tokenizer), init


def busy_note(load: Optional[float], cores: int) -> Optional[str]:
    """A line to say once when other processes hold this machine's cores (its one-minute load
    past its cores and a half: a run's own streams keep it near the cores), so a slow run is not
    taken for a slow recipe."""
    if load is None or load <= cores + 0.5:
        return None
    return (f"this machine is busy: load {load:.1f} on {cores} cores, so this run trains slower than "
            "it could (other processes hold the cores)")


def _load() -> tuple[Optional[float], int]:
    """The one-minute load average (None where the OS does not say) and the cores."""
    try:
        load: Optional[float] = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    return load, os.cpu_count() or 1


def data_dir(save_dir: str | Path) -> Path:
    """Where a run keeps its prepared data: ``<save_dir>/datasets``, except that a sweep's
    trials (``<sweep folder>/trial-<n>``) share their sweep folder's (one copy of PTB, not one
    per trial; the cache's lock keeps trials that prepare it at once apart)."""
    save_dir = Path(save_dir)
    return (save_dir.parent if save_dir.name.startswith("trial-") else save_dir) / "datasets"


@contextmanager
def opened(given: dict[str, Any], hooks: TrainingHooks, labels: Optional[dict[str, Any]] = None,
           refuse_spent: bool = True, holder: Optional[dict[str, Any]] = None,
           lease_ttl: float = DEFAULT_TTL) -> Iterator[Trainer]:
    """A run ready to train, built the one way `tlm train` and a worker's job both use: its
    directory's lease taken first (rank 0: the one that writes), then the flags resolved
    against its checkpoint, the ranks joined, the data prepared; the lease is released
    when the block ends. A run whose budget is spent is refused (ConfigError), unless not
    ``refuse_spent``: a job resumed in its final evaluation finishes it. ``holder``: who
    the lease names (default: the labels)."""
    save_dir = given.get("save_dir") or default_save_dir()
    lease = None if ranks.follower() else RunLease(save_dir, holder or labels, lease_ttl,
                                                           hooks.log).take()
    try:
        config, ckpt = open_run(given, warn=hooks.log, refuse_spent=refuse_spent)
        group = join_ranks(config)
        select_device(config.gpu)
        dataset, init = prepare(config, ckpt, hooks.log)
        yield Trainer(config, dataset, ckpt, hooks=hooks, labels=labels, init=init, group=group, lease=lease)
    finally:
        if lease is not None:
            lease.release()


def train(given: dict[str, Any], hooks: Optional[TrainingHooks] = None,
          labels: Optional[dict[str, Any]] = None, spent_ok: bool = False,
          holder: Optional[dict[str, Any]] = None, lease_ttl: float = DEFAULT_TTL) -> TrainResult:
    """Open the run (``opened``) and train it."""
    with opened(given, hooks or TrainingHooks(), labels, not spent_ok, holder, lease_ttl) as trainer:
        return trainer.run()


def join_ranks(config: TrainConfig) -> Optional[mx.distributed.Group]:
    """This process's group of ``--nodes`` ranks (None for one process)."""
    group = ranks.join(config.backend)
    started = group.size() if group is not None else 1
    if started != config.nodes:
        raise ConfigError(f"--nodes {config.nodes}, but {started} rank(s) were started")
    return group


def evaluate_checkpoint(save_dir: str, identifier: Optional[str] = None, split: str = "valid",
                        data_mirror: Optional[str] = None, tokens: int = 0,
                        stride: Optional[int] = None,
                        log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Loss and perplexity (or bits per character) of a checkpoint on a split
    (its first ``tokens`` tokens, or all of it), optionally with a sliding window."""
    ckpt, model = checkpoint.read(save_dir, identifier, lambda c: c.load_model(), log)
    if ckpt is None or model is None:
        raise CheckpointError(f"no checkpoint in {save_dir}: train one first")
    config = TrainConfig.from_dict({**ckpt.state["config"], "save_dir": save_dir,
                                    "data_mirror": data_mirror})
    if stride is not None and stride > config.context_size:
        raise ConfigError(f"--stride {stride} is longer than the model's context "
                          f"({config.context_size}): windows would skip targets")
    dataset = load_dataset(config.dataset_source(), data_dir(save_dir), data_mirror, log,
                           ckpt.tokenizer)
    data = dataset.split(split)
    loss = evaluate(model, data[: tokens + 1] if tokens else data, config.context_size, stride)
    metric = Progress("eval", ckpt.step, config.num_iters, val_loss=loss,
                      bits_per_char=dataset.bits_per_char).val_metric
    name = "bits_per_char" if dataset.bits_per_char else "perplexity"
    return {"checkpoint": ckpt.identifier, "step": ckpt.step, "split": split, "loss": loss,
            name: metric, "stride": stride}
