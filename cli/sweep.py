"""``tlm sweep``: submit, watch, pick from, grow and cancel a hyperparameter search (worker/sweeps.py,
through the lab service)."""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import click
from rich.table import Table

from tlm_cli.jobs import duration, echo, queue_errors, queue_option
from tlm_cli.render import fitted_table, table_console, watch_table
from tlm_worker.kinds import FINAL, misfit
from tlm_worker.lab import Lab

SPEC_KEYS = ("name", "preset", "search", "trials", "parallel", "metric", "budget", "prune", "sampler",
             "seed", "priority", "schedule", "population", "interval", "flags")


TOML_SHAPE = {"name": str, "preset": str, "search": ([str], {str: str}), "trials": int, "parallel": int,
              "metric": str, "budget": (str, int), "prune": str, "sampler": str, "seed": int,
              "priority": str, "schedule": str, "population": int, "interval": (str, int),
              "flags": {str: (str, int, float, bool)}}


@click.group()
def sweep() -> None:
    """Search training flags with Optuna over ordinary queued training jobs."""


def read_toml(path: str) -> dict[str, Any]:
    """A sweep spec file: the options below as keys (``search`` a table or a list, ``flags`` a table)."""
    try:
        import tomllib  # platform: Python 3.11 or tomli
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # platform: Python 3.11 or tomli
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.UsageError(f"{path}: {e}") from None
    unknown = set(data) - set(SPEC_KEYS)
    if unknown:
        raise click.UsageError(f"{path}: unknown keys {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(SPEC_KEYS)})")
    why = misfit(data, TOML_SHAPE, "")
    if why:
        raise click.UsageError(f"{path}: {why}")
    search = data.get("search", [])
    if isinstance(search, dict):
        search = [f"{k}={v}" for k, v in search.items()]
    return {**data, "search": list(search)}


@sweep.command("submit")
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="the sweep's name: its trials train in NAME-<id>/trial-<n>")
@click.option("--preset", default=None, help="training flags to start from (as tlm train --preset)")
@click.option("--search", multiple=True, metavar="FLAG=SPEC",
              help="FLAG=LO:HI (uniform; integers for integer flags), FLAG=log:LO:HI, FLAG=a,b,c")
@click.option("--flag", "flags", multiple=True, metavar="FLAG=VALUE", help="a fixed training flag")
@click.option("--trials", type=click.IntRange(1, 10000), default=None, help="trials in all (default 16)")
@click.option("--parallel", type=click.IntRange(1, 1000), default=None,
              help="trials queued at once (default 2: one per worker you have)")
@click.option("--metric", default=None, help="what is minimised: valid_loss")
@click.option("--budget", default=None, help="each trial's training: minutes (10m) or steps (500)")
@click.option("--prune", default=None,
              help="asha (default: trials pause at rungs, the best resume), asha-stop (stops them), "
                   "hyperband or none")
@click.option("--sampler", default=None, help="tpe (default), random or grid")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="same seed, same proposals")
@click.option("--priority", default=None, help="of the trials: low (default), normal or high")
@click.option("--schedule", default=None,
              help="search (default: Optuna proposes each trial) or pbt (population based training: the "
                   "worst quarter takes the best quarter's checkpoints and perturbed flags each generation)")
@click.option("--population", type=click.IntRange(2, 1000), default=None,
              help="with --schedule pbt: trials that train at once (default 4)")
@click.option("--interval", default=None,
              help="with --schedule pbt: steps (or minutes, 2m, with a budget in minutes) per generation "
                   "(default: a sixth of the budget)")
