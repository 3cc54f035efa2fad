"""What a worker does beside running its jobs: small periodic tasks, each at its own pace and
apart from the loop that takes, starts and reaps jobs (as SAQ keeps its upkeep apart).

- **heartbeat** (a thread of its own, so long steps never starve it): the worker's record,
  and each held job's under its fence, every quarter lease while jobs run (5 s at most);
  a job lost to another worker is killed, one the registry forgot is put back, and a
  forced cancel kills its process.
- **backstop**: a job process unconfirmed past KILL_AFTER of the lease is killed.
- **power**: --when_idle / --on_battery pause training.
- **recover**, every lease/2 by every worker: re-queue a job whose heartbeat is older than
  the lease (its worker died), failing it after ``max_attempts`` crashes; push again a
  claimable job that is in no queue (its entry was taken by a worker that died before
  claiming it); settle chains whose parent ended; fail records that do not decode.
- **drive sweeps**, every lease/2: one round of each running sweep.
- **prune**, every PRUNE_SECONDS: finished jobs past retention.

A chore is one function of the worker and one entry in ``chores()`` with its interval.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from tlm_worker import power, sweeps
from tlm_worker.endings import crashed, restore
from tlm_worker.kinds import INTERACTIVE, TRAINING
from tlm_worker.placement import capabilities, unmet
from tlm_worker.queue import LANES, QUEUE_ERRORS
from tlm_worker.registry import ACTIVE, CANCELLED, CANCELLING, CLAIMABLE, JobNotFound
from tlm_worker.targets import save_root_of

if TYPE_CHECKING:
    from tlm_worker.process import Worker

IDLE_POLL = 10.0  # seconds an idle worker on Redis goes without looking at the queue unless woken
KILL_AFTER = 0.75  # of the lease without a heartbeat: a job process still running is killed
PRUNE_SECONDS = 600.0  # between two looks for finished jobs past retention
CLOCK_NOTICE_SECONDS = 5.0  # a clock this far from the queue's is worth a word at start


@dataclass
class Chore:
    """``run(worker)`` every ``every(worker)`` seconds; ``queue``: its calls go through the
    worker's outage guard (skipped while the queue is down), else it runs whatever the queue does."""
    run: Callable[["Worker"], None]
    every: Callable[["Worker"], float]
    queue: bool = True
    due: float = 0.0


def chores() -> list[Chore]:
    """A worker's periodic chores, in the order they run when due together."""
    return [Chore(backstop, lambda w: 0.0, queue=False),
            Chore(look_at_power, lambda w: power.LOOK_SECONDS, queue=False),
            Chore(recover, lambda w: w.lease / 2),
            Chore(drive_sweeps, lambda w: w.lease / 2),
            Chore(prune, lambda w: PRUNE_SECONDS)]


def tend(w: "Worker") -> None:
    """Run each of the worker's chores that is due."""
    for chore in w.chores:
        if time.monotonic() >= chore.due:
            chore.due = time.monotonic() + chore.every(w)
            w._try(chore.run, w) if chore.queue else chore.run(w)


def greet(w: "Worker") -> None:
    """What it serves, and what the user should know before it takes a job."""
    w.say(f"serving {w.queue.url.split('@')[-1]} with {w.concurrency} training "
          "slot(s) and an interactive lane")
    if w.not_lab_root:
        w.say(f"{w.not_lab_root}; taking no job that reads a run by name")
    skew = time.time() - w.registry.now()
    if abs(skew) > CLOCK_NOTICE_SECONDS:
        w.say(f"this machine's clock is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} "
              "the queue's (its Redis host's): leases go by the queue's clock, metrics times by "
              "each Mac's own; set the time automatically (System Settings > General > Date & Time)")


# -- heartbeats and forced cancels ------------------------------------------------------

def heartbeat_loop(w: "Worker") -> None:
    """Heartbeats every quarter lease (5 s at most) while jobs run; an idle worker's record
    only needs to outlive WORKER_TTL, so it beats every IDLE_POLL (a job started wakes it)."""
    while not w.done_event.is_set():
        busy = w.running or w.gangs.reservation
        w.beat_now.wait(max(0.2, min(5.0, w.lease / 4)) if busy else IDLE_POLL)
        w.beat_now.clear()
        if not w.done_event.is_set():
            w._try(heartbeat, w)


def worker_capabilities(w: "Worker") -> dict:
    return {**capabilities(w.gpu, w.labels), "lab_root": w.not_lab_root is None}


def heartbeat(w: "Worker") -> None:
    with w.lock:
        running = list(w.running.values())
    w.caps = worker_capabilities(w)  # memory available changes
    w.registry.heartbeat_worker(w.id, {
        "host": socket.gethostname(), "pid": os.getpid(), "device": "gpu" if w.gpu else "cpu",
        "save_root": str(save_root_of(w.save_root)),
        "slots": {TRAINING: w.concurrency, INTERACTIVE: 1}, "capabilities": w.caps,
        "jobs": [r.job_id for r in running], "stopping": w.stopping, "paused": w.paused,
        "done": w.done})
    if w.lab_token and not w.not_lab_root and w.registry.store.value("save_root") is None:
        w.registry.store.first_value("save_root", w.lab_token)  # a Redis restarted empty
    for r in running:
        if r.lost:
            continue
        try:
            job = w.registry.heartbeat_job(r.job_id, r.fence) if r.rank is None \
                else w.registry.heartbeat_member(r.job_id, w.id, r.fence)
        except JobNotFound:
            job = restore(w, r)
        if job is None:  # re-queued while this worker was away, perhaps running elsewhere
            r.lost = True
            kill(r.process, signal.SIGKILL)
            w.notices.append(f"job {r.job_id}: lease lost (another worker may hold it now): "
                             "killed its process" + (f" (rank {r.rank})" if r.rank else ""))
            continue
        r.confirmed = time.monotonic()
        # A cancelled sample, eval or export stops at once: it has nothing to save.
        if not r.forced and (job.cancel == "force" or (job.cancel and r.lane == INTERACTIVE)):
            r.forced = True
            kill(r.process, signal.SIGKILL)


