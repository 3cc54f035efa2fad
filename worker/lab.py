"""The lab's one application service: what the `tlm` commands and the dashboard ask of the lab.

Both front ends are thin: they import this module (and the kinds table, to display jobs)
and nothing else of the worker's. They turn a request into a call here, and a ``LabError``
(``answering`` makes one of a missing job or a queue that does not answer) into a one-line
error or an HTTP status (its ``status``). So the same request gets the same checks
and the same answer from either: a training job's flags are checked as `tlm train` checks
them, a run this machine sees is opened (flags that contradict its checkpoint, a spent
budget), a job's memory need is estimated from the configuration it will really train (the
run's own on a resume), and a second trainer of a run is refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import redis

from tlm.config import ConfigError, TrainConfig
from tlm.memory import estimate
from tlm_worker import runs, sweeps
from tlm_worker.kinds import FINAL, PRIORITIES, RUNNING, TRAIN, BadRecord, Job, TrainParams
from tlm_worker.placement import parse_needs, waiting_reasons
from tlm_worker.queue import QUEUE_ERRORS, Queue, QueueError, outage, queue_url, redact
from tlm_worker.registry import JobNotFound, Registry, RunBusy
from tlm_worker.targets import TargetError, data_folder, resolve_save_dir, run_target, target_of

RUN_COLUMNS = runs.COLUMNS  # the runs table's columns, in the order front ends show them
__all__ = ["Conflict", "Invalid", "Lab", "LabError", "Missing", "Placement", "RUN_COLUMNS", "Unreachable",
           "answering", "data_folder", "run_dir", "training_job"]


class LabError(Exception):
    """A request the lab refuses; the message is one line, ``status`` its HTTP status."""
    status = 400


class Invalid(LabError):
    """Bad input: flags, names, values."""


class Conflict(LabError):
    """Refused by the lab's state: a run that has a trainer, a job that already ended."""
    status = 409


class Missing(LabError):
    status = 404


class Unreachable(LabError):
    """The queue does not answer (down, or its SQLite file kept busy) or refuses what tlm asks."""
    status = 503


@contextlib.contextmanager
def answering(url: Optional[str] = None) -> Iterator[None]:
    """A front end's calls, with every failure it may meet as a one-line LabError: a job id
    that names no job, a queue that does not answer or that refuses tlm's commands."""
    try:
        yield
    except JobNotFound as e:
        raise Missing(str(e)) from None
    except QueueError as e:
        raise Unreachable(str(e)) from None
    except QUEUE_ERRORS as e:
        raise Unreachable(f"cannot reach the queue at {redact(queue_url(url))}: {outage(e)}") from None
    except redis.exceptions.ResponseError as e:  # an ACL user without the rights tlm needs
        raise Unreachable(f"the queue at {redact(queue_url(url))} refused: {str(e).splitlines()[0]} "
                          "(tlm's Redis user needs read, write, WATCH and MULTI on the lab's keys)") from None


def run_dir(target: dict[str, str], save_root: Optional[str]) -> Path:
    """Where a run (its job params ``target``) is on this machine: a name under ``save_root``."""
    return Path(resolve_save_dir(target, save_root))


@dataclass(frozen=True)
class Placement:
    """A queued job's priority, parent and needs."""
    priority: int = 0
    after: Optional[str] = None
    needs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, priority: str = "normal", after: Optional[str] = None, needs: tuple[str, ...] = (),
           on: tuple[str, ...] = (), gpu: bool = False) -> "Placement":
        """From the placement options (``--priority``, ``--after``, ``--needs``, ``--on``)."""
        if priority not in PRIORITIES:
            raise Invalid(f"unknown priority {priority!r} (choose from {', '.join(PRIORITIES)})")
        if after is not None and not after.strip():
            raise Invalid("--after is empty: give the id of the job to wait for")
        try:
            return cls(PRIORITIES[priority], after, parse_needs(needs, on, gpu))
        except ValueError as e:
            raise Invalid(str(e)) from None


def _busy(e: RunBusy) -> Conflict:
    return Conflict(f"{e}: `tlm cancel {e.job.id}` first")


def training_job(given: dict[str, Any], target: dict[str, str]):
    """A training job's validated configuration and the params to queue (ConfigError if bad);
    the data mirror this machine uses travels with the job."""
    config = TrainConfig(**TrainParams.flags(given), save_dir=target.get("save_dir", "/unused"))
    config.validate()
    params = {**given, **target}
    if config.data_mirror and "data_mirror" not in given:
        params["data_mirror"] = config.data_mirror
    return config, params


