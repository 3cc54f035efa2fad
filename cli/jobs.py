"""Queue commands: ``tlm submit``, ``status``, ``logs``, ``cancel``, ``prune``, ``runs``.

Each is a thin translation into registry and queue calls; the job id goes
alone to stdout so scripts can capture it, messages go to stderr.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import io
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import click
from rich.table import Table

from tlm.config import RUN_INPUTS, ConfigError
from tlm.files import with_retries
from tlm.interrupts import StopOnSignal
from tlm.memory import size_text
from tlm_cli.options import FiniteRange, given_options, params_options, refuse_empty, train_options
from tlm_cli.render import ProgressDisplay, fitted_table, table_console, watch_table
from tlm_worker.kinds import CANCELLED, FINAL, KINDS, LIVE, PRIORITIES, SUCCEEDED, Job, JobKind, submitted_path
from tlm_worker.lab import RUN_COLUMNS, Lab, LabError, Placement, answering, run_dir, training_job

queue_option = click.option("--queue", envvar="TLM_QUEUE", default=None,
                            help="redis://[:password@]host:port/db (env TLM_QUEUE); "
                                 "default: embedded SQLite in the per-user data dir")


def echo(message: str) -> None:
    click.echo(message, err=True)


def queue_errors(fn: Callable) -> Callable:
    """Turn the lab's refusals, an unreachable queue or an unknown job id into a one-line error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with answering(kwargs.get("queue")):
                return fn(*args, **kwargs)
        except LabError as e:  # bad input as a usage error (status 2), the lab's refusals as 1
            raise (click.UsageError if e.status == 400 else click.ClickException)(str(e)) from None
    return wrapper


@click.group()
def submit() -> None:
    """Queue a job for tlm-worker."""


def placement_options(fn: Callable) -> Callable:
    """--priority, --after, --needs and --on: what every queued job may say of its placement."""
    for option in reversed((
            click.option("--priority", type=click.Choice(list(PRIORITIES)), default="normal",
                         show_default=True, help="higher priorities are taken first; FIFO within one"),
            click.option("--after", default=None, metavar="JOB",
                         help="start only when JOB has succeeded (skipped if it fails or is cancelled)"),
            click.option("--needs", multiple=True, metavar="memory=SIZE|gpu",
                         help="run only on a worker with this much free memory (e.g. memory=24G) or a GPU"),
            click.option("--on", "on", multiple=True, metavar="KEY=VALUE",
                         help="run only on a worker started with --label KEY=VALUE, or host=NAME"))):
        fn = option(fn)
    return fn


