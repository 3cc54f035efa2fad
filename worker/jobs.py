"""What runs one job: the entry point of the process tlm-worker spawns per job.

Runs in a child started with multiprocessing's ``spawn`` method (MLX hangs in
forked children), in its own process group so a terminal's Ctrl+C reaches
only the worker, which forwards exactly one signal. The trainer's callbacks
are wired to the registry: ``should_stop`` to the job's cancel flag and this
process's signals, ``on_progress`` to progress and log lines,
``before_publish`` to the fencing token.

A gang job runs one such process per member, each a rank of MLX's
distributed engine, rendezvousing at the members' advertised addresses. Rank
0 reports and settles the job; the others only train, and a failure of
theirs that is not the job's own (a peer lost mid-collective) exits non-zero
so their worker re-queues the gang.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from tlm_worker.queue import Queue
from tlm_worker.registry import CANCELLED, FAILED, SUCCEEDED, LeaseLost, Registry

EXIT_INTERRUPTED = 75  # stopped by a signal to the worker: re-queue the job
CANCEL_POLL_SECONDS = 1.0


def resolve_save_dir(params: dict[str, Any], save_root: Optional[str]) -> str:
    """A run name is relative to this worker's save root (shares mount at different paths)."""
    if params.get("run"):
        from tlm.config import default_save_dir
        root = Path(save_root) if save_root else Path(default_save_dir()).parent / "runs"
        return str(root / params["run"])
    return params["save_dir"]


def check_carried_dataset(params: dict[str, Any], save_dir: str) -> None:
    """The text ``tlm submit`` copied into the run is there, with the bytes it had then."""
    if not params.get("dataset_sha1"):
        return
    from tlm.data import DataError
    from tlm.files import text_digest

    path = Path(save_dir) / params["dataset"]
    if not path.exists():
        raise DataError(f"{path} is missing: is the shared run directory mounted here "
                        "(tlm-worker --save_root)?")
    if text_digest(path) != params["dataset_sha1"]:
        raise DataError(f"{path} changed since it was submitted (SHA1 differs)")


