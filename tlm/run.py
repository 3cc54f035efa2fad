"""Opening a run: its directory's lease, its flags resolved against its checkpoint, its budget,
its data; then the one way `tlm train` and a worker's training job build and train it, and
a checkpoint evaluated on a split."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx

from tlm import checkpoint, ranks
from tlm.checkpoint import Checkpoint, CheckpointError
from tlm.config import RUN_DATA, ConfigError, TrainConfig, default_save_dir, local_flags
from tlm.data import Dataset, load_dataset
from tlm.device import select_device
from tlm.hooks import Progress, TrainingHooks, TrainResult
from tlm.lease import DEFAULT_TTL, RunLease
from tlm.model import ModelArgs
from tlm.train import Trainer, evaluate

# Flags that fix a run's architecture, data or optimizer state: a resumed run takes
# them from its checkpoint.
ARCHITECTURE = ("dataset", "tokenizer", "dim", "num_blocks", "num_heads", "context_size",
                "tie_embeddings", "optimizer")


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
    merged = {k: v for k, v in stored.items() if k not in local_flags()}
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
    if config.more:  # counted from the newest; one that began its cooldown goes on from before it
        budget = more_budget(config.more, ckpt.step, ckpt.state.get("elapsed", 0.0))
        try:
            stable = None if config.identifier else checkpoint.branch_point(config.save_dir)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        if stable is not None:
            warn(f"--more {config.more} from checkpoint {stable.identifier[:12]} at iteration {stable.step}, "
                 f"the last before the --lr_cooldown began: the rate stays at its peak and cools down "
                 f"at the end of the new budget")
            ckpt, budget["identifier"] = stable, stable.identifier
        config = dataclasses.replace(config, **budget)
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


def prepare(config: TrainConfig, ckpt: Optional[Checkpoint], log: Callable[[str], None], data: Path
            ) -> tuple[Dataset, Optional[tuple[ModelArgs, dict[str, mx.array]]]]:
    """The run's data (prepared in the folder ``data``), tokenized as its checkpoint or
    ``--init_from`` model expects, and the pretrained shape and weights for a new model
    started from one."""
    init, tokenizer = None, config.tokenizer
    if ckpt is not None:
        tokenizer = ckpt.tokenizer
    elif config.init_from:
        from tlm.export import load_pretrained  # MLX
        try:
            args, weights, tokenizer = load_pretrained(config.init_from)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--init_from {config.init_from}: {e}") from None
        init = (args, weights)
        log(f"starting from {config.init_from}: {args.num_hidden_layers} blocks, dim {args.hidden_size}, "
            f"{tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} tokens")
    return load_dataset(config.dataset_source(), data, config.data_mirror, log, tokenizer), init


def join_ranks(config: TrainConfig) -> Optional[mx.distributed.Group]:
    """This process's group of ``--nodes`` ranks (None for one process)."""
    group = ranks.join(config.backend)
    started = group.size() if group is not None else 1
    if started != config.nodes:
        raise ConfigError(f"--nodes {config.nodes}, but {started} rank(s) were started")
    return group


@contextmanager
def opened(given: dict[str, Any], hooks: TrainingHooks, labels: Optional[dict[str, Any]] = None,
           refuse_spent: bool = True, holder: Optional[dict[str, Any]] = None,
           lease_ttl: float = DEFAULT_TTL, data: Optional[Path] = None) -> Iterator[Trainer]:
    """A run ready to train, built the one way `tlm train` and a worker's job both use: its
    directory's lease taken first (rank 0: the one that writes), then the flags resolved
    against its checkpoint, the ranks joined, the data prepared; the lease is released
    when the block ends. A run whose budget is spent is refused (ConfigError), unless not
    ``refuse_spent``: a job resumed in its final evaluation finishes it. ``holder``: who
    the lease names (default: the labels); ``data``: where its data is prepared (default
    ``<save_dir>/datasets``)."""
    save_dir = given.get("save_dir") or default_save_dir()
    lease = None if ranks.follower() else RunLease(save_dir, holder or labels, lease_ttl,
                                                           hooks.log).take()
    try:
        config, ckpt = open_run(given, warn=hooks.log, refuse_spent=refuse_spent)
        if ckpt is not None and config.identifier and lease is not None:
            aside = checkpoint.branch(save_dir, ckpt)  # retention and a later resume follow it
            if aside is not None:
                hooks.log(f"training on from checkpoint {ckpt.identifier[:12]} at iteration {ckpt.step}: "
                          f"the run's newer checkpoints and their metrics moved to {aside.name}/")
        group = join_ranks(config)
        select_device(config.gpu)
        dataset, init = prepare(config, ckpt, hooks.log, data or Path(save_dir) / RUN_DATA)
        yield Trainer(config, dataset, ckpt, hooks=hooks, labels=labels, init=init, group=group, lease=lease)
    finally:
        if lease is not None:
            lease.release()


def train(given: dict[str, Any], hooks: Optional[TrainingHooks] = None,
          labels: Optional[dict[str, Any]] = None, spent_ok: bool = False,
          holder: Optional[dict[str, Any]] = None, lease_ttl: float = DEFAULT_TTL,
          data: Optional[Path] = None) -> TrainResult:
    """Open the run (``opened``) and train it."""
    with opened(given, hooks or TrainingHooks(), labels, not spent_ok, holder, lease_ttl, data) as trainer:
        return trainer.run()


def evaluate_checkpoint(save_dir: str, identifier: Optional[str] = None, split: str = "valid",
                        data_mirror: Optional[str] = None, tokens: int = 0,
                        stride: Optional[int] = None, log: Callable[[str], None] = lambda m: None,
                        data: Optional[Path] = None) -> dict[str, Any]:
    """Loss and perplexity (or bits per character) of a checkpoint on a split
    (its first ``tokens`` tokens, or all of it), optionally with a sliding window; its data
    prepared in ``data`` (default ``<save_dir>/datasets``)."""
    ckpt, model = checkpoint.read(save_dir, identifier, lambda c: c.load_model(), log)
    if ckpt is None or model is None:
        raise CheckpointError(f"no checkpoint in {save_dir}: train one first")
    config = TrainConfig.from_dict({**ckpt.state["config"], "save_dir": save_dir,
                                    "data_mirror": data_mirror})
    if stride is not None and stride > config.context_size:
        raise ConfigError(f"--stride {stride} is longer than the model's context "
                          f"({config.context_size}): windows would skip targets")
    dataset = load_dataset(config.dataset_source(), data or Path(save_dir) / RUN_DATA, data_mirror, log,
                           ckpt.tokenizer)
    data = dataset.split(split)
    loss = evaluate(model, data[: tokens + 1] if tokens else data, config.context_size, stride)
    metric = Progress("eval", ckpt.step, config.num_iters, val_loss=loss,
                      bits_per_char=dataset.bits_per_char).val_metric
    name = "bits_per_char" if dataset.bits_per_char else "perplexity"
    return {"checkpoint": ckpt.identifier, "step": ckpt.step, "split": split, "loss": loss,
            name: metric, "stride": stride}

