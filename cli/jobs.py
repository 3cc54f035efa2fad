"""Queue commands: ``tlm submit``, ``status``, ``logs``, ``cancel``, ``prune``.

Each is a thin translation into registry and queue calls; the job id goes
alone to stdout so scripts can capture it, messages go to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tlm.config import ConfigError, TrainConfig
from tlm_cli.options import FiniteRange, given_options, train_options
from tlm_worker.queue import QUEUE_ERRORS, Queue, QueueError, queue_url, redact
from tlm_worker.registry import (CANCELLED, FINAL, LIVE, SUCCEEDED, JobNotFound, Registry,
                                 RunBusy, holder)

queue_option = click.option("--queue", envvar="TLM_QUEUE", default=None,
                            help="redis://[:password@]host:port/db (env TLM_QUEUE); "
                                 "default: embedded SQLite in the per-user data dir")


def echo(message: str) -> None:
    click.echo(message, err=True)


def connect(url: Optional[str]) -> Registry:
    try:
        queue = Queue(url)
        queue.ping()
    except QueueError as e:
        raise click.ClickException(str(e)) from None
    return Registry(queue)


def queue_errors(fn: Callable) -> Callable:
    """Turn an unreachable queue or an unknown job id into a one-line error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JobNotFound as e:
            raise click.ClickException(str(e)) from None
        except QUEUE_ERRORS as e:
            url = redact(queue_url(kwargs.get("queue")))
            raise click.ClickException(f"cannot reach the queue at {url}: {e}") from None
    return wrapper


@click.group()
def submit() -> None:
    """Queue a job for tlm-worker."""


def _run_target(run: Optional[str], save_dir: Optional[str]) -> tuple[dict[str, Any], str]:
    """Job params that locate the run, and the key that identifies it across machines."""
    if run is not None and save_dir is not None:
        raise click.UsageError("give --run or --save_dir, not both")
    if "" in (run, save_dir) or (run is not None and not run.strip()):
        raise click.UsageError(f"--{'run' if run is not None else 'save_dir'} is empty")
    if run:
        if "/" in run or run.startswith("."):
            raise click.UsageError(f"--run {run!r}: a plain name, resolved under each worker's --save_root")
        return {"run": run}, f"run:{run}"
    from tlm.config import default_save_dir
    path = str(Path(save_dir or default_save_dir()).expanduser().resolve())
    return {"save_dir": path}, f"dir:{path}"


def carry_dataset(dataset: str, run_dir: Path) -> dict[str, str]:
    """Copy the user's own text into the run directory, named by its SHA1, so every worker
    on every Mac trains on the same bytes; the job params that name the copy."""
    from tlm.config import RUN_INPUTS
    from tlm.files import text_digest

    source = Path(dataset).expanduser().resolve()
    digest = text_digest(source)
    name = f"{source.stem}-{digest[:10]}{source.suffix}" if source.is_file() else f"{source.name}-{digest[:10]}"
    dest = run_dir / RUN_INPUTS / name
    try:
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{name}.{os.getpid()}.part")
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, part)
            os.replace(part, dest)
    except OSError as e:
        raise click.ClickException(f"cannot copy --dataset {dataset} into {dest.parent} (workers "
                                   f"read it from the run directory): {e.strerror or e}") from None
    return {"dataset": f"{RUN_INPUTS}/{name}", "dataset_sha1": digest}


@submit.command("train")
@train_options
@click.option("--run", default=None, help="run name, under each worker's --save_root")
@click.option("--save_root", "--save-root", envvar="TLM_SAVE_ROOT", default=None,
              help="where this machine mounts the shared runs directory (with --run: a --dataset "
                   "file is copied into the run there)")
