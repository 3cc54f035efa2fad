"""tlm-worker: take jobs from the queue and run each in a spawned child process.

Lanes: ``--concurrency`` training slots, and beside them one interactive slot
for sample and eval jobs (in a long-lived sampler process), so a sample never
waits behind hours of training. A queue entry only wakes the worker: it runs
the job only if its claim of the job's record succeeds.

Signals: the first SIGINT or SIGTERM stops taking jobs and forwards one
SIGINT to each running job, which finishes its step, saves, and is re-queued
as interrupted for another worker to resume (an interruption, not an
attempt); a second signal kills the jobs, re-queues them and exits at once.

Gangs (``tlm submit train --nodes N``): a worker with a free training slot
reserves a place in the oldest waiting gang that the live workers could fill,
refreshes it while it waits, and gives it up after two leases (for two more,
taking other jobs meanwhile), so a gang that cannot gather never holds slots
forever. The reservation that completes a gang starts it; each member then
runs one rank, reachable at ``--address`` on a port from ``--ports``. A
member whose gang was re-queued or ended elsewhere (a peer died, was
stopped, or stalled) kills its rank, which would wait in a collective.

Sweeps, every lease/2 by every worker: re-queue a job whose heartbeat is
older than the lease (its worker died), failing it after ``max_attempts``
crashes; push again a claimable job that is in no queue (its entry was taken
by a worker that died before claiming it); prune finished jobs past
retention.

Outages and leases: a worker whose queue goes away says so once, keeps its
jobs training, answers signals as ever (no queue call blocks it for more
than seconds), and says when the queue is back. Its job processes save and
stop once they cannot confirm their hold for a quarter of the lease, and the
worker kills any that run on past three quarters, so none is still training
when a sweep elsewhere may re-queue it; what they leave is re-queued as an
interruption once the queue answers, and for one lease after an outage a
worker re-queues no stale job as crashed (its holder may be reconnecting).
Every heartbeat names the job's fence: a worker that lost a job (it was
stopped past its lease and another took over) kills its process at the
next heartbeat, and one whose job the registry forgot (Redis restarted
without its data) puts the record back and carries on. Heartbeats and
leases go by the queue's clock (``Registry.now``), not each Mac's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from tlm.ranks import COLLECTIVE_TIMEOUT, STALLED, free_ports
from tlm_worker.jobs import EXIT_ELSEWHERE, EXIT_INTERRUPTED, SELF_FENCE, run_job
from tlm_worker import power
from tlm_worker.placement import capabilities, unmet
from tlm_worker.targets import check_save_root, save_root_of
from tlm_worker.queue import LANES, QUEUE_ERRORS, PayloadError, Queue
from tlm_worker.registry import (ACTIVE, CANCELLED, CANCELLING, CLAIMABLE, FAILED, FINAL, RUNNING,
                                 Job, JobNotFound, Registry)

SPAWN = multiprocessing.get_context("spawn")
IDLE_POLL = 10.0  # seconds an idle worker on Redis goes without looking at the queue unless woken
IDLE_WAIT = 1.0  # the longest an idle worker's loop waits for a wake-up (signals are seen after it)
KILL_AFTER = 0.75  # of the lease without a heartbeat: a job process still running is killed
CLOCK_NOTICE_SECONDS = 5.0  # a clock this far from the queue's is worth a word at start


class Sampler:
    """The worker's long-lived interactive process: it runs one job at a time, sent over a
    pipe, and keeps recently used models loaded between them. It starts with the worker's
    first job of any kind, so it has imported MLX before a sample asks while the Mac is busy
    (on a Mac busy starting many processes a first sample took 50 s), and an idle worker is
    one process; it says "ready" once, before any job's answer. One that is killed (a
    cancel, a lost lease) is replaced, never reused; one whose worker is gone exits by itself."""

    def __init__(self):
        self.started = self.last_used = time.monotonic()  # idle long after its last job: closed
        self.ready = False
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_serve, args=(child, os.getpid()), name="tlm-sampler",
                                     daemon=True)
        self.process.start()
        child.close()

    def check_ready(self) -> bool:
        """True once: when its "ready" (always its first message) is read."""
        if self.ready:
            return False
        try:
            if not self.conn.poll():
                return False
            self.conn.recv()
        except (EOFError, OSError):  # it died before it was ready: a job run in it fails over
            return False
        self.ready = True
        return True

    def run(self, args: tuple) -> "PooledJob":
        self.last_used = time.monotonic()
        self.conn.send(args)
        return PooledJob(self)

    def close(self) -> None:
        _signal(self.process, signal.SIGKILL)
        self.process.join(5)
        self.conn.close()


def _serve(conn: multiprocessing.connection.Connection, parent: int) -> None:
    """The sampler process: run each job it is sent; answer with its exit code."""
    def orphaned() -> None:  # a SIGKILLed worker cannot stop this process: it stops itself
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)
    threading.Thread(target=orphaned, daemon=True).start()
    import tlm.run  # noqa: F401  (BLAS, MLX, the model, the trainer and the sampler: what a sample or eval loads)
    conn.send("ready")
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):  # the worker closed the pipe, or died: nothing more to run
            return
        try:
            run_job(*args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
        try:
            conn.send(code)
        except OSError:
            return


class PooledJob:
    """A job run in the worker's Sampler: looks like a process to the worker's loop."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.pid, self.code = sampler, sampler.process.pid, None
        self.sentinel = sampler.conn  # readable when the job ends (multiprocessing.connection.wait)

    def is_alive(self) -> bool:
        if self.code is None:
            self.sampler.check_ready()
            try:
                if self.sampler.ready and self.sampler.conn.poll():
                    self.code = self.sampler.conn.recv()
            except (EOFError, OSError):  # killed: its end of the pipe closed
                return False
        return self.code is None and self.sampler.process.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        """Until the job ends or its process dies (then at once)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            multiprocessing.connection.wait([self.sampler.conn, self.sampler.process.sentinel], 0.5)

    @property
    def exitcode(self) -> int:
        return -signal.SIGKILL if self.code is None else self.code  # None: its process was killed


@dataclass
class Running:
    job: Job  # as claimed: what is put back if the registry forgets it
    fence: int
    lane: str
    process: multiprocessing.process.BaseProcess
    confirmed: float = field(default_factory=time.monotonic)  # its last heartbeat under its fence
    forced: bool = False  # killed by `tlm cancel --force`, or a cancelled interactive job
    interrupted: bool = False  # sent SIGINT by a stopping worker
    rank: Optional[int] = None  # this worker's rank in a gang job
    awake: Optional[object] = None  # macOS: the assertion against idle sleep while it runs
    lost: bool = False  # another worker holds the job now: its process was killed

    @property
    def job_id(self) -> str:
        return self.job.id


@dataclass
class Reservation:
    """A place held in a waiting gang."""
    job_id: str
    port: int
    since: float = field(default_factory=time.monotonic)
    refreshed: float = field(default_factory=time.monotonic)


def local_address(queue: Queue) -> str:
    """This machine's address on its route to the queue's Redis (for SQLite, one machine:
    127.0.0.1); no packet is sent."""
    if queue.redis is None:
        return "127.0.0.1"
    kwargs = queue.redis.connection_pool.connection_kwargs
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((kwargs.get("host", "127.0.0.1"), kwargs.get("port", 6379)))
        return s.getsockname()[0]


@dataclass
class Worker:
    url: str
    concurrency: int = 1
    gpu: bool = False
    save_root: Optional[str] = None
    lease: float = 60.0
    max_attempts: int = 3
    keep_days: float = 30.0  # finished jobs older than this are pruned
    poll: float = 0.2
    burst: bool = False  # exit once the queue is empty and no job runs
    address: Optional[str] = None  # where this worker's gang ranks are reached (default: see local_address)
    ports: range = range(47100, 47200)  # ports its gang ranks listen on
    rdma: dict[str, str] = field(default_factory=dict)  # JACCL: peer address -> RDMA device
    labels: dict[str, str] = field(default_factory=dict)  # --label key=value: jobs ask with --on
    policy: power.Policy = field(default_factory=power.Policy)  # --when_idle, --on_battery
    interactive_idle: float = 600.0  # seconds an idle sampler keeps its models before it is closed
    failed: int = 0  # jobs this worker ran that ended failed (--burst exits 1 if any)
    done: int = 0  # jobs this worker ran to an end (its heartbeat says, for the pages)
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
    running: dict[str, Running] = field(default_factory=dict)
    stopping: bool = False  # one SIGINT/SIGTERM: jobs save and are re-queued
    killing: bool = False  # two: jobs are killed and re-queued, and the worker exits at once
    sampler: Optional[Sampler] = None
    notices: list[str] = field(default_factory=list)  # from signal handlers, printed by the loop
    reservation: Optional[Reservation] = None
    shunned: dict[str, float] = field(default_factory=dict)  # gang job -> when it may be joined again
    idle_until: dict[str, float] = field(default_factory=dict)  # lane -> no pops before (nothing fit)

    def __post_init__(self) -> None:
        self.queue = Queue(self.url, patient=False)
        self.queue.ping()  # a misconfigured queue is a one-line error at once
        self.registry = Registry(self.queue, self.keep_days)
        self.lock = threading.Lock()
        self._outage = threading.Lock()  # the loop and the heartbeat thread both see outages
        self._done = threading.Event()
        self._beat = threading.Event()  # set: heartbeat now (a job started)
        self.wakeup: Optional[Callable[[float], bool]] = None  # Redis: wait for a push (Queue.wakeups)
        self._last_prune = 0.0
        self._next_gang_look = 0.0
        self.address = self.address or local_address(self.queue)
        # the lab's token, and None if this worker's save root is the lab's shared folder
        self.lab_token, self.not_lab_root = check_save_root(self.registry, self.save_root)
        self.caps = self._capabilities()
        self.probe = power.probe()
        self.paused: Optional[str] = None  # why training is paused (--when_idle, --on_battery)
        self._next_power_look = 0.0
        self.down_since: Optional[float] = None  # the queue has not answered since (monotonic)
        self._next_probe = 0.0  # while it is down: the next call that may try it
        self.back_at = -float("inf")  # when it last came back after an outage (monotonic)
        self.unsettled: list[tuple[Running, int]] = []  # ended job processes to settle when it answers

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

    def _interrupt_jobs(self, lane: Optional[str] = None) -> None:
        """While stopping (or paused: only ``lane``'s), SIGINT each running job once (also one
        started as a signal came): it saves and goes back to the queue."""
        if not (self.stopping or lane):
            return
        for r in list(self.running.values()):
            if not r.interrupted and lane in (None, r.lane):
                r.interrupted = True
                _signal(r.process, signal.SIGINT)

    def _abandon_jobs(self) -> None:
        """Kill the running jobs and re-queue the unfinished ones (one try each: exiting
        must not wait on an unreachable queue; other workers recover what is missed)."""
        for r in list(self.running.values()):
            _signal(r.process, signal.SIGKILL)
            r.process.join(5)
            self.unsettled.append((r, r.process.exitcode))
        self._settle()

    # -- heartbeats and forced cancels (a thread, so long steps never starve them) --

    def _heartbeat_loop(self) -> None:
        """Heartbeats every quarter lease (5 s at most) while jobs run; an idle worker's record
        only needs to outlive WORKER_TTL, so it beats every IDLE_POLL (a job started wakes it)."""
        while not self._done.is_set():
            busy = self.running or self.reservation
            self._beat.wait(max(0.2, min(5.0, self.lease / 4)) if busy else IDLE_POLL)
            self._beat.clear()
            if not self._done.is_set():
                self._try(self._heartbeat)

    def _capabilities(self) -> dict:
        return {**capabilities(self.gpu, self.labels), "lab_root": self.not_lab_root is None}

    def _heartbeat(self) -> None:
        with self.lock:
            running = list(self.running.values())
        self.caps = self._capabilities()  # memory available changes
        self.registry.heartbeat_worker(self.id, {
            "host": socket.gethostname(), "pid": os.getpid(), "device": "gpu" if self.gpu else "cpu",
            "save_root": str(save_root_of(self.save_root)),
            "slots": {"train": self.concurrency, "interactive": 1}, "capabilities": self.caps,
            "jobs": [r.job_id for r in running], "stopping": self.stopping, "paused": self.paused,
            "done": self.done})
        if self.lab_token and not self.not_lab_root and self.registry.store.value("save_root") is None:
            self.registry.store.first_value("save_root", self.lab_token)  # a Redis restarted empty
        for r in running:
            if r.lost:
                continue
            try:
                job = self.registry.heartbeat_job(r.job_id, r.fence) if r.rank is None \
                    else self.registry.heartbeat_member(r.job_id, self.id, r.fence)
            except JobNotFound:
                job = self._restore(r)
            if job is None:  # re-queued while this worker was away, perhaps running elsewhere
                r.lost = True
                _signal(r.process, signal.SIGKILL)
                self.notices.append(f"job {r.job_id}: lease lost (another worker may hold it now): "
                                    "killed its process" + (f" (rank {r.rank})" if r.rank else ""))
                continue
            r.confirmed = time.monotonic()
            # A cancelled sample, eval or export stops at once: it has nothing to save.
            if not r.forced and (job.cancel == "force" or (job.cancel and r.lane == "interactive")):
                r.forced = True
                _signal(r.process, signal.SIGKILL)

    def _restore(self, r: Running) -> Optional[Job]:
        """The registry forgot a job this worker holds: put its record back (None if its run
        has another trainer by now)."""
        job = self.registry.restore(r.job, self.id)
        self.notices.append(f"job {r.job_id} was missing from the registry (Redis restarted without "
                            "its data?): " + ("re-registered it; it carries on" if job else
                                              "its run has another trainer now: stopping it"))
        return job

    def _backstop(self) -> None:
        """A job process that has gone on past KILL_AFTER of the lease without a heartbeat of
        its worker (the queue unreachable; a process that stopped listening) is killed: a sweep
        may re-queue its job soon, and two processes must not train one run."""
        for r in list(self.running.values()):
            silent = time.monotonic() - r.confirmed
            if not r.lost and silent > self.lease * KILL_AFTER:
                r.lost = True
                _signal(r.process, signal.SIGKILL)
                self.say(f"job {r.job_id}: no heartbeat for {silent:.0f}s (lease {self.lease:.0f}s): "
                         "killed its process; the job resumes from its last checkpoint")

    # -- the main loop -------------------------------------------------------------

    def _greet(self) -> None:
        """What it serves, and what the user should know before it takes a job."""
        self.say(f"serving {self.queue.url.split('@')[-1]} with {self.concurrency} training "
                 "slot(s) and an interactive lane")
        if self.not_lab_root:
            self.say(f"{self.not_lab_root}; taking no job that reads a run by name")
        skew = time.time() - self.registry.now()
        if abs(skew) > CLOCK_NOTICE_SECONDS:
            self.say(f"this machine's clock is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} "
                     "the queue's (its Redis host's): leases go by the queue's clock, metrics times by "
                     "each Mac's own; set the time automatically (System Settings > General > Date & Time)")

    def run(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        self._greet()
        self._try(self._heartbeat)
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True)
        beat.start()
        last_sweep = 0.0
        wakeups = contextlib.ExitStack()
        self.wakeup = self._try(wakeups.enter_context, self.queue.wakeups())
        try:
            while not (self.stopping and not self.running):
                if self.wakeup is not None and self._try(self.wakeup, 0):
                    self._woken()
                self._say_notices()
                if self.killing:
                    self._abandon_jobs()
                    break
                self._interrupt_jobs()
                self._power()
                self._backstop()
                busy = self._reap()
                if self.unsettled:
                    self._try(self._settle)
                took = not self.stopping and not self.paused and bool(self._try(self._gang))
                for lane in LANES:
                    if not self.stopping and self._free(lane) and not (self.paused and lane == "train"):
                        took = self._try(self._take, lane) or took
                busy = took or busy
                if time.monotonic() - last_sweep > self.lease / 2:
                    last_sweep = time.monotonic()
                    self._try(self._sweep)
                if self.burst and not (took or self.running or self.reservation):
                    left = self._try(self._left_for_burst)
                    if left is not None and left is not True:
                        self.say(f"{left}: exiting (--burst)")
                        break
                if not busy:
                    self._wait()
        finally:
            wakeups.close()
            if self.unsettled:
                self._try(self._settle)  # one more try: other workers' sweeps recover the rest
            self._say_notices()
            self._done.set()
            if self.reservation is not None:
                self._try(self.registry.withdraw, self.reservation.job_id, self.id)
            if self.sampler is not None:
                self.sampler.close()
            self._try(self.registry.remove_worker, self.id)
        self.say("stopped")

    def _wait(self) -> None:
        """Until a job process ends, a job is queued (a wake-up), or the next poll."""
        sentinels = [r.process.sentinel for r in self.running.values()]
        if sentinels:
            multiprocessing.connection.wait(sentinels, self.poll)
        elif self.wakeup is not None and self.down_since is None:
            if self._try(self.wakeup, IDLE_WAIT):
                self._woken()
        else:
            time.sleep(self.poll)

    def _try(self, fn, *args):
        """Run a queue operation; None if the queue is down (unreachable, or refusing writes:
        out of memory, read-only). While it is, a ping a second tries it and every call
        returns at once (none while stopping: exiting never waits on a queue that is gone);
        the outage is said once, and its end, whichever thread (loop, heartbeat) sees it."""
        try:
            since = self.down_since
            if since is not None:
                if time.monotonic() < self._next_probe or self.stopping:
                    return None
                self._next_probe = time.monotonic() + 1.0
                self.queue.probe()
                with self._outage:
                    if self.down_since is not None:
                        self.say(f"queue back after {time.monotonic() - since:.0f}s")
                        self.down_since, self.back_at = None, time.monotonic()
            return fn(*args)
        except QUEUE_ERRORS as e:
            with self._outage:
                if self.down_since is None:
                    self.down_since, self._next_probe = time.monotonic(), time.monotonic() + 1.0
                    self.say(f"queue unreachable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                             f"jobs train on; those not confirmed for {self.lease * SELF_FENCE:.0f}s "
                             "save and stop; trying again every second")
            return None

    def _free(self, lane: str) -> bool:
        held = sum(r.lane == lane for r in self.running.values())
        if lane == "train":
            return held + (self.reservation is not None) < self.concurrency
        return held < 1

    def _left_for_burst(self) -> "bool | str":
        """--burst: True while a job this worker can run waits to be claimed or a sweep runs
        that will queue more (entries can lag records, and a gang waits for workers that may
        not have started yet); else why it may exit ("queue empty", or what the jobs left need)."""
        if any(j.spec.driven for j in self.registry.in_states(ACTIVE)):
            return True
        left = self.registry.in_states(CLAIMABLE)
        if any(not unmet(j.placement, self.caps) for j in left):
            return True
        if not left:
            return "queue empty"
        return (f"nothing left this worker can run: {len(left)} job(s) wait for another worker "
                f"(job {left[0].id} {unmet(left[0].placement, self.caps)})")

    def _take(self, lane: str) -> bool:
        """Pop one wake-up entry of a lane and claim the best job this worker can run there
        (not always the entry's: priorities and needs decide). An entry whose job still waits
        goes back for other workers; when nothing here fits, this lane rests a second."""
        if time.monotonic() < self.idle_until.get(lane, 0):
            return False
        try:
            job_id = self.queue.pop(lane)
        except PayloadError as e:
            self.say(f"rejected a queue entry: {e}")
            return True
        if job_id is None:
            if self.wakeup is not None:  # a push wakes this worker: no need to look again soon
                self.idle_until[lane] = time.monotonic() + IDLE_POLL
            return False
        job = self.registry.claim_next(lane, self.id, self.caps, first=job_id)
        if job is not None:
            self._start(job, lane)
        if job is None or job.id != job_id:
            entry = next(iter(self.registry.find([job_id])), None)
            if entry is not None and entry.state in CLAIMABLE:
                self.queue.push(job_id, lane, entry.priority)
                if job is None:
                    self.idle_until[lane] = time.monotonic() + 1.0
        return job is not None

    def _woken(self) -> None:
        """A job was queued: look at every lane, and for a gang, now."""
        self.idle_until.clear()
        self._next_gang_look = 0.0

    def _start(self, job: Job, lane: str, rank: Optional[int] = None) -> None:
        """Run a job this worker holds (or its rank of a gang job) in a process of its own."""
        args = (self.url, job.id, job.fence, self.save_root, self.gpu, rank, self.lease)
        if self.sampler is None:  # with the first job of any kind: see Sampler
            self.sampler = Sampler()
        if lane == "interactive":
            process = self.sampler.run(args)
        else:
            process = SPAWN.Process(target=run_job, args=args, name=f"tlm-job-{job.id}")
            process.start()
        with self.lock:
            self.running[job.id] = Running(job, job.fence, lane, process, rank=rank,
                                           awake=power.keep_awake(process.pid))
        self._beat.set()  # its heartbeats start now, not at the end of an idle wait
        self.say(f"started {job.kind} job {job.id} (attempt {job.attempts}"
                 + (f", {job.interruptions} interruption(s)" if job.interruptions else "")
                 + (f", rank {rank} of {job.nodes}" if rank is not None else "")
                 + f", pid {process.pid})")

    def _gang(self) -> bool:
        """Reserve a place in the oldest waiting gang, keep it fresh, start this worker's rank
        once the gang is complete, or give the place up after two leases. True if started."""
        now, r = time.monotonic(), self.reservation
        if r is None:
            if not self._free("train") or now < self._next_gang_look:
                return False
            self._next_gang_look = now + 1.0
            gang = self._joinable_gang()
            if gang is None:
                return False
            taken = {m["port"] for m in gang.members if m["address"] == self.address}
            ports = free_ports(1, self.address, [p for p in self.ports if p not in taken])
            if not ports:
                self.say(f"no free port in --ports {self.ports.start}-{self.ports.stop - 1} "
                         f"on {self.address}: not joining gang job {gang.id}")
                return False
            r = self.reservation = Reservation(gang.id, ports[0])
            job = self._reserve(r)
        elif now - r.refreshed > self.lease / 4:
            job = self._reserve(r)
        else:
            job = self.registry.get(r.job_id)
        rank = next((i for i, m in enumerate(job.members) if m["worker"] == self.id), None)
        if rank is None or job.state not in (RUNNING, *CLAIMABLE):
            self.reservation = None  # it started without this worker, or ended
            return False
        if job.state == RUNNING:
            self.reservation = None
            self._start(job, "train", rank)
            return True
        if now - r.since > 2 * self.lease:
            self.registry.withdraw(r.job_id, self.id)
            self.reservation = None
            self.shunned[r.job_id] = now + 2 * self.lease
            self.say(f"gang job {r.job_id}: {len(job.members)} of {job.nodes} workers after "
                     f"{2 * self.lease:.0f}s: gave up its place for {2 * self.lease:.0f}s")
        return False

    def _reserve(self, r: Reservation) -> dict:
        """Hold or refresh the place; the job as it is now (perhaps started, or ended)."""
        r.refreshed = time.monotonic()
        place = {"address": self.address, "port": r.port, "rdma": self.rdma}
        return self.registry.reserve(r.job_id, self.id, place, self.registry.now() + self.lease, self.caps) \
            or self.registry.get(r.job_id)

    def _live_workers(self) -> int:
        """Workers heartbeating and not stopping (this one included): who could join a gang."""
        return sum(not w.get("stopping") for w in self.registry.workers())

    def _joinable_gang(self) -> Optional[Job]:
        """The oldest waiting gang the live workers could fill, unless this worker gave it up
        lately; every worker picks the same one, so gangs never split the workers."""
        gangs = [g for g in self.registry.waiting_gangs() if not unmet(g.placement, self.caps)]
        if not gangs and self.wakeup is not None:  # a gang queued or re-queued wakes this worker
            self._next_gang_look = time.monotonic() + IDLE_POLL
        live = self._live_workers() if gangs else 0
        gang = next((g for g in gangs if g.nodes <= live), None)
        if gang is None or self.shunned.get(gang.id, 0) > time.monotonic():
            return None
        return gang

    def _reap(self) -> bool:
        """Collect ended job processes; their jobs are settled now, or once the queue answers.
        An interactive process idle past --interactive_idle is closed: its models' memory
        goes back to the Mac, and the next sample or eval starts one afresh."""
        finished = [r for r in list(self.running.values()) if not r.process.is_alive()]
        if finished:
            self._woken()  # a slot is free: look at the queue now, not at the next idle poll
        for r in finished:
            r.process.join()
            if isinstance(r.process, PooledJob):
                self.sampler.last_used = time.monotonic()
            if isinstance(r.process, PooledJob) and (r.process.exitcode < 0 or r.forced or r.lost):
                self.sampler.close()  # its process was killed: start afresh next time
                self.sampler = None
            power.release(r.awake)
            with self.lock:
                del self.running[r.job_id]
            self.unsettled.append((r, r.process.exitcode))
        if self.sampler is not None and self.sampler.check_ready():
            self.say(f"interactive process ready (pid {self.sampler.process.pid}, "
                     f"{time.monotonic() - self.sampler.started:.1f}s)")
        idle = self.sampler is not None and time.monotonic() - self.sampler.last_used > self.interactive_idle
        if idle and not any(r.lane == "interactive" for r in self.running.values()):
            self.sampler.close()
            self.sampler = None
            self.say(f"interactive process idle for {self.interactive_idle:g}s: closed, its memory given back")
        if finished:
            self._try(self._settle)
        return bool(finished)

    def _settle(self) -> None:
        """Settle ended job processes' jobs, oldest first (a queue error keeps the rest)."""
        while self.unsettled:
            r, code = self.unsettled[0]
            job = self._end(r, code)
            self.unsettled.pop(0)
            if job is None:
                continue
            self.failed += job.state == FAILED
            self.done += job.state in FINAL
            if job.sweep:  # a trial ended: its sweep takes the next one now, not at the next sweep
                self._drive(job.sweep["id"])

    def _drive(self, sweep_id: str) -> None:
        """One round of a sweep (tlm_worker.sweeps.reconcile); a failure of it is said, not fatal."""
        from tlm_worker import sweeps
        try:
            sweeps.reconcile(self.registry, sweep_id, self.lease)
        except QUEUE_ERRORS:
            raise
        except Exception as e:
            self.say(f"sweep {sweep_id}: {type(e).__name__}: {e}".splitlines()[0])

    def _end(self, r: Running, code: int) -> Optional[Job]:
        """Settle a job whose process ended without settling it (killed, crashed, stopped);
        the job as it is then (None: its run has another trainer now)."""
        try:
            job = self.registry.get(r.job_id)
        except JobNotFound:
            job = self._restore(r)
            self._say_notices()
            if job is None:
                return None
        if job.fence != r.fence:
            self.say(f"job {r.job_id}: no longer this worker's (now {job.state}, fence {job.fence})")
            return job
        if job.state in FINAL:
            self.say(f"job {r.job_id} ended: {job.state}" + (f": {job.error}" if job.error else ""))
            return job
        if r.forced:
            how = "with --force" if job.cancel == "force" else "(nothing to save)"
            self.registry.finish(r.job_id, CANCELLED, r.fence, error=f"cancelled {how}",
                                 log=f"cancelled {how}: stopped at once")
            self.say(f"job {r.job_id} ended: cancelled {how}")
        elif code == 0 and r.rank:  # rank 0's process settles a gang job's end
            self.say(f"job {r.job_id}: rank {r.rank} done")
        elif code == EXIT_ELSEWHERE:  # counted, unlike an interruption: a disk that stays full ends it
            self._crashed(job, job.error or "a write failed (still failing after the retries)")
        elif code == EXIT_INTERRUPTED or self.stopping:
            why = (f"worker {self.id} was stopped" if self.stopping or r.interrupted and not self.paused
                   else f"worker {self.id} paused ({self.paused})" if self.paused
                   else "its process saved and stopped (see its log: an outage)")
            self.registry.requeue(r.job_id, r.fence, why, interrupted=True)
            self.say(f"job {r.job_id} interrupted: back in the queue")
        elif r.rank is not None:
            why = f"no progress for {COLLECTIVE_TIMEOUT:.0f}s" if code == STALLED else f"exit code {code}"
            self._crashed(job, f"rank {r.rank} on worker {self.id} stopped ({why}): the gang stops")
        elif r.lost:  # killed here, unheard from past the lease: an outage, not a crash
            self.registry.requeue(r.job_id, r.fence, f"worker {self.id} lost the queue", interrupted=True)
            self.say(f"job {r.job_id} interrupted by the outage: back in the queue")
        else:
            self._crashed(job, f"job process died with exit code {code}")
        return self.registry.get(r.job_id)

    def _crashed(self, job: Job, reason: str) -> None:
        """A crash counts as an attempt: re-queue the job, or fail it after max_attempts."""
        if job.attempts < self.max_attempts:
            self.registry.requeue(job.id, job.fence, reason, interrupted=False)
        else:
            why = f"{reason} (attempt {job.attempts} of {self.max_attempts})"
            self.registry.finish(job.id, FAILED, job.fence, error=why, log=f"failed: {why}")
        self.say(f"job {job.id}: {reason}")

    def _power(self) -> None:
        """--when_idle / --on_battery: pause training while the Mac's owner is back or it runs
        on battery; running training jobs save and go back to the queue (an interruption,
        not an attempt). Looked at every few seconds; a no-op without a policy."""
        if not self.policy.active or time.monotonic() < self._next_power_look:
            return
        self._next_power_look = time.monotonic() + power.LOOK_SECONDS
        why = power.pause_reason(self.policy, self.probe.idle_seconds(), self.probe.on_battery())
        if why != self.paused:
            self.say(f"pausing training: {why}" if why else "resuming training")
            self.paused = why
        if why:
            self._interrupt_jobs("train")

    def _sweep(self) -> None:
        """Recover jobs of dead workers, re-push stranded claimable jobs, settle chains whose
        parent ended, fail records that do not decode, prune old ones."""
        now = self.registry.now()
        self.registry.skipped.clear()
        reconnecting = time.monotonic() - self.back_at < self.lease  # holders may be, too
        for job in self.registry.in_states(ACTIVE):
            if job.spec.driven:  # a sweep: no worker holds it, every worker drives it
                self._drive(job.id)
                continue
            if reconnecting:
                continue
            beat = job.heartbeat or job.started or job.created
            members = job.members  # a gang's heartbeat is its stalest member's
            if (job.id in self.running and not members) or now - beat <= self.lease:
                continue
            who = min(members, key=lambda m: m["heartbeat"])["worker"] if members else job.worker
            reason = f"worker {who} stopped heartbeating ({now - beat:.0f}s > lease {self.lease:.0f}s)"
            if job.state == CANCELLING:
                self.registry.finish(job.id, CANCELLED, job.fence, error=reason, log=f"cancelled: {reason}")
            else:
                self._crashed(job, reason)
        stranded = [j for j in self.registry.in_states(CLAIMABLE) if now - j.enqueued > self.lease
                    and j.nodes == 1] if self.registry.my_turn("stranded", self.lease / 2) else []
        if stranded:
            pending = {lane: self.queue.pending(lane) for lane in LANES}
            for job in stranded:
                if job.id not in pending[job.spec.lane]:
                    self.registry.update(job.id, enqueued=now)
                    self.queue.push(job.id, job.spec.lane, job.priority)
                    self.say(f"job {job.id} was in no queue (its entry was taken by a worker "
                             "that died before claiming it): queued again")
        self.registry.waiting_for_parents(self.lease)
        for bad in list(self.registry.skipped.values()):
            if bad.newer:
                continue  # a newer tlm's worker can run it
            if self.registry.fail_broken(bad.job_id, bad.reason):
                self.say(f"failed {bad}: it is not a job this tlm can read")
        if now - self._last_prune > 600:
            self._last_prune = now
            pruned = self.registry.prune(keep_runs=True)  # retention keeps the lab's runs listed
            if pruned:
                self.say(f"pruned {pruned} job(s) finished more than {self.keep_days:g} days ago")


def _signal(process, sig: int) -> None:
    try:
        os.kill(process.pid, sig)
    except (ProcessLookupError, TypeError):
        pass