# -- the periodic chores ------------------------------------------------------------------

def backstop(w: "Worker") -> None:
    """A job process that has gone on past KILL_AFTER of the lease without a heartbeat of
    its worker (the queue unreachable; a process that stopped listening) is killed: a sweep
    may re-queue its job soon, and two processes must not train one run."""
    for r in list(w.running.values()):
        silent = time.monotonic() - r.confirmed
        if not r.lost and silent > w.lease * KILL_AFTER:
            r.lost = True
            kill(r.process, signal.SIGKILL)
            w.say(f"job {r.job_id}: no heartbeat for {silent:.0f}s (lease {w.lease:.0f}s): "
                  "killed its process; the job resumes from its last checkpoint")


def look_at_power(w: "Worker") -> None:
    """--when_idle / --on_battery: pause training while the Mac's owner is back or it runs
    on battery; running training jobs save and go back to the queue (an interruption,
    not an attempt). A no-op without a policy."""
    if not w.policy.active:
        return
    why = power.pause_reason(w.policy, w.probe.idle_seconds(), w.probe.on_battery())
    if why != w.paused:
        w.say(f"pausing training: {why}" if why else "resuming training")
        w.paused = why
    if why:
        w._interrupt_jobs(TRAINING)


def recover(w: "Worker") -> None:
    """Recover jobs of dead workers, re-push stranded claimable jobs, settle chains whose
    parent ended, fail records that do not decode."""
    now = w.registry.now()
    w.registry.skipped.clear()
    if time.monotonic() - w.outage.back_at >= w.lease:  # just after an outage holders may be reconnecting
        for job in w.registry.in_states(ACTIVE):
            beat = job.heartbeat or job.started or job.created
            members = job.members  # a gang's heartbeat is its stalest member's
            if job.spec.driven or (job.id in w.running and not members) or now - beat <= w.lease:
                continue
            who = min(members, key=lambda m: m["heartbeat"])["worker"] if members else job.worker
            reason = f"worker {who} stopped heartbeating ({now - beat:.0f}s > lease {w.lease:.0f}s)"
            if job.state == CANCELLING:
                w.registry.finish(job.id, CANCELLED, job.fence, error=reason, log=f"cancelled: {reason}")
            else:
                crashed(w, job, reason)
    stranded = [j for j in w.registry.in_states(CLAIMABLE) if now - j.enqueued > w.lease
                and j.nodes == 1] if w.registry.my_turn("stranded", w.lease / 2) else []
    if stranded:
        pending = {lane: w.queue.pending(lane) for lane in LANES}
        for job in stranded:
            if job.id not in pending[job.spec.lane]:
                w.registry.update(job.id, enqueued=now)
                w.queue.push(job.id, job.spec.lane, job.priority)
                w.say(f"job {job.id} was in no queue (its entry was taken by a worker "
                      "that died before claiming it): queued again")
    w.registry.waiting_for_parents(w.lease)
    for bad in list(w.registry.skipped.values()):
        if bad.newer:
            continue  # a newer tlm's worker can run it
        if w.registry.fail_broken(bad.job_id, bad.reason):
            w.say(f"failed {bad}: it is not a job this tlm can read")


def drive_sweeps(w: "Worker") -> None:
    """A round of each running sweep: no worker holds a sweep, every worker drives it."""
    for job in w.registry.in_states(ACTIVE):
        if job.spec.driven:
            drive(w, job.id)


def drive(w: "Worker", sweep_id: str) -> None:
    """One round of a sweep (tlm_worker.sweeps.reconcile); a failure of it is said, not fatal."""
    try:
        sweeps.reconcile(w.registry, sweep_id, w.lease)
    except QUEUE_ERRORS:
        raise
    except Exception as e:
        w.say(f"sweep {sweep_id}: {type(e).__name__}: {e}".splitlines()[0])


def prune(w: "Worker") -> None:
    """Finished jobs past retention; the lab's runs stay listed (their summaries)."""
    pruned = w.registry.prune(keep_runs=True)
    if pruned:
        w.say(f"pruned {pruned} job(s) finished more than {w.keep_days:g} days ago")


# -- --burst ------------------------------------------------------------------------------

def left_for_burst(w: "Worker") -> "bool | str":
    """--burst: True while a job this worker can run waits to be claimed or a sweep runs
    that will queue more (entries can lag records, and a gang waits for workers that may
    not have started yet); else why it may exit ("queue empty", or what the jobs left need)."""
    if any(j.spec.driven for j in w.registry.in_states(ACTIVE)):
        return True
    left = w.registry.in_states(CLAIMABLE)
    if any(not unmet(j.placement, w.caps) for j in left):
        return True
    if not left:
        return "queue empty"
    return (f"nothing left this worker can run: {len(left)} job(s) wait for another worker "
            f"(job {left[0].id} {unmet(left[0].placement, w.caps)})")


def kill(process, sig: int) -> None:
    """Signal a job process (one already gone, or not started, is no error)."""
    try:
        os.kill(process.pid, sig)
    except (ProcessLookupError, TypeError):
        pass
