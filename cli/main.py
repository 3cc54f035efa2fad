"""``tlm``: train, and (with the queue) submit, watch and cancel jobs."""

from __future__ import annotations

import signal
import sys

import click

import tlm
from tlm import blas
from tlm.config import ConfigError, check_save_dir
from tlm_cli.options import config_from_options, train_options
from tlm_cli.render import ProgressPrinter


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tlm.__version__, prog_name="tlm")
def cli() -> None:
    """Train small Transformer language models with MLX."""


@cli.command()
@train_options
def train(**options) -> None:
    """Train in the foreground (the seed's main.py)."""
    config = config_from_options(options)
    try:
        check_save_dir(config.save_dir)
        from tlm.train import Trainer, select_device  # imports mlx: after validation
        device = select_device(config.gpu)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    err = click.get_text_stream("stderr")
    click.echo(blas.describe(), err=True)
    click.echo(f"save_dir: {config.save_dir}  device: {device}", err=True)

    from tlm.data import DataError, load_dataset
    from pathlib import Path
    try:
        dataset = load_dataset(config.dataset, Path(config.save_dir) / "datasets",
                               config.data_mirror, log=lambda m: click.echo(m, err=True))
    except DataError as e:
        raise click.ClickException(str(e)) from None
    trainer = Trainer(config, dataset)
    with ProgressPrinter(config.num_iters, err) as printer:
        trainer.run(on_progress=printer)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