def carry_dataset(dataset: str, run_dir: Path) -> dict[str, str]:
    """Copy the user's own text into the run directory, named by its SHA1, so every worker
    on every Mac trains on the same bytes; the job params that name the copy."""
    from tlm.data import DataError, text_digest, text_files  # numpy

    source = Path(dataset).expanduser().absolute()
    try:
        files = text_files(source)
        digest = text_digest(source, files)
    except DataError as e:
        raise click.ClickException(str(e)) from None
    name = f"{source.stem}-{digest[:10]}{source.suffix}" if source.is_file() else f"{source.name}-{digest[:10]}"
    dest = run_dir / RUN_INPUTS / name
    part = dest.with_name(f".{name}.{os.getpid()}.part")

    def copy() -> None:  # only the checked files: no FIFO, no link loop, nothing half-copied kept
        shutil.rmtree(part, ignore_errors=True)  # an earlier try's
        if not source.is_dir():
            shutil.copyfile(source, part)
        for f in files if source.is_dir() else ():
            (part / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, part / f.relative_to(source))
        os.replace(part, dest)
    try:
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with_retries(copy, f"copying --dataset {dataset}", lambda line: click.echo(line, err=True))
    except OSError as e:
        raise click.ClickException(f"cannot copy --dataset {dataset} into {dest.parent} (workers "
                                   f"read it from the run directory): {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(part, ignore_errors=True) if part.is_dir() else part.unlink(missing_ok=True)
    return {"dataset": f"{RUN_INPUTS}/{name}", "dataset_sha1": digest}


THEN = " | ".join(k.then for k in KINDS.values() if k.then)


def parse_then(items: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """``--then`` follow-ups of a training job: (kind, params) of each, on the run's final
    checkpoint; the kinds table says which kinds may follow and parses their argument."""
    out = []
    for item in items:
        name, _, arg = item.partition(":")
        kind = KINDS.get(name)
        try:
            if kind is None or not kind.then:
                raise ValueError(f"give {THEN}")
            out.append((name, dataclasses.asdict(kind.params.parse(arg))))
        except ValueError as e:
            raise click.UsageError(f"--then {item!r}: {e}") from None
    return out


@submit.command("train")
@train_options
@placement_options
@click.option("--then", "then", multiple=True, metavar="STEP",
              help=f"when training succeeds, on its final checkpoint: {THEN} (repeatable)")
@click.option("--run", default=None, help="run name, under each worker's --save_root")
@click.option("--save_root", "--save-root", envvar="TLM_SAVE_ROOT", default=None,
              help="where this machine mounts the shared runs directory (with --run: a --dataset "
                   "file is copied into the run there)")
@click.option("--wait", is_flag=True, help="follow the job to its end")
@queue_option
@queue_errors
def submit_train(run, save_root, wait, queue, priority, after, needs, on, then, **options) -> None:
    """Queue a training job (resumes the run's latest checkpoint, as tlm train does).

    With --nodes N it is a gang job: it starts when N workers can each run one rank
    of it, and trains one model across them.

    A --dataset file or folder is copied into the run directory first, so workers
    on other machines (or in other directories) train on the same bytes.

    --gpu: only a worker with a GPU takes it. Its memory need is estimated from the
    model's shape, batch, context and optimizer (tlm.memory); --needs memory= raises it.
    """
    given = given_options(options)
    where, run_key = Lab.run_target(run, given.pop("save_dir", None))
    follow_ups = parse_then(then)
    place = Placement.of(priority, after, needs, on)
    try:
        training_job(given, where)  # bad flags: refused before a --dataset is copied
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    from tlm.data import is_text_path  # numpy
    carried = None
    if given.get("dataset") and is_text_path(given["dataset"]):
        carried = carry_dataset(given["dataset"], run_dir(where, save_root))
    lab = Lab.connect(queue, save_root)
    job = announce(lab.train(run_key, given, place, carried))
    for kind, params in follow_ups:
        announce(lab.read(kind, run_key, params, Placement(place.priority, job.id)))
    if wait:
        raise SystemExit(follow(lab, job.id))


def read_command(kind: JobKind) -> click.Command:
    """``tlm submit KIND`` for a kind that reads a run's checkpoint: its options are its params'
    flag fields (``kinds.flag``), so a new kind is its entry in KINDS and its run function."""
    def command(run, save_dir, wait, queue, priority, after, needs, on, **values) -> None:
        run_key = Lab.run_target(run, save_dir)[1]
        refuse_empty(values)
        fields = {f.name: f for f in dataclasses.fields(kind.params)}
        values = {k: submitted_path(v) if v is not None and fields[k].metadata.get("path") else v
                  for k, v in values.items()}
        lab = Lab.connect(queue)
        job = announce(lab.read(kind.name, run_key, dataclasses.asdict(kind.params(**values)),
                                Placement.of(priority, after, needs, on)))
        if wait:
            raise SystemExit(follow(lab, job.id))
    command.__name__ = f"submit_{kind.name}"
    fn = queue_option(queue_errors(command))
    fn = click.option("--wait", is_flag=True, help="follow the job to its end")(fn)
    fn = params_options(kind.params)(fn)
    fn = click.option("--save_dir", "--save-dir", default=None, help="run directory")(fn)
    fn = click.option("--run", default=None, help="run name, under each worker's --save_root")(fn)
    return submit.command(kind.name, help=kind.submit)(placement_options(fn))


for _kind in KINDS.values():
    if _kind.submit:
        read_command(_kind)


def announce(job: Job) -> Job:
    """Print a queued job's id (stdout, for scripts) and what was queued (stderr)."""
    click.echo(job.id)
    waits = f", after {job.after}" if job.after else ""
    needs = f", {describe_needs(job.needs)}" if job.needs else ""
    echo(f"queued {job.kind} job {job.id} for {run_label(job.run)}{waits}{needs}")
    return job


def describe_needs(needs: dict[str, Any]) -> str:
    """A job's needs in words: 'needs gpu, 2.1 GiB, room=office'."""
    parts = ["gpu"] if needs.get("gpu") else []
    if needs.get("memory"):
        parts.append(size_text(needs["memory"]))
    if needs.get("host"):
        parts.append(f"host {needs['host']}")
    parts += [f"{k}={v}" for k, v in (needs.get("labels") or {}).items()]
    return "needs " + ", ".join(parts)


def follow(lab: Lab, job_id: str) -> int:
    """Print the job's log as it grows until it ends; Ctrl+C cancels (twice: forced).

    Exit status: 0 succeeded, 1 failed, 130 cancelled.
    """
    registry = lab.registry
    def first(_):
        if registry.cancel(job_id):
            echo("\ncancelled before a worker took it")
        else:
            echo("\ncancelling: the job finishes its step and saves (Ctrl+C again to force)")

    def second_exit():
        registry.cancel(job_id, force=True)

    stop = StopOnSignal(on_first=first, on_second=second_exit)
    cursor = None
    job = registry.get(job_id)
    total = int(job.params.get("num_iters", 0)) or 1
    try:
        with ProgressDisplay(total, click.get_text_stream("stderr")) as display, \
                registry.changes() as wait:
            while True:
                job = registry.get(job_id)
                lines, cursor = registry.logs(job_id, cursor)
                for line in lines:
                    display.line(line)
                p = job.progress
                if p.get("step"):
                    display.advance(p["step"], p.get("total", total), p.get("train_loss"))
                if job.state in FINAL:
                    break
                wait(1.0)
    finally:
        stop.restore()
    echo(f"job {job_id} {job.state}" + (f": {job.error}" if job.error else ""))
    return {SUCCEEDED: 0, CANCELLED: 130}.get(job.state, 1)


def _age(t: Optional[float], now: float) -> str:
    """How long ago ``t`` was, both read by the queue's clock (``Registry.now``)."""
    if not isinstance(t, (int, float)) or not t:
        return "-"
    return duration(max(0.0, now - t))  # a clock a little ahead: now, not "-3s"


def duration(s: float) -> str:
    """Seconds as a reader wants them: 45s, 12m, 3.5h."""
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _progress(job: Job, waiting: Optional[str] = None) -> str:
    p = job.progress
    if waiting:
        return waiting
    if job.spec.driven:
        counts = ", ".join(f"{n} {s}" for s, n in sorted((p.get("counts") or {}).items()))
        best = p.get("best")
        return (f"trials of {p.get('trials', '?')}: {counts or 'none yet'}"
                + (f"; best {best['loss']:.4f} (trial {best['trial']})" if best else ""))
    if job.after and job.state == "waiting":
        return f"after {job.after}"
    if p.get("phase") and job.state == "running":
        return p["phase"] + (f" (at {p['step']})" if p.get("step") else "")
    if not p.get("step"):
        return ""
    out = f"{p['step']}/{p.get('total', '?')}"
    if p.get("train_loss") is not None:
        out += f" loss {p['train_loss']:.3f}"
    if p.get("val_metric") is not None:
        out += f" val {p.get('val_metric_name', 'metric')} {p['val_metric']:.2f}"
    if p.get("tokens_per_sec"):
        out += f" {p['tokens_per_sec']:,.0f} tok/s"
    if p.get("eta_seconds") and job.state == "running":
        out += f" ETA {p['eta_seconds'] / 60:.0f}m"
    return out


def _tries(job: Job) -> str:
    """Attempts (crashes count), and interruptions after a +."""
    return str(job.attempts) + (f"+{job.interruptions}" if job.interruptions else "")


RUN_IMPORTANCE = ("run", "best_valid", "state", "dataset", "steps", "minutes", "test", "dim", "num_blocks",
                  "learning_rate", "optimizer", "context_size", "batch_size", "num_heads", "dropout",
                  "best_step", "tokens_per_sec", "jobs")


def _worker_cell(w: dict, key: str) -> str:
    caps = w.get("capabilities") or {}
    if key == "memory":
        return (f"{size_text(caps['memory_available'])} free" if caps.get("memory_available") else "-")
    if key == "labels":
        return ", ".join(f"{k}={v}" for k, v in (caps.get("labels") or {}).items()) or "-"
    if key == "device":
        return str(w.get("device", "-")) + (f" ({caps['chip']})" if caps.get("chip") else "")
    return str(w.get(key, "-"))


def status_table(jobs: list[Job], workers: list[dict], waiting: dict[str, str], now: float,
                 width: int) -> Table:
    grid = Table.grid()
    grid.add_row(jobs_table(jobs, waiting, now, width))
    grid.add_row("")
    grid.add_row(workers_table(workers, now, width))
    return grid


JOB_COLUMNS = ("id", "kind", "run", "state", "worker", "tries", "age", "progress", "error")
JOB_IMPORTANCE = ("id", "state", "run", "progress", "kind", "tries", "age", "error", "worker")


def jobs_table(jobs: list[Job], waiting: dict[str, str], now: float, width: int,
               title: Optional[str] = "jobs") -> Table:
    """The jobs, one row each; ``waiting``: why a job no live worker can run waits, by id."""
    rows = [(job.id, job.kind, run_label(job.run), job.state, job.holder, _tries(job), _age(job.created, now),
             _progress(job, waiting.get(job.id)), (job.error or "")[:60]) for job in jobs]
    table = fitted_table(title, JOB_COLUMNS, rows, width, JOB_IMPORTANCE,
                         least={"run": 16, "progress": 16, "error": 12})
    if any(job.interruptions for job in jobs):
        said = "tries: attempts (crashes count against --max_attempts) + interruptions (not counted)"
        table.caption = "\n".join(filter(None, (table.caption, said)))
    return table


WORKER_COLUMNS = ("worker", "host", "pid", "device", "memory", "labels", "heartbeat", "jobs")
WORKER_IMPORTANCE = ("worker", "heartbeat", "jobs", "device", "memory", "labels", "host", "pid")


def workers_table(workers: list[dict], now: float, width: int) -> Table:
    rows = []
    for w in workers:
        state = f" (paused: {w['paused']})" if w.get("paused") else ""
        rows.append((*(_worker_cell(w, k) for k in ("id", "host", "pid", "device", "memory", "labels")),
                     _age(w.get("heartbeat"), now), (", ".join(w.get("jobs") or []) or "-") + state))
    return fitted_table("workers", WORKER_COLUMNS, rows, width, WORKER_IMPORTANCE, least={"jobs": 12})


def stream_all(lab: Lab, state: Optional[str], as_json: bool) -> None:
    """`tlm status --all`: the live jobs and the workers at once, then every finished job kept,
    newest first, a page at a time as it is read (the first page costs what one page costs,
    however long the history)."""
    registry = lab.registry
    workers, now = registry.workers(), registry.now()
    live = sorted(registry.in_states(LIVE if state is None else [state]), key=lambda j: j.created) \
        if state in (None, *LIVE) else []
    pages = registry.finished_pages(state) if state not in LIVE else iter(())
    waiting = lab.waiting(live, workers)
    if as_json:
        click.echo('{"jobs": [', nl=False)
        first = True
        for jobs in itertools.chain([live], pages):
            for j in jobs:
                record = {**j.to_record(), **({"waiting": waiting[j.id]} if j.id in waiting else {})}
                click.echo(("" if first else ", ") + json.dumps(record), nl=False)
                first = False
        click.echo(f'], "workers": {json.dumps(workers)}}}')
        return
    console = table_console()
    console.print(status_table(live, workers, waiting, now, console.width))
    for n, jobs in enumerate(pages):  # finished: none waits
        console.print(jobs_table(jobs, {}, now, console.width, "finished, newest first" if n == 0 else None))


@click.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", is_flag=True, help="redraw as jobs change")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(0),
              help="finished jobs to list after the live ones (newest)")
@click.option("--all", "show_all", is_flag=True, help="every finished job still kept")
@click.option("--state", type=click.Choice(LIVE + FINAL), default=None, help="only jobs in this state")
@click.option("--run", default=None, help="only this run's jobs (a run name)")
@click.option("--save_dir", "--save-dir", default=None, help="only this run directory's jobs")
@queue_option
@queue_errors
def status(job_id, as_json, watch, limit, show_all, state, run, save_dir, queue) -> None:
    """List live jobs, the latest finished ones and the workers; or show one job in full."""
    lab = Lab.connect(queue)
    registry = lab.registry
    if job_id:
        job = registry.get(job_id)
        why = lab.waiting([job]).get(job.id)
        if as_json:
            click.echo(json.dumps({**job.to_record(), **({"waiting": why} if why else {})}, sort_keys=True))
            return
        for line in job_lines(job, why, registry.now()) + chain_lines(lab, job):
            click.echo(line)
        return
    run_key = Lab.run_target(run, save_dir)[1] if run or save_dir else None
    if show_all and not watch and run_key is None:
        stream_all(lab, state, as_json)
        return

    def listing() -> tuple[list[Job], list[dict], dict[str, str], float]:
        jobs = registry.jobs(None if show_all else limit, state=state, run=run_key)
        for bad in registry.skipped.values():
            echo(f"skipped {bad}")
        registry.skipped.clear()
        workers = registry.workers()
        return jobs, workers, lab.waiting(jobs, workers), registry.now()
    if as_json:
        jobs, workers, waiting, _ = listing()
        click.echo(json.dumps({"jobs": [{**j.to_record(), **({"waiting": waiting[j.id]} if j.id in waiting
                                                              else {})} for j in jobs],
                               "workers": workers}))
        return
    console = table_console()
    if not watch:
        console.print(status_table(*listing(), console.width))
        return
    watch_table(console, registry.changes, lambda: status_table(*listing(), console.width), lambda: False)


def chain_lines(lab: Lab, job: Job) -> list[str]:
    """What a job waits (or waited) for and what waits on it, one line each."""
    lines, registry = [], lab.registry
    for parent in registry.find([job.after] if job.after else []):
        waits = "waits for" if job.state == "waiting" else "waited for"
        lines.append(f"{waits}: {parent.kind} job {parent.id} ({parent.state})")
    lines += [f"waiting on it: {f.kind} job {f.id} ({f.state})" for f in registry.find(job.followers)]
    return lines


def job_lines(job: Job, waiting: Optional[str], now: float) -> list[str]:
    """One job, readable: what, where, when, how far, how it ended (`--json`: the record)."""
    def when(t: Optional[float]) -> Optional[str]:
        if not t:
            return None
        shown = datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
        return f"{shown} ({_age(t, now)} ago)"
    tries = f"{job.attempts} attempt(s) (crashes count against --max_attempts)"
    if job.interruptions:
        tries += f", {job.interruptions} interruption(s) (a worker stopped or paused: not counted)"
    result = job.result or {}
    fields = [("state", job.state + (f" ({waiting})" if waiting else "")),
              ("worker", job.holder if job.state in ("running", "cancelling") or job.members else None),
              ("tries", tries if job.attempts or job.interruptions else None),
              ("priority", next((k for k, v in PRIORITIES.items() if v == job.priority), str(job.priority))),
              ("needs", describe_needs(job.needs).removeprefix("needs ") if job.needs else None),
              ("created", when(job.created)), ("started", when(job.started)), ("finished", when(job.finished)),
              ("progress", _progress(job) or None), ("checkpoint", job.checkpoint),
              ("result", ", ".join(f"{k} {_short(v)}" for k, v in result.items()
                                   if v is not None and not isinstance(v, (dict, list))) or None),
              ("error", job.error),
              ("flags", " ".join(f"--{k}" if v is True else f"--{k} {_short(v)}"
                                 for k, v in sorted(job.params.items())
                                 if not isinstance(v, (dict, list)) and v is not None and v is not False) or None)]
    return [f"{job.kind} job {job.id} of {run_label(job.run)}"] + [
        f"  {name:<10} {value}" for name, value in fields if value is not None]


def run_label(key: str) -> str:
    """A run as a user would type it: its name, or its folder relative to here or to ~."""
    kind, _, name = key.partition(":")
    if kind != "dir":
        return name
    path = Path(name)
    for base, shown in ((Path.cwd(), ""), (Path.home(), "~/")):
        if path.is_relative_to(base) and path != base:
            return shown + str(path.relative_to(base))
    return name


def _short(value: Any) -> str:
    """A number as a reader wants it (4 significant digits), anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@click.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="keep printing new lines until the job ends")
@queue_option
@queue_errors
def logs(job_id, follow, queue) -> None:
    """Print a job's log lines, from whichever worker runs it."""
    registry = Lab.connect(queue).registry
    job_id = registry.get(job_id).id
    cursor = None
    with registry.changes() as wait:
        while True:
            done = registry.get(job_id).state in FINAL  # before reading: no last line missed
            lines, cursor = registry.logs(job_id, cursor)
            for line in lines:
                click.echo(line)
            if not follow or done:
                return
            wait(1.0)


@click.command()
@click.argument("job_id")
@click.option("--force", is_flag=True, help="stop now instead of after a save")
@queue_option
@queue_errors
def cancel(job_id, force, queue) -> None:
    """Cancel a job: it finishes its step, saves, and can be resumed by submitting again."""
    lab = Lab.connect(queue)
    job = lab.registry.get(job_id)
    waiting = [f.id for f in lab.registry.find(job.followers) if f.state == "waiting"]
    step = job.progress.get("step")
    final = job.spec.trainer and not job.spec.driven and step and step >= job.progress.get("total", 0)
    job, ended = lab.cancel(job.id, force)
    if ended:
        echo(f"job {job.id} removed from the queue")
    elif force:
        echo(f"job {job.id}: stopping now")
    elif final:  # trained to its end already: what is left is its final evaluation
        echo(f"job {job.id} has finished training and is in its final evaluation: it ends "
             "succeeded with its last checkpoint (--force stops it now)")
    elif not job.spec.trainer:  # a sample, eval or export has nothing to save: it stops now
        echo(f"job {job.id}: stopping")
    else:  # the job's own process marks it cancelling when it sees the flag
        echo(f"job {job.id}: finishing its step and saving, then cancelled")
    if waiting:
        echo(f"cancelled what waited on it: {', '.join(waiting)}")


@click.command()
@click.option("--older_than", "--older-than", default=None, type=FiniteRange(0),
              help="days since a job finished (default: the retention, 30 or TLM_KEEP_DAYS)")
@click.option("--keep_runs", "--keep-runs", is_flag=True,
              help="keep listing in `tlm runs` the runs whose jobs are all deleted (as the retention does)")
@queue_option
@queue_errors
def prune(older_than, keep_runs, queue) -> None:
    """Delete finished jobs and their logs now, and what `tlm runs` kept of the runs no job is
    left of (checkpoints and metrics files are untouched)."""
    n = Lab.connect(queue).registry.prune(older_than, keep_runs)
    echo(f"deleted {n} finished job(s)" + ("" if keep_runs or not n else
                                         "; runs with no job left are listed from their folders only "
                                         "(tlm runs --save_root; --keep_runs keeps them)"))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--csv", "as_csv", is_flag=True, help="CSV, one row per run")
@click.option("--dataset", default=None, help="only runs of this dataset")
@click.option("--sort", "sort_by", default="best_valid", show_default=True,
              type=click.Choice([c for c in RUN_COLUMNS if c != "run"] + ["run"]),
              help="the column to sort by (best first for losses)")
@click.option("--save_root", "--save-root", envvar="TLM_SAVE_ROOT", default=None,
              help="also list the runs under this directory (env TLM_SAVE_ROOT)")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1),
              help="the best runs to list (by validation loss)")
