"""The job registry: the source of truth for every job, worker and log line.

One record per job, indexed by state and by run, so what a command or a
worker's sweep costs follows the live work, not the history. The rules of
each state change are written once, here, as pure ``change`` functions over
decoded ``Job`` records; a backend (a ``Store``: ``RedisStore`` for a lab of
many Macs, ``SqliteStore`` for one machine) only makes a read-modify-write of
one record atomic and keeps its indexes.

A gang job (``--nodes N``) is not claimed but gathered: N workers each
reserve a place in it (``reserve``: an entry in its ``members`` that expires
unless refreshed), and the reservation that completes it starts it, in the
same atomic step, with its members in rank order. Gangs are never in a
queue lane: workers find them through ``waiting_gangs``.

Finished jobs and their logs expire after ``keep_days`` (a Redis TTL, and a
prune run by workers on both backends). A record has one writer per field:
the CLI (cancel), the worker that holds the job's fencing token (state,
heartbeat) and its job process (progress); a worker that lost its lease
cannot publish over the new holder because every transition of a running
job names the fence it expects.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from typing import Any, Callable, Iterator, Optional

from tlm_worker.kinds import (ACTIVE, CANCELLED, CANCELLING, CLAIMABLE, FAILED, FINAL, INTERRUPTED,
                              KINDS, LIVE, PAUSED, QUEUED, RUNNING, SKIPPED, STATES, SUCCEEDED,
                              WAITING, BadRecord, Job, misfit, resolve)
from tlm_worker.placement import CAPABILITIES, unmet
from tlm_worker.queue import LANES, QUEUE_ERRORS, Queue, QueueError
from tlm_worker.registry.redis_store import RedisStore
from tlm_worker.registry.sqlite_store import SqliteStore
from tlm_worker.registry.store import MAX_LOG_LINES, STREAMS, WORKER_TTL, Store
from tlm_worker.runs import fold, sort_score
from tlm_worker.targets import canonical

__all__ = ["ACTIVE", "CANCELLED", "CANCELLING", "CLAIMABLE", "FAILED", "FINAL", "INTERRUPTED",
           "LIVE", "QUEUED", "RUNNING", "SKIPPED", "STATES", "SUCCEEDED", "WAITING", "Job",
           "JobNotFound", "LeaseLost", "MAX_LOG_LINES", "Registry", "RunBusy", "STREAMS", "Store"]

KEEP_DAYS = float(os.environ.get("TLM_KEEP_DAYS", "30"))
LAYOUT = 3  # of the lab's keys and tables: 3 added run summaries and lab values (tlm:lab:*, tlm_lab)
CLOCK_CHECK_SECONDS = 600.0  # how often a long-lived process reads the queue's clock again

HEAD = 32  # wake-ups a claim reads at the front of its lane
SCAN_SECONDS = 30.0  # the most often one registry reads every claimable job for a claim
CLAIM_FIELDS = ("id", "kind", "params", "run", "state", "priority", "needs", "enqueued", "version")
Change = Callable[[Job], Optional[dict[str, Any]]]


def _wake(queue: Queue, job: Job) -> None:
    """Push a claimable job's entry into its lane, at its priority; a gang is gathered, not
    popped: idle workers are only woken to look for it."""
    if job.state in CLAIMABLE:
        queue.push(job.id, job.spec.lane, job.priority) if job.nodes == 1 else queue.wake(job.spec.lane)


class JobNotFound(KeyError):
    def __init__(self, job_id: str, matches: int = 0):
        super().__init__(job_id, matches)

    def __str__(self) -> str:
        job_id, matches = self.args
        if matches > 1:
            return f"job prefix {job_id!r} matches {matches} jobs: give more characters"
        return f"no job {job_id!r}"


class RunBusy(RuntimeError):
    """The run already has a live training job (one trainer per run)."""

    def __init__(self, job: Job):
        super().__init__(f"{job.run_name} already has a {job.state} job {job.id} (one trainer per run)")
        self.job = job


class LeaseLost(RuntimeError):
    """This worker no longer holds the job (it was re-queued elsewhere)."""


class Registry:
    """Jobs, logs and workers over one store; every state change one atomic step."""

    def __init__(self, queue: Queue, keep_days: float = KEEP_DAYS):
        self.queue = queue
        self.keep_days = keep_days
        self.store: Store = RedisStore(queue.redis) if queue.redis is not None \
            else SqliteStore(queue.sqlite_path, queue.tries)
        self.skipped: dict[str, BadRecord] = {}  # live records that did not decode, by id (latest read)
        self._offset, self._offset_read = 0.0, -CLOCK_CHECK_SECONDS
        self._scanned: dict[str, float] = {}  # lane (or "gangs") -> when it last read every claimable job
        self._check_layout()
        if queue.storage.result_store_size():
            self._migrate()

    def _check_layout(self) -> None:
        """The lab's layout (its keys and tables) is recorded; a tlm older than it stops in one
        line (a newer one records its own): Macs are upgraded one at a time, never traced."""
        stored = self.store.value("layout") or self.store.first_value("layout", str(LAYOUT))
        if not stored.isdigit():
            raise QueueError(f"this lab's queue has a damaged layout record ({stored[:20]!r}, not a number): "
                             f"set it to {LAYOUT} (Redis: `SET tlm:lab:layout {LAYOUT}`; SQLite: "
                             f"`UPDATE tlm_lab SET value='{LAYOUT}' WHERE name='layout'`)")
        if int(stored) > LAYOUT:
            raise QueueError(f"this lab's queue was set up by a newer tlm (layout {stored}; this tlm "
                             f"reads {LAYOUT}): upgrade tlm on this Mac (`git pull && scripts/setup.sh`)")
        if int(stored) < LAYOUT:
            self.store.set_value("layout", str(LAYOUT))

    def now(self) -> float:
        """The queue's time. Every stamp in the registry is written and read by it, so workers
        on Macs whose clocks disagree (by more than a lease, even) agree on every lease."""
        read = time.monotonic()
        if read - self._offset_read >= CLOCK_CHECK_SECONDS:
            self._offset_read = read
            try:
                self._offset = self.queue.clock_offset()
            except QUEUE_ERRORS:  # the last offset until the queue answers
                self._offset_read = read - CLOCK_CHECK_SECONDS + 10
        return time.time() + self._offset

    # -- reading: records in, Jobs out; a record that does not decode is skipped ----------

    def _decode(self, records: list[dict[str, Any]]) -> list[Job]:
        jobs = []
        for record in records:
            try:
                jobs.append(Job.decode(record))
            except BadRecord as e:  # a finished one holds nothing: the worker that failed it said so
                if record.get("state") not in FINAL:
                    self.skipped[e.job_id] = e
        return jobs

    # -- jobs ------------------------------------------------------------------

    def create(self, kind: str, params: dict[str, Any], run_key: str, priority: int = 0,
               needs: Optional[dict[str, Any]] = None, after: Optional[str] = None,
               job_id: Optional[str] = None, sweep: Optional[dict[str, Any]] = None) -> Job:
        """Record a job and wake a worker; a second live trainer of a run raises RunBusy.

        ``after``: a job id; this one waits until that one succeeded (ends skipped otherwise).
        ``job_id``: a fixed id (a sweep's trial). A driven kind (a sweep) starts running.
        """
        params, run_key = canonical(self, params, run_key)
        now = self.now()
        parent = self.get(after) if after else None
        state = RUNNING if KINDS[kind].driven else WAITING if parent else QUEUED
        job = Job(id=job_id or uuid.uuid4().hex[:12], kind=kind, params=params, run=run_key,
                  state=state, created=now, enqueued=now, started=now if state == RUNNING else None,
                  priority=priority, needs=needs or {}, after=parent and parent.id, sweep=sweep)
        Job.decode(job.to_record())  # what we write must read back (BadRecord if not)
        busy = self.store.insert(job.to_record(), exclusive=job.spec.trainer)
        if busy is not None:
            raise RunBusy(self.get(busy))
        if parent is None:
            _wake(self.queue, job)
            return job
        added = self.change(parent.id, lambda p: {"followers": p.followers + [job.id]}
                             if p.state not in FINAL else None)
        return self._follow(job, added or self.get(parent.id))

    def get(self, job_id: str) -> Job:
        """A job by id or unique id prefix (JobNotFound for none, or a record that does not decode)."""
        found = self.find([job_id])
        if found:
            return found[0]
        matches = self.store.match_prefix(job_id, 2) if job_id else []
        found = self.find(matches[:1]) if len(matches) == 1 else []
        if not found:
            raise JobNotFound(job_id, len(matches))
        return found[0]

    def find(self, ids: list[str]) -> list[Job]:
        """The jobs with these exact ids that exist and decode."""
        return self._decode(self.store.read(ids))

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields other than the state (progress, checkpoint, result) of an existing job."""
        self.store.set_fields(job_id, fields)

    def jobs(self, limit: Optional[int] = 50, state: Optional[str] = None,
             run: Optional[str] = None, after: Optional[tuple[float, str]] = None) -> list[Job]:
        """Live jobs and the latest ``limit`` finished ones (None: all), oldest first; ``after``
        a finished job's (finish time, id), the page of those that ended before it (a page
        further back: then without the live ones)."""
        if run is not None:
            jobs = self.find(self.store.run_ids(run))
            live = [j for j in jobs if j.state in LIVE]
            done = [j for j in jobs if j.state in FINAL]
            done = done[:limit] if limit is not None else done  # run_ids is newest first
            jobs = [j for j in live + done if state in (None, j.state)]
        elif state in LIVE:
            jobs = self.in_states([state])
        else:
            jobs = self.in_states(LIVE) if state is None and after is None else []
            jobs += self._finished(limit, state, after)
        return sorted(jobs, key=lambda j: j.created)

    def trainers(self) -> list[Job]:
        """Every kept job that held its run's trainer (training jobs, sweeps), oldest first."""
        return sorted(self.find(self.store.trainer_ids()), key=lambda j: j.created)

    def in_states(self, states) -> list[Job]:
        """The jobs in these live states (through the state indexes: live work only)."""
        return self.find(self.store.ids_in(states))

    def _finished(self, limit: Optional[int], state: Optional[str],
                  after: Optional[tuple[float, str]] = None) -> list[Job]:
        """The newest finished jobs (after a cursor), optionally of one state."""
        out: list[Job] = []
        page = 1000 if limit is None else max(limit, 1) if state is None else max(limit, 100)
        for jobs in self.finished_pages(state, page, after):
            out += jobs
            if limit is not None and len(out) >= limit:
                break
        return out if limit is None else out[:limit]

    def finished_pages(self, state: Optional[str] = None, page: int = 500,
                       after: Optional[tuple[float, str]] = None) -> Iterator[list[Job]]:
        """Finished jobs, newest first, a page at a time (optionally of one state, after a
        job's (finish time, id)): each page costs the same however long the history (a
        cursor into the finish-time index, never an offset that the store counts past)."""
        cursor = after
        while True:
            ids, cursor = self.store.finished_page(cursor, page)
            if not ids:
                return
            jobs = [j for j in self.find(ids) if state in (None, j.state)]
            if jobs:
                yield jobs

    # -- state changes: each one atomic step of one record -----------------------

    @property
    def _ttl(self) -> float:
        """Seconds a finished job is kept."""
        return self.keep_days * 86400

    def change(self, job_id: str, fn: Change, expire: Optional[float] = None,
               log: Optional[str] = None, settle: bool = True) -> Optional[Job]:
        """Apply ``fn(job) -> changes`` atomically, with ``log`` appended to the job's log in
        the same step when it applies; a record that does not decode is left alone.
        A change that ends a job then starts or skips what waits on it (a chain; ``settle``)."""
        before: list[str] = []

        def raw(record: dict[str, Any]) -> Optional[dict[str, Any]]:
            try:
                job = Job.decode(record)
            except BadRecord:
                return None
            before[:] = [job.state]
            return fn(job)
        new = self.store.change(job_id, raw, expire, _stamped(log) if log else None)
        if new is None:
            return None
        job = Job.decode(new)
        if job.state in FINAL and before[0] not in FINAL:
            if job.spec.trainer and not job.spec.driven:
                self.summarize([job])
            if settle and job.followers:
                self._settle_chain(job)
        return job

    # -- runs: a summary per run, kept as its training jobs end ---------------------------

    def summarize(self, jobs: list[Job]) -> None:
        """Fold ended training jobs into their runs' summaries (what `tlm runs` and the
        dashboard's runs page read a page at a time, however many jobs ran)."""
        known = {k: json.loads(v) for k, v in self.store.get_runs(sorted({j.run for j in jobs})).items()}
        for job in jobs:
            fold(known, job)
        self.store.put_runs({k: (sort_score(row), json.dumps(row)) for k, row in known.items()})

    def run_summaries(self, cursor: Any = None, count: int = 100) -> tuple[list[dict[str, Any]], Any]:
        """A page of run summaries, best validation loss first (the first call builds them, once,
        from the training jobs a lab kept before summaries existed)."""
        if self.store.value("runs_summarized") is None:
            rows: dict[str, dict[str, Any]] = {}  # afresh (not over summaries): rebuilding twice is harmless
            for job in self.trainers():
                if job.state in FINAL and not job.spec.driven:
                    fold(rows, job)
            self.store.put_runs({k: (sort_score(row), json.dumps(row)) for k, row in rows.items()})
            self.store.first_value("runs_summarized", "1")
        rows, cursor = self.store.run_page(cursor, count)
        return [json.loads(r) for r in rows], cursor

    def run_summary(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.store.get_runs(keys).items()}

    def claim(self, job_id: str, worker_id: str,
              caps: Optional[dict[str, Any]] = None) -> Optional[Job]:
        """Take a claimable job for this worker with a new fencing token; None if not ours
        (taken, a gang, or a need these capabilities do not meet).

        A claimable job whose cancel was asked for while it ran ends cancelled here.
        """
        now = self.now()

        def take(job: Job):
            if job.state not in CLAIMABLE or job.nodes > 1:
                return None
            if job.cancel:
                return {"state": CANCELLED, "finished": now}
            if caps is not None and unmet(job.placement, caps):
                return None
            return {"state": RUNNING, "worker": worker_id, "attempts": job.attempts + 1,
                    "fence": job.fence + 1, "started": now, "heartbeat": now, "error": None}
        job = self.change(job_id, take, expire=self._ttl)
        return job if job is not None and job.state == RUNNING else None

    def claim_next(self, lane: str, worker_id: str, caps: dict[str, Any],
                   first: Optional[str] = None) -> Optional[Job]:
        """The best job of a lane this worker can run, claimed: highest priority first, then
        the longest waiting, among claimable jobs whose needs it meets. Each try is the one
        atomic claim above, so two workers never take one job; one that lost a race tries
        the next.

        What it reads does not grow with the queue: ``first``, the job the lane's queue
        woke this worker for (its most urgent wake-up), is tried alone; then the jobs of the
        lane's first HEAD wake-ups. Only when that head is full of jobs this worker cannot
        run (another's needs, a gang) does it read every claimable job, at most once every
        SCAN_SECONDS, for what lies past the head."""
        if first is not None:
            job = self.claim(first, worker_id, caps)
            if job is not None:
                return job
        ids = self.queue.head(lane, HEAD)
        job = self._claim_best(ids, lane, worker_id, caps)
        if job is None and len(ids) == HEAD and time.monotonic() - self._scanned.get(lane, -SCAN_SECONDS) \
                >= SCAN_SECONDS:
            self._scanned[lane] = time.monotonic()
            job = self._claim_best(self.store.ids_in(CLAIMABLE), lane, worker_id, caps)
        return job

    def _claim_best(self, ids: list[str], lane: str, worker_id: str, caps: dict[str, Any]) -> Optional[Job]:
        candidates = self._decode(self.store.read(ids, CLAIM_FIELDS))
        jobs = [j for j in candidates if j.state in CLAIMABLE and j.spec.lane == lane and j.nodes == 1
                and not unmet(j.placement, caps)]
        for job in sorted(jobs, key=lambda j: (-j.priority, j.enqueued)):
            claimed = self.claim(job.id, worker_id, caps)
            if claimed is not None:
                return claimed
        return None

    def finish(self, job_id: str, state: str, fence: Optional[int] = None, log: Optional[str] = None,
               **fields: Any) -> Optional[Job]:
        """End a live job (held under ``fence``, if given), its final ``log`` line written in
        the same step (a follower stops at the state and has the line; a stale holder
        writes neither); None if it was not. PAUSED ends a sweep trial's attempt at a rung
        (``promote`` queues it again): no worker holds it, a new fence voids the old holder,
        and a trial asked to stop meanwhile ends cancelled instead."""
        assert state in FINAL + (PAUSED,)
        now = self.now()

        def end(job: Job):
            if job.state not in LIVE or (fence is not None and job.fence != fence):
                return None
            worked = {"worked": job.worked + max(now - job.started, 0.0)} if job.state in ACTIVE and job.started else {}
            if state == PAUSED and not job.cancel:  # no finish time: only an ended job has one
                return {"state": PAUSED, "worker": None, "members": [], "fence": job.fence + 1, **worked, **fields}
            return {"state": CANCELLED if state == PAUSED else state, "finished": now, **worked, **fields}
        return self.change(job_id, end, expire=self._ttl, log=log)

    def requeue(self, job_id: str, fence: int, reason: str, interrupted: bool) -> Optional[Job]:
        """Give a held job back to the queue with a new fence (voiding the old holder).

        ``interrupted``: stopped on purpose (a worker's signal), so the attempt
        does not count against ``--max_attempts``.
        """
        now = self.now()

        def back(job: Job):
            if job.state not in ACTIVE or job.fence != fence:
                return None
            if job.cancel:  # asked to stop while it ran: it ends here, not on another worker
                return {"state": CANCELLED, "finished": now, "fence": fence + 1,
                        "error": f"cancelled ({reason})"}
            changes = {"state": INTERRUPTED, "worker": None, "fence": fence + 1, "error": reason,
                       "enqueued": now, "members": []}
            if interrupted:
                changes.update(attempts=job.attempts - 1, interruptions=job.interruptions + 1)
            return changes
        job = self.change(job_id, back, expire=self._ttl)
        if job is not None and job.state == CANCELLED:
            self.log(job_id, f"cancelled: {reason}")
        elif job is not None:
            self.log(job_id, f"re-queued: {reason}")
            _wake(self.queue, job)
        return job

    def cancel(self, job_id: str, force: bool = False) -> bool:
        """Cancel: a claimable, waiting or paused job ends at once (True); a held one is asked
        to stop (False). What waits on it is cancelled with it."""
        now = self.now()

        def drop(job: Job):
            if job.state not in CLAIMABLE + (WAITING, PAUSED):
                return None
            return {"state": CANCELLED, "finished": now, "cancel": "stop"}
        waiting, seen, frontier = [], {job_id}, [self.get(job_id)]
        while frontier:  # what waits on it, down the chain (however deep; a planted cycle ends)
            ids = list(dict.fromkeys(i for j in frontier for i in j.followers if i not in seen))
            seen.update(ids)
            frontier = [f for f in self.find(ids) if f.state == WAITING]
            waiting += frontier
        for follower in reversed(waiting):  # the farthest first: each ends cancelled, not skipped
            if self.change(follower.id, drop, expire=self._ttl) is not None:
                self.log(follower.id, f"cancelled with the job it waited for, {follower.after}")
        job = self.change(job_id, drop, expire=self._ttl)
        if job is None:
            self.update(job_id, cancel="force" if force else "stop")
        return job is not None

    def promote(self, job_id: str, **fields: Any) -> Optional[Job]:
        """Queue a paused trial again, to resume from its checkpoint, with ``fields`` (None
        unless it was paused: a promotion done twice queues it once)."""
        now = self.now()
        job = self.change(job_id, lambda j: {"state": QUEUED, "enqueued": now, "error": None, **fields}
                          if j.state == PAUSED and not j.cancel else None, log="promoted: queued to resume")
        if job is not None:
            _wake(self.queue, job)
        return job

    def retry(self, job_id: str) -> Job:
        """A new job doing what an ended one did (same kind, params, run, priority, needs)."""
        old = self.get(job_id)
        if old.state not in FINAL or old.spec.driven:
            raise ValueError(f"job {old.id} is {old.state}" if old.state not in FINAL
                             else "a sweep is not retried: submit it again")
        return self.create(old.kind, old.params, old.run, priority=old.priority, needs=old.needs)

    def mark_cancelling(self, job_id: str, fence: int) -> None:
        self.change(job_id, lambda job: {"state": CANCELLING}
                     if job.state == RUNNING and job.fence == fence else None)

    def check_fence(self, job_id: str, fence: int) -> None:
        """Raise LeaseLost unless ``fence`` is still the job's current token."""
        job = self.get(job_id)
        if job.fence != fence or job.state not in ACTIVE:
            raise LeaseLost(f"job {job_id} was taken over (fence {fence} -> {job.fence}, "
                            f"state {job.state}): not writing to its run")

    def fail_broken(self, job_id: str, reason: str) -> bool:
        """Fail a live record that does not decode (foreign or damaged), so it strands no
        worker and no run; True if it was failed here."""
        now = self.now()
        return self.store.change(job_id, lambda rec: {
            "state": FAILED, "finished": now, "error": f"unreadable job record: {reason}"}
            if rec.get("state") not in FINAL else None, expire=self._ttl) is not None

    # -- chains: --after JOB, --then ... -------------------------------------------------

    def _settle_chain(self, ended: Job) -> None:
        """Start or skip what waits on a job that ended, and on down the chain: a worklist, not
        recursion (a chain may be thousands deep, and a planted cycle must end)."""
        todo, seen = [ended], {ended.id}
        while todo:
            parent = todo.pop()
            for follower in self.find([i for i in parent.followers if i not in seen]):
                seen.add(follower.id)
                job = self._follow(follower, parent)
                if job.state in FINAL and job.followers:
                    todo.append(job)

    def _follow(self, follower: Job, parent: Optional[Job]) -> Job:
        """Start a waiting follower whose parent succeeded (pinned to the parent's final
        checkpoint), or end it skipped when the parent did not (or is gone); unchanged while
        the parent is live."""
        if parent is not None and parent.state not in FINAL:
            return follower
        now = self.now()

        def settle(job: Job):
            if job.state != WAITING:
                return None
            if parent is None or parent.state != SUCCEEDED:
                why = f"{parent.kind} job {parent.id} {parent.state}" if parent else \
                    f"job {job.after} is gone"
                return {"state": SKIPPED, "finished": now, "error": f"skipped: {why}"}
            params = job.params
            if job.spec.checkpoint_input and parent.checkpoint and not params.get("identifier"):
                params = {**params, "identifier": parent.checkpoint}
            return {"state": QUEUED, "enqueued": now, "params": params}
        job = self.change(follower.id, settle, expire=self._ttl, settle=False)  # the caller goes on down
        if job is None:
            return self.get(follower.id)
        if job.state == QUEUED:
            _wake(self.queue, job)
        return job

    def waiting_for_parents(self, grace: float) -> None:
        """Settle waiting jobs whose parent ended (a process that ended the parent died before
        settling them), or has been gone for ``grace`` seconds (a lease: the worker of a parent
        whose record Redis lost puts it back within one): the worker's sweep runs this."""
        now = self.now()
        for job in self.in_states([WAITING]):
            parent = next(iter(self.find([job.after] if job.after else [])), None)
            gone = job.progress.get("parent_gone_since")
            if parent is None and gone is None:
                self.update(job.id, progress={**job.progress, "parent_gone_since": now})
                continue
            if parent is None and now - gone < grace:
                continue
            if parent is not None and gone is not None:
                self.update(job.id, progress={k: v for k, v in job.progress.items() if k != "parent_gone_since"})
            ended = self._follow(job, parent)
            if ended.state in FINAL and ended.followers:
                self._settle_chain(ended)

    # -- gangs: N workers at once, all or nothing --------------------------------------

    def waiting_gangs(self) -> list[Job]:
        """Gang jobs waiting for members, highest priority then oldest first (every worker joins
        the first it can, so two gangs never split the workers between them). Read from the
        stores' index of gangs (a look costs the gangs, not the queue), and at a process's first
        look from every claimable job (a gang queued by a tlm before that index)."""
        ids = self.store.gang_ids(CLAIMABLE)
        if "gangs" not in self._scanned:
            self._scanned["gangs"] = time.monotonic()
            ids = self.store.ids_in(CLAIMABLE)
        return sorted((j for j in self.find(ids) if j.state in CLAIMABLE and j.nodes > 1),
                      key=lambda j: (-j.priority, j.created))

    def my_turn(self, chore: str, seconds: float) -> bool:
        """True for one process in the lab every ``seconds``: a chore every worker would
        otherwise repeat (reading every queued job) is done once."""
        now = self.now()
        return self.store.take_turn(chore, now, now + seconds)

    def reserve(self, job_id: str, worker_id: str, place: dict[str, Any],
                expires: float, caps: Optional[dict[str, Any]] = None) -> Optional[Job]:
        """Hold (or refresh) this worker's place in a waiting gang until ``expires``; places of
        others that expired are dropped. The place that completes the gang starts it: the job
        runs under a new fence, its members (in rank order) fixed. The job, or None if it no
        longer waits, this worker does not meet its needs, or another member holds the same
        address and port (two workers on one machine that chose a port at once: one tries
        another)."""
        now = self.now()

        def join(job: Job):
            if job.state not in CLAIMABLE:
                return None
            if job.cancel:
                return {"state": CANCELLED, "finished": now, "members": []}
            if caps is not None and unmet(job.placement, caps):
                return None
            places = [m for m in job.members if m["expires"] > now or m["worker"] == worker_id]
            if any(m["worker"] != worker_id and (m["address"], m["port"]) ==
                   (place["address"], place["port"]) for m in places):
                return None
            mine = next((m for m in places if m["worker"] == worker_id), None)
            if mine is None:
                places.append(mine := {"worker": worker_id})
            mine.update(place, expires=expires)
            if len(places) < job.nodes:
                return {"members": places}
            return {"members": [{**m, "heartbeat": now} for m in places], "state": RUNNING,
                    "worker": places[0]["worker"], "attempts": job.attempts + 1,
                    "fence": job.fence + 1, "started": now, "heartbeat": now, "error": None}
        return self.change(job_id, join, expire=self._ttl)

    def withdraw(self, job_id: str, worker_id: str) -> None:
        """Give up this worker's place in a gang that still waits."""
        self.change(job_id, lambda job: {"members": [m for m in job.members
                                                      if m["worker"] != worker_id]}
                     if job.state in CLAIMABLE else None)

    def heartbeat_member(self, job_id: str, worker_id: str, fence: int) -> Optional[Job]:
        """A gang member's heartbeat: the job's own heartbeat is its stalest member's, so a
        sweep re-queues the gang when any member's worker dies. None: the gang this member
        ran in is over (re-queued or ended elsewhere). JobNotFound: see ``restore``."""
        now = self.now()

        def beat(job: Job):
            if job.state not in ACTIVE or job.fence != fence:
                return None
            members = [{**m, "heartbeat": now} if m["worker"] == worker_id else m
                       for m in job.members]
            return {"members": members, "heartbeat": min(m["heartbeat"] for m in members)}
        job = self.change(job_id, beat)
        if job is None:  # gone (JobNotFound), over, or put back by a peer since the change read it
            job = self.get(job_id)
            job = self.change(job_id, beat) if job.state in ACTIVE and job.fence == fence else None
        return job

    # -- heartbeats, logs, followers ------------------------------------------------

    def heartbeat_job(self, job_id: str, fence: int) -> Optional[Job]:
        """A held job's heartbeat, under its fence: the job, or None if this holder lost it
        (re-queued, and perhaps taken by another worker: its fence moved on). JobNotFound: the
        registry no longer has it (Redis restarted without its data): see ``restore``."""
        now = self.now()
        job = self.change(job_id, lambda j: {"heartbeat": now}
                          if j.state in ACTIVE and j.fence == fence else None)
        if job is None:
            job = self.get(job_id)  # ended by its own process, or lost
        return job if job.fence == fence else None

    def restore(self, job: Job, worker_id: str) -> Optional[Job]:
        """Put back the record of a job this worker holds that the registry has forgotten (a
        Redis restarted without its data), as it was when claimed, so ``tlm status`` shows it
        and its end is recorded; a gang with all its members, whichever member's worker puts it
        back. None if its run has another live trainer by now (the holder then stops)."""
        now = self.now()
        record = {**job.to_record(), "state": RUNNING, "worker": job.worker if job.members else worker_id,
                  "heartbeat": now, "enqueued": now, "followers": [],
                  "members": [{**m, "heartbeat": now} for m in job.members]}
        if self.store.read([job.id], ("state",)):
            return self.get(job.id)  # restored meanwhile (by its job process's worker, or a peer)
        busy = self.store.insert(record, exclusive=job.spec.trainer)
        if busy == job.id:  # a peer (another member's worker) put it back between the two
            return self.get(job.id)
        if busy is not None:
            return None
        self.log(job.id, f"the registry had forgotten this job (Redis restarted without its data?): "
                         f"re-registered by worker {worker_id}, which holds it")
        return Job.decode(record)

    def log(self, job_id: str, line: str) -> None:
        self.store.append(job_id, "log", [_stamped(line)])

    def logs(self, job_id: str, after: Any = None) -> tuple[list[str], Any]:
        """Log lines after a cursor (None: all kept), and the cursor to pass next time."""
        return self.store.read_stream(job_id, "log", after)

    def add_point(self, job_id: str, record: dict[str, Any]) -> None:
        """A metrics.jsonl record, carried to machines that do not mount the save directory."""
        self.store.append(job_id, "points", [json.dumps(record)])

    def points(self, job_id: str, after: Any = None) -> tuple[list[dict[str, Any]], Any]:
        lines, cursor = self.store.read_stream(job_id, "points", after)
        return [json.loads(line) for line in lines], cursor

    @contextlib.contextmanager
    def changes(self) -> Iterator[Callable[[float], bool]]:
        """``wait(timeout) -> changed``: returns early, True, when any job changes or logs."""
        with self.store.waiter() as wait:
            yield wait

    # -- workers -------------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        self.store.put_worker(worker_id, {**info, "id": worker_id, "heartbeat": self.now()})

    def remove_worker(self, worker_id: str) -> None:
        self.store.drop_worker(worker_id)

    def workers(self) -> list[dict[str, Any]]:
        """Live workers' records; one that is not a JSON object with an id, or whose heartbeat
        is not a time or lies further ahead than a worker record lives (a clock far off, or a
        planted record), is skipped."""
        ahead = self.now() + WORKER_TTL
        live = [w for w in self.store.workers()
                if isinstance(w, dict) and isinstance(w.get("id"), str)
                and isinstance(w.get("heartbeat"), (int, float)) and w["heartbeat"] <= ahead]
        return [w if not misfit(w.get("capabilities") or {}, CAPABILITIES, "capabilities")
                else {**w, "capabilities": {}} for w in live]

    # -- retention and upgrades ----------------------------------------------------------

    def prune(self, older_than_days: Optional[float] = None, keep_runs: bool = False) -> int:
        """Delete jobs (and logs) finished more than the given days ago, and (unless
        ``keep_runs``) the summaries of the runs no job is left of; return how many jobs. The
        trials of a sweep that still runs stay (its round would take a missing one for a trial
        never created), and so does an ended sweep while one of its trials lives (it still
        reports to the sweep's study); a kind's ``forget`` deletes what else a record owns (a
        sweep's study). Wake-ups naming ended or deleted jobs leave the queue with them."""
        days = self.keep_days if older_than_days is None else older_than_days
        ids = self.store.finished_before(self.now() - days * 86400)
        woken = {lane: set(self.queue.head(lane)) for lane in LANES}  # read before what lives
        alive = self.in_states(LIVE)
        live = {j.id for j in alive if j.state in ACTIVE and j.spec.driven}
        reporting = {j.sweep.get("id") for j in alive if j.sweep}
        jobs = self.find(ids)
        kept = {j.id for j in jobs if (j.sweep and j.sweep.get("id") in live) or j.id in reporting}
        gone = [i for i in ids if i not in kept]
        self.store.delete(gone)
        for job in jobs:
            if job.id not in kept and job.spec.forget:
                resolve(job.spec.forget)(self, job.id)
        alive_ids = {j.id for j in alive}
        for lane, named in woken.items():  # an ended job is never queued again (retry: a new id)
            self.queue.forget(lane, named - alive_ids)
        if not keep_runs:  # a run's folder, under a save root, still lists it (tlm runs --save_root)
            runs = {j.run for j in jobs if j.id not in kept and j.spec.trainer}
            self.store.drop_runs([run for run in runs if not self.store.run_ids(run)])
        return len(gone)

    def _migrate(self) -> None:
        """Move records written by tlm 0.1 (in huey's result store) into this registry, once."""
        items = self.queue.storage.result_items()
        value = lambda key: json.loads(items[key]) if key in items else None  # noqa: E731
        for key in items:
            if not key.startswith("job:"):
                continue
            old = json.loads(items[key])
            hb = value(f"hb:{old['id']}")
            job = {"interruptions": 0, "enqueued": old["created"], "heartbeat": hb and hb["t"], "members": [],
                   "cancel": value(f"cancel:{old['id']}"), **old}
            if job["state"] in FINAL:
                job["finished"] = job["finished"] or job["created"]
            exclusive = job["kind"] in KINDS and KINDS[job["kind"]].trainer and job["state"] in LIVE
            if self.store.insert(job, exclusive, migrating=True) is None:
                self.store.append(old["id"], "log", value(f"log:{old['id']}") or [])
        self.queue.storage.flush_results()


def _stamped(line: str) -> str:
    return f"{time.strftime('%H:%M:%S')} {line}"
