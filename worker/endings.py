"""How a job whose process ended is settled by its worker: a job that did not settle itself
(killed, crashed, stopped, forced) ends cancelled, goes back to the queue as an interruption
(not an attempt), or counts a crash: re-queued, or failed after ``--max_attempts``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from tlm.ranks import COLLECTIVE_TIMEOUT, STALLED
from tlm_worker.jobs import EXIT_ELSEWHERE, EXIT_INTERRUPTED
from tlm_worker.kinds import PAUSED
from tlm_worker.registry import CANCELLED, FAILED, FINAL, Job, JobNotFound

if TYPE_CHECKING:
    from tlm_worker.process import Running, Worker


def end(w: "Worker", r: "Running", code: int) -> Optional[Job]:
    """Settle a job whose process ended without settling it (killed, crashed, stopped);
    the job as it is then (None: its run has another trainer now)."""
    try:
        job = w.registry.get(r.job_id)
    except JobNotFound:
        job = restore(w, r)
        w._say_notices()
        if job is None:
            return None
    if job.state == PAUSED:  # a sweep trial at a rung or a generation's end: its sweep queues it again
        w.say(f"job {r.job_id} paused by its sweep (a rung, or a generation's end)")
        return job
    if job.fence != r.fence:
        w.say(f"job {r.job_id}: no longer this worker's (now {job.state}, fence {job.fence})")
        return job
    if job.state in FINAL:
        w.say(f"job {r.job_id} ended: {job.state}" + (f": {job.error}" if job.error else ""))
        return job
    if r.forced:
        how = "with --force" if job.cancel == "force" else "(nothing to save)"
        w.registry.finish(r.job_id, CANCELLED, r.fence, error=f"cancelled {how}",
                          log=f"cancelled {how}: stopped at once")
        w.say(f"job {r.job_id} ended: cancelled {how}")
    elif code == 0 and r.rank:  # rank 0's process settles a gang job's end
        w.say(f"job {r.job_id}: rank {r.rank} done")
    elif code == EXIT_ELSEWHERE:  # counted, unlike an interruption: a disk that stays full ends it
        crashed(w, job, job.error or "a write failed (still failing after the retries)")
    elif code == EXIT_INTERRUPTED or w.stopping:
        why = (f"worker {w.id} was stopped" if w.stopping or r.interrupted and not w.paused
               else f"worker {w.id} paused ({w.paused})" if w.paused
               else "its process saved and stopped (see its log: an outage)")
        w.registry.requeue(r.job_id, r.fence, why, interrupted=True)
        w.say(f"job {r.job_id} interrupted: back in the queue")
    elif r.rank is not None:
        why = f"no progress for {COLLECTIVE_TIMEOUT:.0f}s" if code == STALLED else f"exit code {code}"
        crashed(w, job, f"rank {r.rank} on worker {w.id} stopped ({why}): the gang stops")
    elif r.lost:  # killed here, unheard from past the lease: an outage, not a crash
        w.registry.requeue(r.job_id, r.fence, f"worker {w.id} lost the queue", interrupted=True)
        w.say(f"job {r.job_id} interrupted by the outage: back in the queue")
    else:
        crashed(w, job, f"job process died with exit code {code}")
    return w.registry.get(r.job_id)


def crashed(w: "Worker", job: Job, reason: str) -> None:
    """A crash counts as an attempt: re-queue the job, or fail it after max_attempts."""
    if job.attempts < w.max_attempts:
        w.registry.requeue(job.id, job.fence, reason, interrupted=False)
    else:
        why = f"{reason} (attempt {job.attempts} of {w.max_attempts})"
        w.registry.finish(job.id, FAILED, job.fence, error=why, log=f"failed: {why}")
    w.say(f"job {job.id}: {reason}")


def restore(w: "Worker", r: "Running") -> Optional[Job]:
    """The registry forgot a job this worker holds: put its record back (None if its run
    has another trainer by now)."""
    job = w.registry.restore(r.job, w.id)
    w.notices.append(f"job {r.job_id} was missing from the registry (Redis restarted without "
                     "its data?): " + ("re-registered it; it carries on" if job else
                                       "its run has another trainer now: stopping it"))
    return job
