"""Click options generated from :class:`tlm.config.TrainConfig`, so every
command that takes the trainer's flags spells and documents them identically."""

from __future__ import annotations

import dataclasses
import functools
import math
import socket
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import click

from tlm.config import ConfigError, TrainConfig, apply_preset, default_save_dir, flag_types
from tlm_worker.lab import Lab, LabError, answering, run_dir


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (which compare false with any bound)."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def train_options(fn: Callable) -> Callable:
    """Add one option per TrainConfig field: ``--context_size`` and ``--context-size``."""
    types = flag_types()
    for f in reversed(dataclasses.fields(TrainConfig)):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_ = f.metadata["help"]
        typ = types[f.name]
        if typ is bool:  # --x/--no_x: a preset's True can be turned off
            no = [f"--no{'_' if '_' in n else '-'}{n[2:]}" for n in names]
            fn = click.option(*(f"{n}/{m}" for n, m in zip(names, no)), f.name, default=None,
                              help=help_)(fn)
        else:
            default = f"default: {f.default}" if f.default not in (None, "") else None
            fn = click.option(*names, f.name, type=typ, default=None,
                              help=help_ + (f" ({default})" if default else ""))(fn)
    return fn


def params_options(params: type) -> Callable[[Callable], Callable]:
    """One option per field of a kind's params dataclass made with ``kinds.flag`` (as
    ``train_options`` for TrainConfig): ``tlm submit KIND``'s options."""
    def add(fn: Callable) -> Callable:
        hints = typing.get_type_hints(params)
        for f in reversed([f for f in dataclasses.fields(params) if "help" in f.metadata]):
            meta, hint = f.metadata, hints[f.name]
            typ = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kind = click.Choice(list(meta["choices"])) if "choices" in meta \
                else click.IntRange(meta["min"]) if "min" in meta else typ
            needed = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = {} if needed else {"default": f.default}  # click 8.2+: a default of None counts as given
            fn = click.option(*names, f.name, type=kind, required=needed, help=meta["help"] or None,
                              show_default="choices" in meta, **default)(fn)
        return fn
    return add


def refuse_empty(options: dict[str, Any]) -> None:
    """A usage error for an option given as the empty string (`--x ""`): never a default."""
    empty = next((k for k, v in options.items() if v == ""), None)
    if empty:
        raise click.UsageError(f"--{empty} is empty")


def given_options(options: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave (click passes None for the rest), over their --preset's."""
    refuse_empty(options)
    try:
        return apply_preset({k: v for k, v in options.items() if v is not None})
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def find_checkpoint(save_dir: Optional[str], identifier: Optional[str]):
    """The named or latest valid checkpoint of a run, or a one-line error saying how to make one."""
    from tlm import checkpoint  # MLX

    directory = save_dir or default_save_dir()
    if Path(directory).exists() and not Path(directory).is_dir():
        raise click.ClickException(f"--save_dir {directory} is a file, not a run directory")
    try:
        ckpt = checkpoint.find(directory, identifier, warn=lambda m: click.echo(m, err=True))
    except checkpoint.CheckpointError as e:
        raise click.ClickException(str(e)) from None
    if ckpt is None:
        raise click.ClickException(f"no checkpoint in {directory}: train one first, e.g. "
                                   f"`tlm train --save_dir {directory}`")
    return ckpt


save_root_option = click.option(
    "--save_root", "--save-root", envvar="TLM_SAVE_ROOT", default=None,
    help="where this machine keeps --run runs (env TLM_SAVE_ROOT; default: runs/ beside the default save dir)")


def run_directory(given: str, save_root: Optional[str], what: str = "RUN") -> str:
    """A run directory from a path, or from a run name under this machine's save root."""
    if Path(given).expanduser().is_dir():
        return str(Path(given).expanduser())
    if "/" not in given and not given.startswith("."):
        named = run_dir({"run": given}, save_root)
        roots = [named.parent] + [r for r in workers_save_roots() if r != named.parent]
        for root in roots:
            if (root / given).is_dir():
                return str(root / given)
        raise click.UsageError(f"{what} {given!r}: neither a directory nor a run under "
                               f"{', '.join(map(str, roots))} (--save_root)")
    raise click.UsageError(f"{what} {given!r}: no such directory")


def workers_save_roots() -> list[Path]:
    """Where this Mac's live workers keep runs (their heartbeats say), so a run that a worker
    with its own --save_root trained is found by name here too; none if the queue (TLM_QUEUE,
    or the default one) does not answer at once."""
    try:
        with answering():
            workers = Lab.connect(None, patient=False).registry.workers()
    except LabError:
        return []
    here = socket.gethostname()
    return sorted({Path(w["save_root"]) for w in workers
                   if w.get("host") == here and isinstance(w.get("save_root"), str)})


def run_options(fn: Callable) -> Callable:
    """--save_dir, or --run (a run name under --save_root, or under a live worker's save root
    here) with --save_root: the run directory a command reads here, passed on as ``save_dir``."""
    @click.option("--save_dir", "--save-dir", "save_dir", default=None, help="run directory")
    @click.option("--run", default=None, help="a run name, under --save_root")
    @save_root_option
    @functools.wraps(fn)
    def wrapper(*args: Any, save_dir: Optional[str], run: Optional[str], save_root: Optional[str],
                **kwargs: Any) -> Any:
        if run is not None and save_dir is not None:
            raise click.UsageError("give --run or --save_dir, not both")
        return fn(*args, save_dir=run_directory(run, save_root, "--run") if run else save_dir, **kwargs)
    return wrapper