@queue_option
@queue_errors
def submit(spec_file, name, preset, search, flags, trials, parallel, metric, budget, prune, sampler,
           seed, priority, schedule, population, interval, queue) -> None:
    """Queue a sweep (options, or a TOML file with the same keys); prints its id."""
    given = read_toml(spec_file) if spec_file else {}
    options = {"name": name, "preset": preset, "trials": trials, "parallel": parallel, "metric": metric,
               "budget": budget, "prune": prune, "sampler": sampler, "seed": seed, "priority": priority,
               "schedule": schedule, "population": population, "interval": interval}
    given.update({k: v for k, v in options.items() if v is not None})
    given["search"] = list(given.get("search", [])) + list(search)
    fixed = {**given.pop("flags", {}), **dict(_pair(f) for f in flags)}
    job = Lab.connect(queue).submit_sweep(given, fixed)
    spec = job.params
    click.echo(job.id)
    how = (f"population based training of {spec['trials']} trials at once" if spec.get("schedule") == "pbt" else
           f"{spec['trials']} trials, {spec['parallel']} at a time, {spec['sampler']} sampler, "
           f"{spec['prune'].replace('none', 'no')} pruning")
    echo(f"queued sweep {spec['name']} ({job.id}): {how}; `tlm sweep status {spec['name']}` to watch")


def _pair(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq:
        raise click.UsageError(f"--flag {item!r}: give FLAG=VALUE")
    return key.strip().lstrip("-").replace("-", "_"), value


def _fmt(value: Any, spec: str = ".3g") -> str:
    """A value as the table shows it: floats to ``spec`` (one precision per column), None as -."""
    if isinstance(value, float):
        return format(value, spec)
    return "-" if value is None else str(value)


def leaderboard_table(sweep_job, rows: list[dict[str, Any]], width: int) -> Table:
    names = list(sweep_job.params["search"])
    counts: dict[str, int] = {}
    for r in rows:  # from the rows below, so the title and the table never disagree
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    said = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    title = (f"sweep {sweep_job.params['name']} ({sweep_job.state}; "
             f"{len(rows)} of {sweep_job.params['trials']} trials: {said or 'none yet'})")
    copied = ("copied",) if sweep_job.params.get("schedule") == "pbt" else ()  # PBT's lineage
    columns = ("rank", "trial", *names, "best valid_loss", "at step", "at minute", "steps", "worker time", "state",
               *copied)
    cells = [(str(r["rank"]), str(r["trial"]), *(_fmt(r["params"].get(n)) for n in names),
              _fmt(r["best"], ".4f"), _fmt(r["best_step"]), _fmt(r["best_minute"], ".2f"), str(r["steps"]),
              duration(r["worker_time"]) if r["worker_time"] else "-", r["state"], lineage(r))[:len(columns)]
             for r in rows]
    return fitted_table(title, columns, cells, width,
                        ("rank", "trial", "best valid_loss", "state", *names, *copied, "steps", "worker time",
                         "at step", "at minute"),
                        least={n: len(n) for n in names}, right=[c for c in columns if c not in (*names, "state")])


def lineage(row: dict[str, Any]) -> str:
    """A PBT trial's copies, "trial 2 at 300, trial 0 at 600": whose checkpoint it took, when."""
    return ", ".join(f"trial {donor} at {at:g}" for at, donor in row["copies"]) or "-"


@sweep.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="the leaderboard as JSON")
@click.option("--csv", "as_csv", is_flag=True, help="the leaderboard as CSV")
@click.option("--watch", is_flag=True, help="redraw as trials report")
@queue_option
@queue_errors
def status(name, as_json, as_csv, watch, queue) -> None:
    """The leaderboard: rank, trial, searched flags, best metric (step, minute), steps, state."""

    lab = Lab.connect(queue)
    job = lab.sweep(name)
    if as_json:
        click.echo(json.dumps({"sweep": job.to_record(), "trials": lab.trials(job)}))
        return
    if as_csv:
        out = io.StringIO()
        names = list(job.params["search"])
        writer = csv.writer(out)
        writer.writerow(["rank", "trial", *names, "best", "best_step", "best_minute", "steps",
                         "worker_time", "state"])
        for r in lab.trials(job):
            writer.writerow([r["rank"], r["trial"], *(r["params"].get(n) for n in names), r["best"],
                             r["best_step"], r["best_minute"], r["steps"], r["worker_time"], r["state"]])
        click.echo(out.getvalue(), nl=False)
        return
    console = table_console()
    if not watch:
        console.print(leaderboard_table(job, lab.trials(job), console.width))
        return

    def board() -> Table:
        nonlocal job
        job = lab.registry.get(job.id)
        return leaderboard_table(job, lab.trials(job), console.width)
    watch_table(console, lab.registry.changes, board, lambda: job.state in FINAL)


