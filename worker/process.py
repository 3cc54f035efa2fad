"""tlm-worker: take jobs from the queue and run each in a spawned child process.

Signals: the first SIGINT or SIGTERM stops taking jobs and forwards one
SIGINT to each running job, which finishes its step, saves, and is re-queued
as interrupted for another worker to resume; a second signal kills the jobs,
re-queues them and exits at once. Recovery: any worker re-queues a job whose
heartbeat is older than the lease (its worker died), up to a retry limit.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.pool
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from tlm_worker.jobs import EXIT_INTERRUPTED, run_job
from tlm_worker.queue import QUEUE_ERRORS, PayloadError, Queue
from tlm_worker.registry import CANCELLED, CANCELLING, FAILED, FINAL, INTERRUPTED, QUEUED, RUNNING, Registry

SPAWN = multiprocessing.get_context("spawn")


class PooledJob:
    """A job run in the worker's long-lived sampler process (a one-process spawn pool),
    which keeps recently used models loaded between sampling jobs."""

    def __init__(self, pool, args: tuple):
        self.pid = pool._pool[0].pid
        self.result = pool.apply_async(run_job, args)

    def is_alive(self) -> bool:
        if self.result.ready():
            return False
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:  # killed (a forced cancel): the result never comes
            return False

    def join(self, timeout: Optional[float] = None) -> None:
        self.result.wait(timeout)

    @property
    def exitcode(self) -> int:
        if not self.result.ready():
            return -signal.SIGKILL
        return 0 if self.result.successful() else 1


@dataclass
class Running:
    job_id: str
    fence: int
    process: multiprocessing.process.BaseProcess
    forced: bool = False  # killed by `tlm cancel --force`
    interrupted: bool = False  # sent SIGINT by a stopping worker


@dataclass
class Worker:
    url: str
    concurrency: int = 1
    gpu: bool = False
    save_root: Optional[str] = None
    lease: float = 60.0
    max_attempts: int = 3
    poll: float = 0.5
    burst: bool = False  # exit once the queue is empty and no job runs
    failed: int = 0  # jobs this worker ran that ended failed (--burst exits 1 if any)
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
    running: dict[str, Running] = field(default_factory=dict)
    stopping: bool = False  # one SIGINT/SIGTERM: jobs save and are re-queued
    killing: bool = False  # two: jobs are killed and re-queued, and the worker exits at once
    sampler: Optional[multiprocessing.pool.Pool] = None
    notices: list[str] = field(default_factory=list)  # from signal handlers, printed by the loop

    def __post_init__(self) -> None:
        self.queue = Queue(self.url)
        self.registry = Registry(self.queue)
        self.lock = threading.Lock()
        self._done = threading.Event()

    def say(self, message: str) -> None:
        print(f"tlm-worker {self.id}: {message}", file=sys.stderr, flush=True)

    # -- signals ---------------------------------------------------------------

    def _on_signal(self, signum: int, frame) -> None:
        """Flags and signals to the job processes only: the main loop prints and does the
        queue I/O (a handler can land in the middle of either)."""
        name = signal.Signals(signum).name
        if not self.stopping:
            self.stopping = True
            self.notices.append(f"{name}: taking no new jobs; stopping {len(self.running)} running "
                                "job(s) cooperatively so they save and are re-queued (again to exit now)")
            self._interrupt_jobs()
        else:
            self.killing = True
            self.notices.append(f"{name} again: killing running jobs, re-queueing them and exiting")
            for r in list(self.running.values()):
                _signal(r.process, signal.SIGKILL)

    def _say_notices(self) -> None:
        while self.notices:
            self.say(self.notices.pop(0))

    def _interrupt_jobs(self) -> None:
        """While stopping, SIGINT each running job once (also one started as a signal came)."""
        if not self.stopping:
            return
        for r in list(self.running.values()):
            if not r.interrupted:
                r.interrupted = True
                _signal(r.process, signal.SIGINT)

    def _abandon_jobs(self) -> None:
        """Kill the running jobs and re-queue the unfinished ones (one try each: exiting
        must not wait on an unreachable queue; other workers recover what is missed)."""
        for r in list(self.running.values()):
            _signal(r.process, signal.SIGKILL)
            r.process.join(5)
            self._try(self._end, r, r.process.exitcode)

    # -- heartbeats and forced cancels (a thread, so long steps never starve them) --

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(5.0, self.lease / 4))
        while not self._done.wait(interval):
            self._try(self._heartbeat)

    def _heartbeat(self) -> None:
        with self.lock:
            running = list(self.running.values())
        self.registry.heartbeat_worker(self.id, {
            "host": socket.gethostname(), "pid": os.getpid(), "device": "gpu" if self.gpu else "cpu",
            "jobs": [r.job_id for r in running], "stopping": self.stopping})
        for r in running:
            self.registry.heartbeat_job(r.job_id, self.id)
            if not r.forced and self.registry.cancel_requested(r.job_id) == "force":
                r.forced = True
                _signal(r.process, signal.SIGKILL)

    # -- the main loop -------------------------------------------------------------

    def run(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        self.queue.ping()
        self.say(f"serving {self.queue.url.split('@')[-1]} with {self.concurrency} slot(s)")
        self._try(self._heartbeat)
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True)
        beat.start()
        last_recovery = 0.0
        try:
            while not (self.stopping and not self.running):
                self._say_notices()
                if self.killing:
                    self._abandon_jobs()
                    break
                self._interrupt_jobs()
                busy = self._try(self._reap) or False
                if not self.stopping and len(self.running) < self.concurrency:
                    took = self._try(self._take_one)
                    if self.burst and took is False and not self.running:
                        self.say("queue empty: exiting (--burst)")
                        break
                    busy = took or busy
                if time.monotonic() - last_recovery > self.lease / 2:
                    last_recovery = time.monotonic()
                    self._try(self._recover)
                if not busy:  # until a job process ends, or the next poll of the queue
                    sentinels = [r.process.sentinel for r in self.running.values()
                                 if not isinstance(r.process, PooledJob)]
                    multiprocessing.connection.wait(sentinels, self.poll) if sentinels \
                        else time.sleep(self.poll)
        finally:
            self._say_notices()
            self._done.set()
            if self.sampler is not None:
                self.sampler.terminate()
            self._try(self.registry.remove_worker, self.id)
        self.say("stopped")

    def _try(self, fn, *args):
        """Run a queue operation; while the backend is down, say so and carry on."""
        try:
            return fn(*args)
        except QUEUE_ERRORS as e:
            self.say(f"queue unreachable ({e}); retrying")
            time.sleep(1)
            return None

    def _take_one(self) -> bool:
        try:
            job_id = self.queue.pop()
        except PayloadError as e:
            self.say(f"rejected a queue entry: {e}")
            return True
        if job_id is None:
            return False
        try:
            job = self.registry.get(job_id)
        except KeyError:
            self.say(f"dropped queue entry for unknown job {job_id}")
            return True
        if job["state"] not in (QUEUED, INTERRUPTED):
            return True  # cancelled while queued, or a duplicate delivery
        if self.registry.cancel_requested(job_id):
            self.registry.update(job_id, state=CANCELLED, finished=time.time())
            return True
        fence = self.registry.claim(job, self.id)
        if fence is None:
            return True
        args = (self.url, job_id, fence, self.save_root, self.gpu)
        if job["kind"] == "sample":
            if self.sampler is None:
                self.sampler = SPAWN.Pool(1)
            process = PooledJob(self.sampler, args)
        else:
            process = SPAWN.Process(target=run_job, args=args, name=f"tlm-job-{job_id}")
            process.start()
        with self.lock:
            self.running[job_id] = Running(job_id, fence, process)
        self.say(f"started {job['kind']} job {job_id} (attempt {job['attempts'] + 1}, pid {process.pid})")
        return True

    def _reap(self) -> bool:
        finished = [r for r in list(self.running.values()) if not r.process.is_alive()]
        for r in finished:
            r.process.join()
            self._finish(r, r.process.exitcode)
            if isinstance(r.process, PooledJob) and r.process.exitcode < 0:
                self.sampler.terminate()  # its process was killed: start afresh next time
                self.sampler = None
            with self.lock:
                del self.running[r.job_id]
        return bool(finished)

    def _finish(self, r: Running, code: int) -> None:
        self._end(r, code)
        self.failed += self.registry.get(r.job_id)["state"] == FAILED

    def _end(self, r: Running, code: int) -> None:
        job = self.registry.get(r.job_id)
        if job["state"] in FINAL or job["fence"] != r.fence:
            self.say(f"job {r.job_id} ended: {job['state']}" + (f": {job['error']}" if job["error"] else ""))
            return
        if r.forced:
            self.registry.update(r.job_id, state=CANCELLED, finished=time.time(),
                                 error="cancelled with --force")
            self.registry.log(r.job_id, "cancelled with --force: stopped at once")
        elif code == EXIT_INTERRUPTED or self.stopping:
            self.registry.requeue(r.job_id, f"worker {self.id} was stopped")
        elif job["attempts"] < self.max_attempts:
            self.registry.requeue(r.job_id, f"job process died with exit code {code}")
        else:
            self.registry.update(r.job_id, state=FAILED, finished=time.time(),
                                 error=f"job process died with exit code {code} "
                                       f"(attempt {job['attempts']} of {self.max_attempts})")
        self.say(f"job {r.job_id} ended: exit code {code}")

    def _recover(self) -> None:
        """Re-queue running jobs whose worker stopped heartbeating for longer than the lease."""
        now = time.time()
        for job in self.registry.jobs():
            if job["state"] not in (RUNNING, CANCELLING) or job["id"] in self.running:
                continue
            beat = self.registry.job_heartbeat(job["id"]) or job["started"] or job["created"]
            if now - beat <= self.lease:
                continue
            if not self.queue.storage.put_if_empty(f"recover:{job['id']}:{job['fence']}", b"1"):
                continue  # another worker is recovering it
            reason = f"worker {job['worker']} stopped heartbeating ({now - beat:.0f}s > lease {self.lease:.0f}s)"
            if job["attempts"] >= self.max_attempts:
                self.registry.update(job["id"], state=FAILED, finished=now,
                                     error=f"{reason}; gave up after {job['attempts']} attempts")
            elif job["state"] == CANCELLING:
                self.registry.update(job["id"], state=CANCELLED, finished=now, error=reason)
            else:
                self.registry.requeue(job["id"], reason)
            self.say(f"recovered job {job['id']}: {reason}")


def _signal(process, sig: int) -> None:
    try:
        os.kill(process.pid, sig)
    except (ProcessLookupError, TypeError):
        pass