def run_job(url: str, job_id: str, fence: int, save_root: Optional[str], gpu: bool,
            rank: Optional[int] = None) -> None:
    """Run one claimed job (or ``rank`` of a gang job) to an end state, or exit
    EXIT_INTERRUPTED after a signal."""
    os.setpgid(0, 0)
    parent = os.getppid()
    registry = Registry(Queue(url))
    job = registry.get(job_id)
    tag = f"[{job_id}]" if not rank else f"[{job_id} rank {rank}]"

    def log(line: str) -> None:  # the job's log is rank 0's
        print(f"{tag} {line}", file=sys.stderr, flush=True)
        if not rank:
            registry.log(job_id, line)

    try:
        import tlm  # noqa: F401  (optimized BLAS before MLX)
        from tlm import blas
        from tlm.interrupts import StopOnSignal

        if job["kind"] == "train":
            log(blas.describe())

        stop = StopOnSignal()  # no I/O in the handler: should_stop logs it
        orphaned = lambda: os.getppid() != parent  # noqa: E731
        from tlm.train import select_device

        select_device(gpu)
        params = {k: v for k, v in job["params"].items()
                  if k not in ("run", "save_dir", "dataset_sha1")}
        save_dir = resolve_save_dir(job["params"], save_root)
        check_carried_dataset(job["params"], save_dir)
        if job["kind"] == "train":
            if job["checkpoint"]:  # started before and saved: resume that, not afresh again
                params.pop("new_model", None)
            if rank is not None:
                from tlm.config import TrainConfig
                from tlm.ranks import rank_env
                os.environ.update(rank_env(params.get("backend", TrainConfig.backend), job["members"],
                                           rank, Path(tempfile.mkdtemp(prefix=f"tlm-{job_id}-"))))
            _train(registry, job, fence, {**params, "save_dir": save_dir, "gpu": gpu}, stop,
                   orphaned, log, rank or 0)
        elif job["kind"] == "eval":
            from tlm.train import evaluate_checkpoint
            result = evaluate_checkpoint(save_dir, params.get("identifier"),
                                         params.get("split", "valid"), params.get("data_mirror"),
                                         params.get("tokens", 0), params.get("stride"), log)
            log(f"{result['split']} loss {result['loss']:.4f}")
            registry.finish(job_id, SUCCEEDED, fence, result=result)
        elif job["kind"] == "sample":
            from tlm.generate import SampleConfig, sample_checkpoint
            result = sample_checkpoint(save_dir, params.get("identifier"), params["prompt"],
                                       SampleConfig(**params["sampling"]),
                                       params.get("num_samples", 1), warn=log)
            registry.finish(job_id, SUCCEEDED, fence, result=result)
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}")
    except SystemExit:
        raise
    except LeaseLost as e:  # another worker owns the job now: leave its record alone
        print(f"[{job_id}] {e}", file=sys.stderr, flush=True)
    except BaseException as e:
        if not _ordinary(e):
            traceback.print_exc()  # a bug, or a lost peer: its traceback goes to the worker's output
            if rank is not None:  # the worker re-queues the gang (a crash: attempts count)
                sys.exit(1)
        registry.finish(job_id, FAILED, fence, error=f"{type(e).__name__}: {e}".splitlines()[0])
        print(f"{tag} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        registry.log(job_id, (f"rank {rank} " if rank else "") + f"failed: {type(e).__name__}: {e}")


def _ordinary(e: BaseException) -> bool:
    """A failure the job's own message explains (bad flags, data, checkpoints, divergence)."""
    from tlm.checkpoint import CheckpointError
    from tlm.config import ConfigError
    from tlm.data import DataError
    from tlm.train import Diverged
    return isinstance(e, (ConfigError, DataError, CheckpointError, Diverged))


def _train(registry: Registry, job: dict[str, Any], fence: int, given: dict[str, Any], stop, orphaned,
           log, rank: int) -> None:
    from tlm.train import Progress, train

    job_id = job["id"]
    cancelled = stopping = False
    last_poll = 0.0

    def should_stop() -> bool:
        nonlocal cancelled, stopping, last_poll
        if stop():
            if not stopping:
                stopping = True
                log("worker is stopping: finishing the step and saving")
            return True
        if time.monotonic() - last_poll >= CANCEL_POLL_SECONDS:
            last_poll = time.monotonic()
            if orphaned():  # the worker died: its lease will expire and another worker resume
                os._exit(EXIT_INTERRUPTED)
            # "force" is the worker's to act on: it kills this process.
            if not cancelled and registry.get(job_id)["cancel"] == "stop":
                cancelled = True
                if not rank:
                    registry.mark_cancelling(job_id, fence)
                log("cancel requested: finishing the step and saving")
        return cancelled

    started = time.time()
    progress = job["progress"]  # this process is its only writer while it holds the job

    def on_progress(p: Progress) -> None:
        line = p.describe()
        if line:
            log(line)
        if p.kind in ("report", "eval", "save") and not rank:
            progress.update({k: v for k, v in p.to_dict().items()
                             if v is not None and k not in ("kind", "message", "bits_per_char",
                                                            "checkpoint")})
            if p.kind == "eval" and p.val_loss is not None and p.message != "test":
                progress["val_metric"] = p.val_metric
                progress["val_metric_name"] = "bpc" if p.bits_per_char else "ppl"
            done = p.step - progress.setdefault("first_step", p.step)
            if done > 0:
                progress["eta_seconds"] = (time.time() - started) / done * (p.total - p.step)
            fields = {"progress": progress}
            if p.checkpoint:
                fields["checkpoint"] = p.checkpoint
                registry.add_point(job_id, {"time": time.time(), "kind": "checkpoint", "step": p.step,
                                            "identifier": p.checkpoint, "loss": p.val_loss})
            registry.update(job_id, **fields)

    result = train(given, on_progress, should_stop, log,
                   before_publish=lambda: registry.check_fence(job_id, fence),
                   labels={"job": job_id, "worker": job["worker"]},
                   on_record=lambda rec: registry.add_point(job_id, rec))
    if result.stopped and not cancelled:  # a gang stops together: a peer may have seen the cancel
        cancelled = registry.get(job_id)["cancel"] == "stop"
    if result.stopped and not cancelled:
        sys.exit(EXIT_INTERRUPTED)
    if rank:
        return  # rank 0 settles the job
    state = CANCELLED if result.stopped else SUCCEEDED
    registry.finish(job_id, state, fence, checkpoint=result.checkpoint,
                    result={"step": result.step, "val_loss": result.val_loss,
                            "test_loss": result.test_loss})
    log(f"{state} at iteration {result.step}, checkpoint {result.checkpoint}")