@sweep.command("best")
@click.argument("name")
@click.option("--preset-out", "--preset_out", "preset_out", type=click.Path(dir_okay=False), default=None,
              help="also write the flags as a preset file that --preset accepts (JSON)")
@click.option("--train-on", "--train_on", "train_on", default=None, metavar="BUDGET",
              help="queue the winning trial's own run to train on for BUDGET more (30m, or 5000 steps) "
                   "from its checkpoint, instead of retraining its flags from scratch")
@queue_option
@queue_errors
def best(name, preset_out, train_on, queue) -> None:
    """Print the winning flags as a ready `tlm submit train` command (or train the winner on)."""
    lab = Lab.connect(queue)
    job = lab.sweep(name)
    row, flags = lab.best(job)
    echo(f"best: trial {row['trial']} ({row['run']}), valid_loss {row['best']:.4f} at step "
         f"{row['best_step']}")
    if train_on is not None:
        queued = lab.train_on(job, train_on)
        click.echo(queued.id)
        echo(f"queued train job {queued.id}: trial {row['trial']}'s run {row['run']} trains on for "
             f"{train_on} more from its checkpoint; `tlm logs -f {queued.id}` to follow")
        return
    if len(row["schedule"]) > 1:  # PBT: its weights were trained with flags that changed on the way
        echo(f"its flags changed as it trained (population based training): no one command reproduces it. "
             f"Its checkpoint is {row['checkpoint'] or '-'} in run {row['run']} (`tlm sample --run {row['run']}`; "
             f"`tlm sweep best {name} --train-on BUDGET` trains it on). The flags its weights saw:")
        for at, params in row["schedule"]:
            click.echo(f"from {'second' if job.params['budget'].endswith('m') else 'step'} {at:g}: "
                       + " ".join(f"--{k} {_fmt(v, '.4g')}" for k, v in params.items()))
        echo("the final flags as a command:")
    click.echo(submit_command(flags))
    if preset_out:
        Path(preset_out).write_text(json.dumps(flags, indent=2, sort_keys=True) + "\n")
        echo(f"wrote {preset_out}: `tlm submit train --preset {preset_out} --run NAME`")


def submit_command(flags: dict[str, Any], run: Optional[str] = None) -> str:
    parts = ["tlm", "submit", "train"] + (["--run", run] if run else ["--run", "NAME"])
    for k, v in sorted(flags.items()):
        parts += [f"--{k}"] if v is True else [] if v is False else [f"--{k}", str(v)]
    return shlex.join(parts)


@sweep.command("cancel")
@click.argument("name")
@queue_option
@queue_errors
def cancel(name, queue) -> None:
    """Stop the sweep: every running trial saves and ends cancelled; no new trial starts."""
    lab = Lab.connect(queue)
    lab.cancel_sweep(lab.sweep(name))
    echo(f"sweep {name}: no new trials; running ones finish their step, save and end cancelled")


@sweep.command("add")
@click.argument("name")
@click.argument("more", type=int)
@queue_option
@queue_errors
def add(name, more, queue) -> None:
    """Add MORE trials to a sweep that still runs."""
    lab = Lab.connect(queue)
    trials = lab.add_trials(lab.sweep(name), more)
    echo(f"sweep {name}: {trials} trials in all")