class Lab:
    """Submit, cancel, retry and resume jobs of one registry; ``save_root``: where this
    machine sees runs named by ``--run`` (to check them as `tlm train` would)."""

    def __init__(self, registry: Registry, save_root: Optional[str] = None, url: Optional[str] = None):
        self.registry, self.save_root, self.url = registry, save_root, url

    @classmethod
    def connect(cls, url: Optional[str] = None, save_root: Optional[str] = None,
                patient: bool = True) -> "Lab":
        """The lab of the queue at ``url`` (TLM_QUEUE, or the embedded SQLite file), once it
        answers; Unreachable otherwise. ``patient``: wait out a busy SQLite file (a command)."""
        with answering(url):
            queue = Queue(url, patient=patient)
            queue.ping()
        return cls(Registry(queue), save_root, url)

    # -- runs ------------------------------------------------------------------------------

    @staticmethod
    def target(key: str) -> dict[str, str]:
        """A run key's job params (Invalid for a key that names no run)."""
        try:
            return target_of(key)
        except TargetError as e:
            raise Invalid(str(e)) from None

    @staticmethod
    def run_target(run: Optional[str], save_dir: Optional[str]) -> tuple[dict[str, str], str]:
        """The job params and the key of a run named by ``--run`` or ``--save_dir`` (Invalid if bad)."""
        try:
            return run_target(run, save_dir)
        except TargetError as e:
            raise Invalid(str(e)) from None

    def run_dir(self, key: str) -> Path:
        """Where the run is on this machine (under its save root for a run by name)."""
        return run_dir(self.target(key), self.save_root)

    def visible_dir(self, key: str) -> Optional[Path]:
        """The run's directory if this machine sees it."""
        path = self.run_dir(key)
        return path if path.is_dir() else None

    def runs(self, limit: Optional[int] = None, cursor: Any = None,
             disk: bool = True) -> tuple[list[dict[str, Any]], Any]:
        """A page of the runs table, best first, and the next page's cursor (``runs.runs_table``)."""
        return runs.runs_table(self.registry, self.save_root, disk=disk, limit=limit, cursor=cursor)

    def waiting(self, jobs: list[Job], workers: Optional[list[dict[str, Any]]] = None) -> dict[str, str]:
        """Why each claimable job that no live worker can run waits, by job id."""
        return waiting_reasons(jobs, self.registry.workers() if workers is None else workers)

    # -- submitting ------------------------------------------------------------------------

    def train(self, key: str, flags: dict[str, Any], place: Placement = Placement(),
              carried: Optional[dict[str, str]] = None) -> Job:
        """Queue a training job of a run (resuming its checkpoints, as `tlm train` does).
        ``carried``: the params naming a --dataset that the submitting machine copied into
        the run (they replace the local path its flags were checked with)."""
        from tlm.run import open_run  # MLX

        target = self.target(key)
        try:
            config, params = training_job(flags, target)
            seen = self.visible_dir(key)
            if seen is not None:  # flags that contradict its checkpoint, a spent budget
                config = open_run({**flags, "save_dir": str(seen)}, refuse_spent=True)[0]
            else:
                config = self._resumed_elsewhere(key, flags) or config
        except (ConfigError, TypeError) as e:
            raise Invalid(str(e)) from None
        needs = {**place.needs, **({"gpu": True} if config.gpu else {})}
        needs["memory"] = max(needs.get("memory", 0), estimate(config.to_dict()))
        return self.queue(TRAIN, {**params, **(carried or {})}, key, dataclasses.replace(place, needs=needs))

    def _resumed_elsewhere(self, key: str, flags: dict[str, Any]):
        """The configuration a resume of a run this machine does not see will train: its last
        training job's (as its worker recorded it) under the flags given now; None if new."""
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        earlier = [j for j in self.registry.jobs(None, run=key) if j.spec.trainer and j.progress.get("config")]
        if not earlier or flags.get("new_model"):
            return None
        config = {k: v for k, v in earlier[-1].progress["config"].items() if k in known}
        return TrainConfig(**{**config, **flags, "save_dir": "/unused"})

    def read(self, kind: str, key: str, params: dict[str, Any], place: Placement = Placement()) -> Job:
        """Queue a job that reads a run's checkpoint (eval, sample, export): a directory named
        by path must exist here, unless a chain makes it first."""
        target = self.target(key)
        if "save_dir" in target and not place.after and not Path(target["save_dir"]).is_dir():
            raise Invalid(f"no run directory {target['save_dir']}: train one first")
        return self.queue(kind, {**target, **params}, key, place)

    def queue(self, kind: str, params: dict[str, Any], key: str, place: Placement = Placement()) -> Job:
        try:
            return self.registry.create(kind, params, key, priority=place.priority, needs=place.needs,
                                        after=place.after)
        except RunBusy as e:
            raise _busy(e) from None
        except BadRecord as e:
            raise Invalid(e.reason) from None

    def resume(self, key: str) -> Job:
        """Train a run again with its last training job's flags."""
        trains = [j for j in self.registry.jobs(None, run=key) if j.spec.trainer]
        if not trains:
            raise Missing(f"no training job of {key.split(':', 1)[-1]} to resume")
        return self.train(key, TrainParams.again(trains[-1].params))

    # -- changing jobs ---------------------------------------------------------------------

    def cancel(self, job_id: str, force: bool = False) -> tuple[Job, bool]:
        """Cancel a job: (the job, whether it ended at once); Conflict if it already ended."""
        job = self.registry.get(job_id)
        if job.state in FINAL:
            raise Conflict(f"job {job.id} already {job.state}")
        return job, self.registry.cancel(job.id, force)

    def retry(self, job_id: str) -> Job:
        """A new job doing what an ended one did."""
        try:
            return self.registry.retry(job_id)
        except RunBusy as e:
            raise _busy(e) from None
        except ValueError as e:
            raise Conflict(str(e)) from None

    # -- sweeps ----------------------------------------------------------------------------

    def submit_sweep(self, given: dict[str, Any], fixed: dict[str, Any]) -> Job:
        """Queue a sweep from its options (or a file's keys) and its fixed flags (strings or
        values); Invalid for a spec that cannot run, Conflict if its name is taken."""
        try:
            spec = sweeps.spec_of(given, fixed)
        except sweeps.SpecError as e:
            raise Invalid(str(e)) from None
        try:
            return sweeps.submit(self.registry, spec)
        except sweeps.SpecError as e:
            raise Conflict(str(e)) from None

    def trials(self, job: Job) -> list[dict[str, Any]]:
        """A sweep's leaderboard: every trial, best first (``sweeps.leaderboard``)."""
        return sweeps.leaderboard(self.registry, job)

    def importances(self, job: Job) -> dict[str, float]:
        """Optuna's importance of each searched flag, once two trials are complete (else none)."""
        return sweeps.importances(self.registry, job)

    def sweep(self, ref: str) -> Job:
        """A sweep by name (its latest) or by id; Missing if there is none."""
        named = self.registry.jobs(None, run=sweeps.sweep_key(ref)) if ref.strip() else []
        if named:
            return named[-1]
        try:
            job = self.registry.get(ref)
        except JobNotFound:
            raise Missing(f"no sweep {ref!r}: `tlm status` lists them") from None
        if not job.spec.driven:
            raise Missing(f"{ref} is a {job.kind} job, not a sweep")
        return job

    def cancel_sweep(self, job: Job) -> None:
        """No new trials; running ones save and end cancelled. Conflict if it already ended."""
        if job.state in FINAL:
            raise Conflict(f"sweep {job.params['name']} already {job.state}")
        self.registry.cancel(job.id)
        sweeps.reconcile(self.registry, job.id)

    def add_trials(self, job: Job, more: int) -> int:
        """``more`` trials for a sweep that still runs; its new number of trials."""
        if not 1 <= more <= sweeps.MAX_TRIALS:
            raise Invalid(f"add 1 to {sweeps.MAX_TRIALS} trials")
        if job.params.get("schedule") == "pbt":
            raise Conflict(f"sweep {job.params['name']} trains a fixed population (--schedule pbt): "
                           "submit another sweep to search more")
        added = self.registry.change(job.id, lambda j: {"params": {**j.params, "trials": j.params["trials"] + more}}
                                     if j.state == RUNNING and not j.cancel
                                     and j.params["trials"] + more <= sweeps.MAX_TRIALS else None)
        if added is None:
            now = self.registry.get(job.id)
            why = "has too many" if now.params["trials"] + more > sweeps.MAX_TRIALS \
                else "is being cancelled" if now.state == RUNNING else f"is {now.state}"
            raise Conflict(f"sweep {job.params['name']} {why}: trials are added while it runs, "
                           f"up to {sweeps.MAX_TRIALS}")
        sweeps.reconcile(self.registry, job.id)
        return added.params["trials"]

    def train_on(self, job: Job, more: str) -> Job:
        """Queue the sweep's best trial's own run to train ``more`` (minutes or steps) from its
        checkpoint: the winner goes on where it stands, not from scratch. Conflict while the
        trial still runs or is paused (the run has its trainer)."""
        row = self.best(job)[0]
        return self.train(f"run:{row['run']}", {"more": more})

    def best(self, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the best trial's leaderboard row, its full training flags); Conflict before any
        trial was evaluated."""
        rows = [r for r in self.trials(job) if r["best"] is not None]
        if not rows:
            raise Conflict(f"sweep {job.params['name']}: no trial has been evaluated yet")
        return rows[0], sweeps.SweepSpec.from_dict(job.params).trial_flags(rows[0]["params"])
