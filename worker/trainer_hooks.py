"""The trainer's hooks in a worker's job process: progress, log lines and metric points go
to the registry; the job's cancel flag and the worker's signals stop the run after a save;
each checkpoint and metrics record is published only while this process holds the job's
fencing token. A sweep's trials extend them (``tlm_worker.sweeps.TrialHooks``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from tlm.config import invocation_flags
from tlm.hooks import Progress, TrainingHooks, TrainResult
from tlm_worker.queue import QUEUE_ERRORS
from tlm_worker.registry import CANCELLED, SUCCEEDED, JobNotFound, LeaseLost

if TYPE_CHECKING:
    from tlm_worker.jobs import Context

CANCEL_POLL_SECONDS = 1.0  # how often a training job looks at its record (cancel, fence)
# A job process that cannot confirm its hold on the job (the queue unreachable) for this
# fraction of the lease saves and stops; it publishes a checkpoint only within PUBLISH_LIMIT
# of the lease, since a sweep may re-queue the job once a whole lease has passed.
SELF_FENCE, PUBLISH_LIMIT = 0.25, 0.5


class RegistryHooks(TrainingHooks):
    """The worker's hooks: progress, log lines and metric points go to the registry; the
    job's cancel flag and the worker's signals stop the run after a save; each checkpoint is
    published only while this process still holds the job's fencing token."""

    def __init__(self, c: Context, stop: Callable[[], bool]):
        self.c, self.stop = c, stop
        self.cancelled = self.stopping = False
        self.leaving: Optional[str] = None  # why it stops on its own: "orphaned", "unreachable"
        self.last_poll = 0.0
        self.started = time.time()
        self.progress = c.job.progress  # this process is its only writer while it holds the job

    def log(self, line: str) -> None:
        self.c.log(line)

    def should_stop(self) -> bool:
        c = self.c
        if self.stop():
            if not self.stopping:
                self.stopping = True
                self.log("worker is stopping: finishing the step and saving")
            return True
        if time.monotonic() - self.last_poll >= CANCEL_POLL_SECONDS and not self.leaving:
            self.last_poll = time.monotonic()
            job = c.look()  # ends this process at once if another worker holds the job now
            if c.orphaned():  # the worker died: save what this process still holds, and stop
                self.leave("orphaned", "its worker is gone: finishing the step and saving")
            elif job is None and c.unconfirmed() > c.lease * SELF_FENCE:
                self.leave("unreachable", f"queue unreachable for {c.unconfirmed():.0f}s: finishing "
                           f"the step and saving before the lease ({c.lease:.0f}s) lets another "
                           "worker take the job")
            # "force" is the worker's to act on: it kills this process.
            elif job is not None and not self.cancelled and job.cancel == "stop":
                self.cancelled = True
                if not c.rank:
                    c.report(c.registry.mark_cancelling, c.job.id, c.fence)
                self.log("cancel requested: finishing the step and saving")
        return self.cancelled or bool(self.leaving)

    def leave(self, why: str, line: str) -> None:
        self.leaving = why
        self.log(line)

    def on_start(self, config: dict[str, Any]) -> None:
        """The run's own configuration, for the pages that show and compare runs (rank 0)."""
        if not self.c.rank:
            own = {k: v for k, v in config.items() if k not in invocation_flags()}
            self.on_record({"time": time.time(), "kind": "config", "step": self.progress.get("step", 0),
                            "config": own})
            self.progress.update(phase="compiling the first step", config=own)
            self.c.report(self.c.registry.update, self.c.job.id, progress=self.progress)

    def on_progress(self, p: Progress) -> None:
        line = p.describe()
        if line:
            self.log(line)
        if p.kind not in ("report", "eval", "save") or self.c.rank:
            return
        progress = self.progress
        progress.pop("phase", None)
        progress.update({k: v for k, v in p.to_dict().items()
                         if v is not None and k not in ("kind", "message", "bits_per_char", "checkpoint")})
        if p.kind == "eval" and p.message == "test":
            progress["test_loss"] = p.val_loss
        if p.kind == "eval" and p.val_loss is not None and p.message != "test":
            progress["val_metric"] = p.val_metric
            progress["val_metric_name"] = "bpc" if p.bits_per_char else "ppl"
            progress["val_step"] = p.step
            best = progress.get("best_valid")  # [loss, step, seconds of training]
            if best is None or p.val_loss < best[0]:
                progress["best_valid"] = [p.val_loss, p.step, p.elapsed]
        done = p.step - progress.setdefault("first_step", p.step)
        if done > 0:
            progress["eta_seconds"] = (time.time() - self.started) / done * (p.total - p.step)
        fields: dict[str, Any] = {"progress": progress}
        if p.checkpoint:
            fields["checkpoint"] = p.checkpoint
            self.on_record({"time": time.time(), "kind": "checkpoint", "step": p.step,
                            "identifier": p.checkpoint, "loss": p.val_loss})
        self.c.report(self.c.registry.update, self.c.job.id, **fields)

    def on_record(self, record: dict[str, Any]) -> None:
        self.c.report(self.c.registry.add_point, self.c.job.id, record)

    def before_publish(self) -> None:
        """Write a checkpoint or a metrics record only while this process holds the job: its
        fence is current, or, with the queue unreachable, it was confirmed well within the
        lease (no sweep re-queues it yet). A holder that lost the job mid-evaluation stops
        at its next record."""
        c = self.c
        try:
            c.registry.check_fence(c.job.id, c.fence)
            c.confirmed = time.monotonic()
        except (*QUEUE_ERRORS, JobNotFound):
            if c.unconfirmed() > c.lease * PUBLISH_LIMIT:
                raise LeaseLost(f"job {c.job.id}: its hold unconfirmed for {c.unconfirmed():.0f}s "
                                f"(lease {c.lease:.0f}s): not publishing") from None

    def end_state(self, result: TrainResult) -> Optional[str]:
        """How the job ends after ``result``; None: it was interrupted (back to the queue)."""
        if result.stopped and not self.cancelled:  # a gang stops together: a peer saw the cancel?
            job = self.c.look()
            self.cancelled = job is not None and job.cancel == "stop"
        if result.stopped and not self.cancelled:
            return None
        return CANCELLED if result.stopped else SUCCEEDED