@click.option("--wait", is_flag=True, help="follow the job to its end")
@queue_option
@queue_errors
def submit_train(run, save_root, wait, queue, **options) -> None:
    """Queue a training job (resumes the run's latest checkpoint, as tlm train does).

    With --nodes N it is a gang job: it starts when N workers can each run one rank
    of it, and trains one model across them.

    A --dataset file or folder is copied into the run directory first, so workers
    on other machines (or in other directories) train on the same bytes.
    """
    given = given_options(options)
    target, run_key = _run_target(run, given.pop("save_dir", None))
    try:
        config, params = training_job(given, target)
        if "save_dir" in target and Path(target["save_dir"]).is_dir():
            from tlm.train import open_run  # catches flags that contradict its checkpoint now
            open_run({**given, **target})
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    registry = connect(queue)
    from tlm.data import is_text_path
    if is_text_path(config.dataset):
        from tlm_worker.jobs import resolve_save_dir
        params.update(carry_dataset(config.dataset, Path(resolve_save_dir(target, save_root))))
    _enqueue(registry, "train", params, run_key, wait)


def training_job(given: dict[str, Any], target: dict[str, str]) -> tuple[TrainConfig, dict[str, Any]]:
    """A training job's validated configuration and the params to queue (ConfigError if bad);
    the data mirror this machine uses travels with the job."""
    config = TrainConfig(**{k: v for k, v in given.items() if k != "dataset_sha1"},
                         save_dir=target.get("save_dir", "/unused"))
    config.validate()
    params = {**given, **target}
    if config.data_mirror and "data_mirror" not in given:
        params["data_mirror"] = config.data_mirror
    return config, params


@submit.command("eval")
@click.option("--run", default=None, help="run name, under each worker's --save_root")
@click.option("--save_dir", "--save-dir", default=None, help="run directory")
@click.option("--identifier", default=None, help="checkpoint SHA1 or prefix (default: latest)")
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--tokens", type=click.IntRange(0), default=0,
              help="evaluate the split's first N tokens only (default: all)")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="sliding-window evaluation: windows every N tokens, each scoring its last N")
@click.option("--wait", is_flag=True, help="follow the job to its end")
@queue_option
@queue_errors
def submit_eval(run, save_dir, identifier, split, tokens, stride, wait, queue) -> None:
    """Queue an evaluation of a checkpoint: loss and perplexity on a split."""
    target, run_key = _run_target(run, save_dir)
    if "save_dir" in target and not Path(target["save_dir"]).is_dir():
        raise click.UsageError(f"no run directory {target['save_dir']}: train one first")
    params = {**target, "identifier": identifier, "split": split, "tokens": tokens, "stride": stride,
              "data_mirror": os.environ.get("TLM_DATA_MIRROR")}
    _enqueue(connect(queue), "eval", params, run_key, wait)


def _enqueue(registry: Registry, kind: str, params: dict, run_key: str, wait: bool) -> None:
    try:
        job = registry.create(kind, params, run_key)
    except RunBusy as e:
        raise click.ClickException(f"{e}: `tlm cancel {e.job['id']}` first") from None
    click.echo(job["id"])
    echo(f"queued {kind} job {job['id']} for {run_key.split(':', 1)[1]}")
    if wait:
        raise SystemExit(follow(registry, job["id"]))


def follow(registry: Registry, job_id: str) -> int:
    """Print the job's log as it grows until it ends; Ctrl+C cancels (twice: forced).

    Exit status: 0 succeeded, 1 failed, 130 cancelled.
    """
    from tlm.interrupts import StopOnSignal

    def first(_):
        if registry.cancel(job_id):
            echo("\ncancelled before a worker took it")
        else:
            echo("\ncancelling: the job finishes its step and saves (Ctrl+C again to force)")

    def second_exit():
        registry.cancel(job_id, force=True)

    from tlm_cli.render import ProgressDisplay

    stop = StopOnSignal(on_first=first, on_second=second_exit)
    cursor = None
    job = registry.get(job_id)
    total = int(job["params"].get("num_iters", 0)) or 1
    try:
        with ProgressDisplay(total, click.get_text_stream("stderr")) as display, \
                registry.changes() as wait:
            while True:
                job = registry.get(job_id)
                lines, cursor = registry.logs(job_id, cursor)
                for line in lines:
                    display.line(line)
                p = job["progress"]
                if p.get("step"):
                    display.advance(p["step"], p["total"], p.get("train_loss"))
                if job["state"] in FINAL:
                    break
                wait(1.0)
    finally:
        stop.restore()
    echo(f"job {job_id} {job['state']}" + (f": {job['error']}" if job["error"] else ""))
    return {SUCCEEDED: 0, CANCELLED: 130}.get(job["state"], 1)