@click.option("--all", "show_all", is_flag=True, help="every run (what --json, --csv, --dataset and --sort read)")
@queue_option
@queue_errors
def runs(as_json, as_csv, dataset, sort_by, save_root, limit, show_all, queue) -> None:
    """The runs the registry knows and the runs under the save root, best first: shape, key
    flags, best validation loss and its step, test loss, steps, minutes, tokens/s, state."""
    everything = show_all or as_json or as_csv or dataset is not None or sort_by != "best_valid"
    rows, more = Lab.connect(queue, save_root).runs(limit=None if everything else limit)
    rows = [r for r in rows if dataset in (None, r["dataset"])]
    numeric = sort_by not in ("run", "dataset", "optimizer", "state")
    rows.sort(key=lambda r: (r[sort_by] is None, r[sort_by] if r[sort_by] is not None else 0)
              if numeric else str(r[sort_by]))
    if sort_by in ("steps", "tokens_per_sec", "minutes", "jobs"):
        rows.reverse()
    if as_json:
        click.echo(json.dumps(rows))
        return
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(RUN_COLUMNS)
        writer.writerows([[r[c] for c in RUN_COLUMNS] for r in rows])
        click.echo(out.getvalue(), nl=False)
        return
    title = f"runs ({len(rows)})" if more is None else f"runs: the best {len(rows)} (--all for every one)"

    def cell(column: str, v: Any) -> str:
        if v is None:
            return "-"
        if column == "tokens_per_sec":
            return f"{v:,.0f}"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    console = table_console(220)
    headers = [c.replace("_", " ") for c in RUN_COLUMNS]
    console.print(fitted_table(
        title, headers, [[run_label(r["key"]) if c == "run" else cell(c, r[c]) for c in RUN_COLUMNS] for r in rows],
        console.width, [c.replace("_", " ") for c in RUN_IMPORTANCE], least={"run": 16},
        right=[h for h in headers if h not in ("run", "dataset", "optimizer", "state")]))
