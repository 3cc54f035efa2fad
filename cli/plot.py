"""``tlm plot``: training and validation curves of one or more runs, as a picture."""

from __future__ import annotations

from pathlib import Path

import click

from tlm import metrics
from tlm_cli.options import run_directory, save_root_option


@click.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", default="curves.png", show_default=True, help="image file to write")
@save_root_option
def plot(runs: tuple[str, ...], output: str, save_root: str | None) -> None:
    """Loss against steps and against wall time, from each RUN's metrics.jsonl (a run
    directory, or a run name as `tlm submit train --run` takes)."""
    runs = tuple(run_directory(run, save_root) for run in runs)
    formats = ("png", "pdf", "svg", "jpg", "jpeg")
    if Path(output).suffix.lower().lstrip(".") not in formats:
        raise click.UsageError(f"-o {output}: the picture's name must end in one of "
                               + ", ".join(f".{f}" for f in formats))
    if not Path(output).resolve().parent.is_dir():
        raise click.UsageError(f"-o {output}: no directory {Path(output).resolve().parent}")
    import matplotlib  # matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    plotted = 0
    for i, run in enumerate(runs):
        records = metrics.read(run)
        if not records:
            click.echo(f"{run}: no metrics yet ({metrics.FILE})", err=True)
            continue
        color, name = f"C{i}", Path(run).resolve().name
        for kind, style in (("train", dict(lw=1, alpha=0.6)), ("valid", dict(marker="o", lw=2))):
            rows = [r for r in records if r["kind"] == kind]
            if rows:
                label = f"{name} {kind}"
                by_step.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color,
                             label=label, **style)
                by_time.plot([r["elapsed"] / 60 for r in rows], [r["loss"] for r in rows],
                             color=color, label=label, **style)
        plotted += 1
    if not plotted:
        raise click.ClickException("nothing to plot: no run has metrics yet")
    by_step.set(xlabel="step", ylabel="cross-entropy loss (nats)", title="loss by step")
    by_time.set(xlabel="training time (minutes)", title="loss by wall time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=110)
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    click.echo(output)
