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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from tlm import checkpoint, fastmath, metrics, parallel, ranks
from tlm.checkpoint import Checkpoint, CheckpointError
from tlm.config import ConfigError, TrainConfig
from tlm.data import Batches, Dataset, eval_windows
from tlm.generate import SampleConfig, generate_text
from tlm.hooks import Progress, TrainingHooks, TrainResult
from tlm.lease import RunLease
from tlm.model import Model, ModelArgs
from tlm.optimizer import follow_budget, make_optimizer

EVAL_TOKENS = 8192  # tokens per evaluation batch: big enough to keep matmuls efficient
EVAL_PROGRESS_SECONDS = 3.0  # an evaluation longer than this says how far it is
SHORT_RUN_EVAL_TOKENS = 4096  # the least a short run's validation scores (half a batch: one)


def model_args(config: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, hidden_size=config.dim,
                     num_hidden_layers=config.num_blocks, num_attention_heads=config.num_heads,
                     tie_word_embeddings=config.tie_embeddings, dropout=config.dropout,
                     embed_dropout=config.embed_dropout)


def build_model(config: TrainConfig, vocab_size: int, resume: Optional[Checkpoint] = None,
                init: Optional[tuple[ModelArgs, dict[str, mx.array]]] = None) -> tuple[ModelArgs, Model]:
    """The run's model: its checkpoint's shape (weights loaded by the trainer's restore),
    ``--init_from``'s shape and weights, or a new one from the flags; refused if it cannot fit."""
    if resume is not None:
        args = ModelArgs(**resume.state["model_args"])
    elif init is not None:
        args = dataclasses.replace(init[0], dropout=config.dropout, embed_dropout=config.embed_dropout)
    else:
        args = model_args(config, vocab_size)
    check_memory(args)
    model = Model(args)
    if init is not None and resume is None:
        model.load_weights(list(init[1].items()), strict=True)
    return args, model


def make_batches(config: TrainConfig, dataset: Dataset, resume: Optional[Checkpoint] = None) -> Batches:
    """The training batches, at the checkpoint's data position when resuming."""
    position = {k: resume.state[k] for k in ("epoch", "position")} if resume else {}
    shift = resume.state.get("shift", False) if resume else True  # older checkpoints: unshifted
    return Batches(dataset.train, config.context_size, config.batch_size, config.seed, shift=shift, **position)


def all_finite(model: Model) -> bool:
    return mx.all(mx.stack([mx.isfinite(p).all() for _, p in tree_flatten(model.parameters())])).item()


def num_params(model: Model) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def seed_sample(model: Model, dataset: Dataset, config: TrainConfig, step: int, max_tokens: int = 30) -> str:
    """A short continuation of the validation text's first eight words (whole words, for
    character-level data too), as the seed prints at each save."""
    tokenizer = dataset.tokenizer
    prompt = " ".join(tokenizer.decode([int(t) for t in dataset.valid[:64]]).split()[:8])
    cfg = SampleConfig(max_tokens=max_tokens, temperature=config.temperature, top_k=config.top_k,
                       seed=step, stop_at_eos=False)
    return prompt + " ..." + "".join(generate_text(model, tokenizer, prompt, cfg, config.context_size))


def validation_tokens(cfg: TrainConfig, whole: int) -> int:
    """How many of a split's ``whole`` validation tokens an evaluation scores: --eval_tokens; by
    default all, but a run that trains on fewer tokens than that (a smoke test) scores as many
    as it trains on, at least SHORT_RUN_EVAL_TOKENS."""
    if cfg.eval_tokens:
        return min(cfg.eval_tokens, whole)
    trained = cfg.num_iters * cfg.batch_size * cfg.context_size
    return whole if cfg.time_budget or trained >= whole else min(whole, max(trained, SHORT_RUN_EVAL_TOKENS))


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


def compile_step(model: Model, optimizer: optim.Optimizer, config: TrainConfig,
                 group: Optional[mx.distributed.Group]) -> tuple[Callable[[mx.array], mx.array], list]:
    """One compiled training step on a batch (its loss out), and the state it updates: the
    model's, the optimizer's and the random state. With a group of ranks each computes its share
    and the gradients are averaged inside the step."""
    loss_and_grad = nn.value_and_grad(model, partial(loss_fn, checkpoint=config.checkpoint))
    state = [model.state, optimizer.state, mx.random.state]
    size = group.size() if group is not None else 1

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: mx.array) -> mx.array:
        shards = parallel.map_shards(lambda b: loss_and_grad(model, b[:, :-1], b[:, 1:]), [batch])
        loss, grads = parallel.weighted_sum(shards)
        if size > 1:  # equal shares: the mean of the ranks' means is the batch's mean
            grads = nn.average_gradients(grads, group=group)
            loss = mx.distributed.all_sum(loss, group=group) / size
        if config.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
        optimizer.update(model, grads)
        return loss

    return step, state


