"""tlm-worker: take jobs from the queue and run each in a spawned child process.

Lanes: ``--concurrency`` training slots, and beside them one interactive slot
for sample and eval jobs (in a long-lived sampler process), so a sample never
waits behind hours of training. A queue entry only wakes the worker: it runs
the job only if its claim of the job's record succeeds.

Signals: the first SIGINT or SIGTERM stops taking jobs and forwards one
SIGINT to each running job, which finishes its step, saves, and is re-queued
as interrupted for another worker to resume (an interruption, not an
attempt); a second signal kills the jobs, re-queues them and exits at once.

Gangs (``tlm submit train --nodes N``): see ``tlm_worker.gangs``. A member
whose gang was re-queued or ended elsewhere (a peer died, was stopped, or
stalled) kills its rank, which would wait in a collective.

Beside its jobs a worker does its chores (``tlm_worker.chores``): heartbeats,
the backstop, the power policy, recovering dead workers' jobs, driving
sweeps, pruning; each a small periodic task at its own pace.

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

from tlm_worker import chores, endings, power
from tlm_worker.chores import IDLE_POLL, kill
from tlm_worker.gangs import Gangs
from tlm_worker.jobs import run_job
from tlm_worker.kinds import INTERACTIVE, TRAINING
from tlm_worker.outage import Outage
from tlm_worker.queue import LANES, PayloadError, Queue
from tlm_worker.registry import CLAIMABLE, FAILED, FINAL, Job, Registry
from tlm_worker.targets import check_save_root
from tlm_worker.trainer_hooks import SELF_FENCE

SPAWN = multiprocessing.get_context("spawn")
IDLE_WAIT = 1.0  # the longest an idle worker's loop waits for a wake-up (signals are seen after it)


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

    def idle(self, seconds: float, running) -> bool:
        """Closed (True) once it has run no job for ``seconds`` and none of ``running`` is in it."""
        if time.monotonic() - self.last_used <= seconds or any(r.lane == INTERACTIVE for r in running):
            return False
        self.close()
        return True

    def close(self) -> None:
        kill(self.process, signal.SIGKILL)
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
    idle_until: dict[str, float] = field(default_factory=dict)  # lane -> no pops before (nothing fit)

    def __post_init__(self) -> None:
        self.queue = Queue(self.url, patient=False)
        self.queue.ping()  # a misconfigured queue is a one-line error at once
        self.outage = Outage(self.queue, self.say, self.lease * SELF_FENCE, lambda: self.stopping)
        self._try = self.outage.call  # every queue call of the loop, the heartbeat and the chores
        self.registry = Registry(self.queue, self.keep_days)
        self.lock = threading.Lock()
        self.done_event = threading.Event()  # set: the loop has ended (the heartbeat thread too)
        self.beat_now = threading.Event()  # set: heartbeat now (a job started)
        self.wakeup: Optional[Callable[[float], bool]] = None  # Redis: wait for a push (Queue.wakeups)
        self.gangs = Gangs(self)
        self.chores = chores.chores()
        self.address = self.address or local_address(self.queue)
        # the lab's token, and None if this worker's save root is the lab's shared folder
        self.lab_token, self.not_lab_root = check_save_root(self.registry, self.save_root)
        self.caps = chores.worker_capabilities(self)
        self.probe = power.probe()
        self.paused: Optional[str] = None  # why training is paused (--when_idle, --on_battery)
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
                kill(r.process, signal.SIGKILL)

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
                kill(r.process, signal.SIGINT)

    def _abandon_jobs(self) -> None:
        """Kill the running jobs and re-queue the unfinished ones (one try each: exiting
        must not wait on an unreachable queue; other workers recover what is missed)."""
        for r in list(self.running.values()):
            kill(r.process, signal.SIGKILL)
            r.process.join(5)
            self.unsettled.append((r, r.process.exitcode))
        self._settle()

    # -- the main loop -------------------------------------------------------------

    def run(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        chores.greet(self)
        self._try(chores.heartbeat, self)
        threading.Thread(target=chores.heartbeat_loop, args=(self,), daemon=True).start()
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
                busy = self._reap()
                if self.unsettled:
                    self._try(self._settle)
                took = not self.stopping and not self.paused and bool(self._try(self.gangs.step))
                for lane in LANES:
                    if not self.stopping and self._free(lane) and not (self.paused and lane == TRAINING):
                        took = self._try(self._take, lane) or took
                busy = took or busy
                chores.tend(self)
                if self.burst and not (took or self.running or self.gangs.reservation):
                    left = self._try(chores.left_for_burst, self)
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
            self.done_event.set()
            self._try(self.gangs.withdraw)
            if self.sampler is not None:
                self.sampler.close()
            self._try(self.registry.remove_worker, self.id)
        self.say("stopped")

    def _wait(self) -> None:
        """Until a job process ends, a job is queued (a wake-up), or the next poll."""
        sentinels = [r.process.sentinel for r in self.running.values()]
        if sentinels:
            multiprocessing.connection.wait(sentinels, self.poll)
        elif self.wakeup is not None and self.outage.down_since is None:
            if self._try(self.wakeup, IDLE_WAIT):
                self._woken()
        else:
            time.sleep(self.poll)

    def _free(self, lane: str) -> bool:
        held = sum(r.lane == lane for r in self.running.values())
        if lane == TRAINING:
            return held + (self.gangs.reservation is not None) < self.concurrency
        return held < 1

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
        self.gangs.next_look = 0.0

    def _start(self, job: Job, lane: str, rank: Optional[int] = None) -> None:
        """Run a job this worker holds (or its rank of a gang job) in a process of its own."""
        args = (self.url, job.id, job.fence, self.save_root, self.gpu, rank, self.lease)
        if self.sampler is None:  # with the first job of any kind: see Sampler
            self.sampler = Sampler()
        if lane == INTERACTIVE:
            process = self.sampler.run(args)
        else:
            process = SPAWN.Process(target=run_job, args=args, name=f"tlm-job-{job.id}")
            process.start()
        with self.lock:
            self.running[job.id] = Running(job, job.fence, lane, process, rank=rank,
                                           awake=power.keep_awake(process.pid))
        self.beat_now.set()  # its heartbeats start now, not at the end of an idle wait
        self.say(f"started {job.kind} job {job.id} (attempt {job.attempts}"
                 + (f", {job.interruptions} interruption(s)" if job.interruptions else "")
                 + (f", rank {rank} of {job.nodes}" if rank is not None else "")
                 + f", pid {process.pid})")

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
        if self.sampler is not None and self.sampler.idle(self.interactive_idle, self.running.values()):
            self.sampler = None
            self.say(f"interactive process idle for {self.interactive_idle:g}s: closed, its memory given back")
        if finished:
            self._try(self._settle)
        return bool(finished)

    def _settle(self) -> None:
        """Settle ended job processes' jobs, oldest first (a queue error keeps the rest)."""
        while self.unsettled:
            r, code = self.unsettled[0]
            job = endings.end(self, r, code)
            self.unsettled.pop(0)
            if job is None:
                continue
            self.failed += job.state == FAILED
            self.done += job.state in FINAL
            if job.sweep:  # a trial ended: its sweep takes the next one now, not at the next sweep
                chores.drive(self, job.sweep["id"])