def _age(t: Optional[float]) -> str:
    if not t:
        return "-"
    s = time.time() - t
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _progress(job: dict) -> str:
    p = job.get("progress") or {}
    if not p.get("step"):
        return ""
    out = f"{p['step']}/{p['total']}"
    if p.get("train_loss") is not None:
        out += f" loss {p['train_loss']:.3f}"
    if p.get("val_metric") is not None:
        out += f" val {p['val_metric_name']} {p['val_metric']:.2f}"
    if p.get("tokens_per_sec"):
        out += f" {p['tokens_per_sec']:,.0f} tok/s"
    if p.get("eta_seconds") and job["state"] == "running":
        out += f" ETA {p['eta_seconds'] / 60:.0f}m"
    return out


def _tries(job: dict) -> str:
    """Attempts (crashes count), and interruptions after a +."""
    return str(job["attempts"]) + (f"+{job['interruptions']}" if job.get("interruptions") else "")


def status_table(jobs: list[dict], workers: list[dict]) -> Table:
    table = Table(title="jobs", title_justify="left")
    for col in ("id", "kind", "run", "state", "worker", "tries", "age", "progress", "error"):
        table.add_column(col)
    for job in jobs:
        table.add_row(job["id"], job["kind"], job["run"].split(":", 1)[1], job["state"],
                      holder(job), _tries(job), _age(job["created"]),
                      _progress(job), (job["error"] or "")[:60])
    workers_table = Table(title="workers", title_justify="left")
    for col in ("worker", "host", "pid", "device", "heartbeat", "jobs"):
        workers_table.add_column(col)
    for w in workers:
        workers_table.add_row(w["id"], w["host"], str(w["pid"]), w["device"], _age(w["heartbeat"]),
                              ", ".join(w["jobs"]) or "-")
    grid = Table.grid()
    grid.add_row(table)
    grid.add_row(workers_table)
    return grid


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
    registry = connect(queue)
    if job_id:
        click.echo(json.dumps(registry.get(job_id), indent=None if as_json else 2, sort_keys=True))
        return
    run_key = _run_target(run, save_dir)[1] if run or save_dir else None

    def listing() -> tuple[list[dict], list[dict]]:
        return (registry.jobs(None if show_all else limit, state=state, run=run_key),
                registry.workers())
    if as_json:
        jobs, workers = listing()
        click.echo(json.dumps({"jobs": jobs, "workers": workers}))
        return
    console = Console(width=None if Console().is_terminal else 200)
    if not watch:
        console.print(status_table(*listing()))
        return
    with Live(status_table(*listing()), console=console, refresh_per_second=1) as live, \
            registry.changes() as wait:
        try:
            while True:
                wait(2.0)
                live.update(status_table(*listing()))
        except KeyboardInterrupt:
            pass


@click.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="keep printing new lines until the job ends")
@queue_option
@queue_errors
def logs(job_id, follow, queue) -> None:
    """Print a job's log lines, from whichever worker runs it."""
    registry = connect(queue)
    job_id = registry.get(job_id)["id"]
    cursor = None
    with registry.changes() as wait:
        while True:
            done = registry.get(job_id)["state"] in FINAL  # before reading: no last line missed
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
    registry = connect(queue)
    job = registry.get(job_id)
    if job["state"] in FINAL:
        raise click.ClickException(f"job {job['id']} already {job['state']}")
    if registry.cancel(job["id"], force):
        echo(f"job {job['id']} removed from the queue")
    else:  # the job's own process marks it cancelling when it sees the flag
        echo(f"job {job['id']}: " + ("stopping now" if force else
                                     "finishing its step and saving, then cancelled"))


@click.command()
@click.option("--older_than", "--older-than", default=None, type=FiniteRange(0),
              help="days since a job finished (default: the retention, 30 or TLM_KEEP_DAYS)")
@queue_option
@queue_errors
def prune(older_than, queue) -> None:
    """Delete finished jobs and their logs now (checkpoints and metrics files are untouched)."""
    n = connect(queue).prune(older_than)
    echo(f"deleted {n} finished job(s)")