class Diverged(RuntimeError):
    """The loss or the weights became non-finite; nothing of them was published."""


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
        if resume is None and config.new_model and self.rank == 0:
            aside = checkpoint.set_aside(config.save_dir)
            if aside is not None:
                self.log(f"--new_model: the earlier run's checkpoints and metrics moved to {aside}")
        self.args, self.model = build_model(config, dataset.vocab_size, resume, init)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(self.model.trainable_parameters())
        self.batches = make_batches(config, dataset, resume)
        self.step = 0
        self.elapsed = 0.0
        self.best_val: Optional[float] = None
        self.last_checkpoint: Optional[str] = None
        if resume is not None:
            self._restore(resume)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._train_step, self._state = compile_step(self.model, self.optimizer, config, group)

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
        """Publish a checkpoint (retrying while the old one stays intact), keep the newest."""
        ckpt = checkpoint.save_retrying(self.config.save_dir, self._snapshot(val_loss), self.config.save_retries,
                                        self.log, before_publish=self._may_publish)
        checkpoint.retain(self.config.save_dir, self.config.keep_last)
        self.last_checkpoint = ckpt.identifier
        return ckpt

    def validation_tokens(self) -> int:
        return validation_tokens(self.config, len(self.dataset.valid) - 1)

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
        if not all_finite(self.model):
            raise Diverged(f"training diverged at step {self.step}: non-finite weights, not "
                           "saved; the last good checkpoint stays the latest")
        if self.rank:
            return  # rank 0 publishes
        ckpt = self.save(val_loss)
        result.checkpoint = ckpt.identifier
        self._event("save", val_loss=val_loss, checkpoint=ckpt.identifier,
                    message=f"saved {ckpt.weights_path}\n  sample: "
                            + seed_sample(self.model, self.dataset, self.config, self.step)
                            .replace("\n", "\n          "))

    def _validate(self, result: TrainResult) -> None:
        result.val_loss = self.evaluate("valid")
        self.best_val = result.val_loss if self.best_val is None else min(self.best_val, result.val_loss)
        self._event("eval", val_loss=result.val_loss)
        self._checkpoint(result, result.val_loss)

    # -- the loop ---------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to --num_iters or --time_budget, or until the hooks ask to stop (after a save)."""
        cfg = self.config
        self._started, self._before, self._first_step = time.perf_counter(), self.elapsed, self.step
        result = TrainResult(step=self.step, checkpoint=self.last_checkpoint)  # a resume with nothing left
        where = f"resuming {self.last_checkpoint[:12]} at iteration {self.step}" \
            if self.last_checkpoint else "new model"
        self.hooks.on_start(cfg.to_dict())
        self._event("start", message=f"{where}, {num_params(self.model):,} parameters")

        # A rank whose peers stop answering ends itself (an exception ends the process too),
        # once all are here: preparing the data may take one Mac longer than another.
        if self.ranks > 1:
            ranks.barrier(self.group)
            self.watchdog = ranks.Watchdog()
        losses: list[mx.array] = []
        tic = time.perf_counter()
        done = self._finished()
        while not done and not result.stopped:
            losses.append(self._step())
            done, result.stopped = self._agree(self._finished(), self.hooks.should_stop())
            if self.step % cfg.steps_per_report == 0 or done or result.stopped:
                self._report(result, losses, time.perf_counter() - tic)
                losses = []
            if self.step % cfg.steps_per_eval == 0 or done:
                self._validate(result)
                if self.ranks == 1:  # a stop asked on the evaluation (a pruned trial): saved already
                    result.stopped = result.stopped or self.hooks.should_stop()
            elif result.stopped:
                self._checkpoint(result, None)
            tic = time.perf_counter() if not losses else tic
            if self.watchdog:
                self.watchdog.beat()
        self._wrap_up(result, done)
        return result

    def _step(self) -> mx.array:
        """One optimizer step on this rank's share of the next batch; its (finite) loss."""
        cfg = self.config
        if cfg.time_budget:
            follow_budget(self.optimizer, cfg, self.step, self._clock() / (cfg.time_budget * 60))
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
        self.step += 1
        return loss

    def _agree(self, done: bool, stopped: bool) -> tuple[bool, bool]:
        """Whether to end and whether to stop, as every rank sees it: all stop at the same step
        (their clocks and signals differ)."""
        if self.ranks == 1:
            return done, stopped
        flags = mx.distributed.all_sum(mx.array([done, stopped]), group=self.group)
        return bool(flags[0].item()), bool(flags[1].item())

    def _report(self, result: TrainResult, losses: list[mx.array], seconds: float) -> None:
        """The mean loss and the pace of the steps since the last report; once, early, a word
        if other processes hold this machine's cores."""
        result.train_loss = mx.stack(losses).mean().item()
        self._event("report", train_loss=result.train_loss, learning_rate=self.optimizer.learning_rate.item(),
                    it_per_sec=len(losses) / seconds,
                    tokens_per_sec=len(losses) * self.config.batch_size * self.config.context_size / seconds,
                    peak_memory_gb=mx.get_peak_memory() / 1e9)
        if self.step // self.config.steps_per_report == 2 and self.rank == 0:
            note = busy_note(*_load())
            if note:
                self._event("message", message=note)

    def _wrap_up(self, result: TrainResult, done: bool) -> None:
        """After the last step: why it ended early, the test split, the ranks together."""
        cfg = self.config
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

