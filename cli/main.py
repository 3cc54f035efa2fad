"""``tlm``: train and inspect models; (with the queue) submit, watch and cancel jobs."""

from __future__ import annotations

import importlib
import os
import sys

import click

import tlm
from tlm import blas, ranks
from tlm.config import ConfigError, TrainConfig, check_save_dir, default_save_dir
from tlm.interrupts import StopOnSignal
from tlm.lease import LeaseLost, RunHeld
from tlm_cli.options import find_checkpoint, given_options, run_options, train_options
from tlm_cli.render import ConsoleHooks, ProgressDisplay
from tlm_worker.lab import data_folder


class LazyGroup(click.Group):
    """Commands whose modules load only when they run or are listed (click's lazy-loading
    recipe): ``tlm dashboard``'s web stack would cost every ``tlm submit`` a quarter second."""

    LAZY = {"dashboard": "tlm_cli.dashboard"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            return getattr(importlib.import_module(self.LAZY[name]), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tlm.__version__, prog_name="tlm")
def cli() -> None:
    """Train small Transformer language models with MLX."""


def echo(message: str) -> None:
    click.echo(message, err=True)


@cli.command()
@train_options
@click.option("--inference", is_flag=True,
              help="the seed's interactive generation mode: a prompt loop on the latest (or "
                   "--identifier) checkpoint in --save_dir, with --top_k, --temperature and --gpu "
                   "(as `tlm sample --interactive`)")
def train(inference, **options) -> None:
    """Train in the foreground, resuming the latest checkpoint in --save_dir.

    Ctrl+C (or SIGTERM) once: finish the step, save, exit 0. Twice: exit now.
    """
    if inference:
        _inference(options)
        return
    from tlm.checkpoint import CheckpointError  # MLX
    from tlm.data import DataError  # numpy
    from tlm.run import opened  # MLX
    from tlm.train import Diverged  # MLX

    given = given_options(options)
    save_dir = given.get("save_dir") or tlm.config.default_save_dir()
    hooks = ConsoleHooks(ProgressDisplay(0, click.get_text_stream("stderr")))  # its total once known
    stop = None
    try:
        check_save_dir(save_dir)
        if given.get("nodes", 1) > 1 and not ranks.joined():  # this process starts the ranks
            config = TrainConfig(**given)
            config.validate()
            echo(f"starting {config.nodes} ranks on this machine ({config.backend} backend, 127.0.0.1)")
            raise SystemExit(ranks.launch_local([sys.executable, "-m", "tlm_cli.main", *sys.argv[1:]],
                                                config.nodes, config.backend))
        with opened(given, hooks, data=data_folder(save_dir)) as trainer:
            config = trainer.config
            echo(blas.describe())
            echo(f"save_dir: {config.save_dir}  device: {'gpu' if config.gpu else 'cpu'}")
            echo(f"configuration: {config.describe()}")
            hooks.stop = stop = StopOnSignal(on_first=lambda s: echo(
                "\nstopping: finishing this step and saving (press Ctrl+C again to exit now)"))
            with hooks.display:
                result = trainer.run()
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except (DataError, CheckpointError, Diverged, RunHeld, LeaseLost) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # the save directory read-only or full (after retries), or gone
        raise _one_line(e, save_dir) from None
    finally:
        if stop is not None:
            stop.restore()
    if result.stopped:
        echo(f"stopped at iteration {result.step}; run the same command to resume")


def _one_line(e: OSError, where: str | None) -> click.ClickException:
    """A file system error as the file (or directory) and its reason, for a run's writes."""
    return click.ClickException(f"{e.filename or where or 'the save directory'}: {e.strerror or e}")


def _inference(options: dict) -> None:
    """``tlm train --inference``: the seed's REPL, through ``tlm sample --interactive``'s."""
    from tlm.generate import SampleConfig  # MLX
    from tlm.device import select_device  # MLX

    used = {"save_dir", "identifier", "top_k", "temperature", "gpu"}
    ignored = sorted(k for k, v in options.items() if v is not None and k not in used)
    if ignored:
        echo(f"--inference samples a checkpoint: ignoring --{', --'.join(ignored)}")
    try:
        select_device(bool(options.get("gpu")))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    ckpt = find_checkpoint(options.get("save_dir"), options.get("identifier"))
    defaults = TrainConfig()
    cfg = SampleConfig(top_k=defaults.top_k if options.get("top_k") is None else options["top_k"],
                       temperature=(defaults.temperature if options.get("temperature") is None
                                    else options["temperature"]))
    repl(ckpt, ckpt.load_model(), ckpt.tokenizer, cfg, ckpt.state["config"]["context_size"])


@cli.command()
@run_options
@click.option("--identifier", default=None, help="checkpoint SHA1 or unique prefix (default: latest)")
def inspect(save_dir: str | None, identifier: str | None) -> None:
    """Print a checkpoint's configuration, iteration, losses and integrity."""
    ckpt = find_checkpoint(save_dir, identifier)
    s = ckpt.state
    rows = [("identifier", f"{ckpt.identifier}  (SHA1 verified, metadata verified)"),
            ("iteration", iteration_text(s)),
            ("dataset", f"{s['dataset']} ({ckpt.tokenizer.kind} tokenizer, {ckpt.tokenizer.vocab_size:,} tokens)")]
    rows += [(key, f"{s[key]:.4f}") for key in ("val_loss", "best_val_loss") if s.get(key) is not None]
    for key, value in rows:
        click.echo(f"{key + ':':16}{value}")
    click.echo("configuration:")
    width = max(map(len, s["config"]))
    for key, value in sorted(s["config"].items()):
        click.echo(f"  --{key:{width}}  {value}")


def iteration_text(state: dict) -> str:
    """Where a checkpoint's run stands against its budget: steps, or minutes when that ended it."""
    step, iters = state["step"], state["config"]["num_iters"]
    budget, minutes = state["config"].get("time_budget") or 0, (state.get("elapsed") or 0) / 60
    spent = f", {minutes:.1f} minutes of training" if minutes else ""
    if step < iters and budget and minutes >= budget:
        return f"{step}: its --time_budget of {budget:g} minutes ended the run (--num_iters {iters}){spent}"
    return f"{step} of {iters}" + (f" or {budget:g} minutes" if budget and step < iters else "") + spent


from tlm_cli.jobs import cancel, logs, prune, runs, status, submit  # noqa: E402
from tlm_cli.plot import plot  # noqa: E402
from tlm_cli.sample import repl, sample  # noqa: E402
from tlm_cli.sweep import sweep  # noqa: E402

for command in (submit, status, logs, cancel, prune, runs, sample, plot, sweep):
    cli.add_command(command)


@cli.command("eval")
@run_options
@click.option("--identifier", default=None, help="checkpoint SHA1 or unique prefix (default: latest)")
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--tokens", type=click.IntRange(0), default=0, help="the split's first N tokens only")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="sliding-window evaluation: windows every N tokens, each scoring its last N")
@click.option("--local", is_flag=True, hidden=True,
              help="evaluate here (the default; kept for scripts that pass it)")
@click.option("--gpu", is_flag=True, help="use the Metal GPU")
def eval_(save_dir, identifier, split, tokens, stride, local, gpu) -> None:
    """Loss and perplexity (or bits per character) of a checkpoint on a split, here.

    It needs no queue, as `tlm train` does not; `tlm submit eval` asks a worker instead.
    """
    from tlm.checkpoint import CheckpointError  # MLX
    from tlm.data import DataError  # numpy
    from tlm.device import select_device  # MLX
    from tlm.run import evaluate_checkpoint  # MLX

    try:
        select_device(gpu)
        save_dir = save_dir or default_save_dir()
        r = evaluate_checkpoint(save_dir, identifier, split, os.environ.get("TLM_DATA_MIRROR"), tokens, stride,
                                log=echo, data=data_folder(save_dir))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except (CheckpointError, DataError) as e:
        raise click.ClickException(str(e)) from None
    metric = (f"bits per character {r['bits_per_char']:.4f}" if "bits_per_char" in r
              else f"perplexity {r['perplexity']:.2f}")
    click.echo(f"{split} loss {r['loss']:.4f}  {metric}  (checkpoint {r['checkpoint'][:12]}, "
               f"iteration {r['step']})")


@cli.command()
@run_options
@click.option("--identifier", default=None, help="checkpoint SHA1 or unique prefix (default: latest)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory to write")
def export(save_dir, identifier, out) -> None:
    """Write a checkpoint as a directory mlx-lm loads (mlx_lm.load / generate / server)."""
    from tlm.checkpoint import CheckpointError  # MLX
    from tlm.export import export as write  # MLX

    ckpt = find_checkpoint(save_dir, identifier)
    try:
        write(ckpt, out)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    echo(f"exported {ckpt.identifier[:12]} (iteration {ckpt.step}) to {out}: "
         f"try `mlx_lm.generate --model {out} --prompt ...`")
    click.echo(out)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
