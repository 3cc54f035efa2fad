"""The queue: huey's storage (Redis, or an embedded SQLite file) holding JSON only.

The queue only wakes workers: the job registry is the source of truth, and a
job runs only after a worker claims its record. An entry lost between a
worker's dequeue and its claim is pushed again by a sweep; a duplicate entry
is dropped at the claim. Two lanes, so a sample never waits behind training:
``train`` for training jobs and ``interactive`` for sample, eval and export
jobs (each kind's lane is in ``tlm_worker.kinds.KINDS``). Entries carry their
job's priority, in huey's priority storage (``PriorityRedisStorage``, and
``SqliteStorage``, which orders by priority), so the most urgent wake-up comes
first; the claim itself picks the best job a worker can run.

tlm-worker is its own consumer over huey's storage layer: huey's consumer
waits for running tasks on SIGINT, kills them on SIGTERM and never
re-delivers a task whose worker died, none of which fits hours-long training.
Queue entries and registry records are JSON; nothing read from the queue is
ever unpickled, so an entry written by someone else cannot run code here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import platformdirs
import redis
from huey import PriorityRedisHuey, SqliteHuey
from huey.serializer import Serializer
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tlm_worker.kinds import INTERACTIVE, TRAINING

QUEUE_NAME = "tlm"
WAKE_CHANNEL = f"{QUEUE_NAME}:wake"  # Redis publishes the lane of each push here
BUSY_SECONDS = 30  # how long an SQLite connection waits for a write lock, per try
BUSY_TRIES = 3  # a patient caller's tries at an SQLite file kept busy (each waits BUSY_SECONDS)
LANES = {TRAINING: QUEUE_NAME, INTERACTIVE: f"{QUEUE_NAME}-interactive"}  # lane: huey queue name
# What an unreachable or restarting backend raises, or one that refuses writes for now (Redis
# at its maxmemory with noeviction, a read-only replica): an outage, waited out, never an attempt.
QUEUE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                sqlite3.OperationalError)


def waiting_out_busy(step: Callable[[], Any], tries: int) -> Any:
    """``step()``, tried again while an SQLite file stays locked (each try waits BUSY_SECONDS);
    only for steps that write nothing when they fail to take the lock."""
    for tried in range(1, tries + 1):
        try:
            return step()
        except sqlite3.OperationalError as e:
            if tried == tries or "locked" not in str(e):
                raise


def outage(error: Exception) -> str:
    """What a queue error means, in a few words: SQLite's "database is locked" is a file that
    another process kept busy past the wait, not an unreachable queue."""
    why = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, sqlite3.OperationalError) and ("locked" in why or "busy" in why):
        return "the queue file is busy: another process keeps it locked (tlm waited; try again)"
    return why


class QueueError(RuntimeError):
    """The queue is unreachable or misconfigured; the message is one line for the user."""


class PayloadError(ValueError):
    """A queue entry that is not one of our JSON messages."""


class JSONSerializer(Serializer):
    """huey's serializer hook, with JSON in place of pickle."""

    def _serialize(self, data: Any) -> bytes:
        return json.dumps(data).encode()

    def _deserialize(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PayloadError(f"not a JSON queue entry ({e.__class__.__name__})") from None


def default_queue_path() -> Path:
    return Path(platformdirs.user_data_dir("tlm")) / "queue.db"


def queue_url(url: Optional[str] = None) -> str:
    """The queue to use: the argument, ``TLM_QUEUE``, or the embedded SQLite file."""
    return url or os.environ.get("TLM_QUEUE") or f"sqlite://{default_queue_path()}"


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//([^@/]*):[^@/]*@", r"//\1:***@", url)


@contextlib.contextmanager
def subscribed(client: redis.Redis, channel: str, burst: float) -> Iterator[Callable[[float], bool]]:
    """``wait(timeout) -> True`` when a message came on ``channel`` (False at the timeout); the
    messages that follow within ``burst`` seconds are the same wake-up."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)

    def wait(timeout: float) -> bool:
        if pubsub.get_message(timeout=timeout) is None:
            return False
        while pubsub.get_message(timeout=burst) is not None:
            pass
        return True
    try:
        yield wait
    finally:
        pubsub.close()


class Queue:
    """Job ids in, job ids out: ``push``/``pop`` JSON entries per lane on huey's storage.

    ``redis`` (a redis-py client) or ``sqlite_path`` tells the registry where
    to keep its records: the same server or file as the queue.
    """

    def __init__(self, url: Optional[str] = None, patient: bool = True):
        """``patient``: each Redis command rides out a restart (retries for about a minute),
        as a command-line user wants; a worker and its job processes are not patient: they
        must stay responsive to signals and leases, and handle an outage themselves."""
        self.url = queue_url(url)
        self.tries = BUSY_TRIES if patient else 1  # at a busy SQLite file
        self.serializer = JSONSerializer()
        self.redis: Optional[redis.Redis] = None
        self.sqlite_path: Optional[Path] = None
        if self.url.startswith(("redis://", "rediss://", "unix://")):
            parts = urllib.parse.urlsplit(self.url)
            db = urllib.parse.parse_qs(parts.query).get("db", [""])[0] if parts.scheme == "unix" \
                else parts.path.strip("/")
            if db and not db.isdigit():
                raise QueueError(f"queue URL {redact(self.url)}: the database must be a number, "
                                 f"not {db!r}")
            # Ride out restarts with retries (ping() first checks that Redis was there at all).
            retries = int(os.environ.get("TLM_QUEUE_RETRIES", "12")) if patient else 1
            try:
                pool = redis.ConnectionPool.from_url(
                    self.url, socket_connect_timeout=5 if patient else 2,
                    socket_timeout=10 if patient else 3, health_check_interval=30,
                    retry=Retry(ExponentialBackoff(cap=5 if patient else 0.5, base=0.2), retries=retries),
                    retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
            except ValueError as e:
                raise QueueError(f"queue URL {redact(self.url)}: {e}") from None
            self.redis = redis.Redis(connection_pool=pool)
            self.lanes = {lane: PriorityRedisHuey(name, connection_pool=pool, serializer=self.serializer,
                                                  blocking=False).storage for lane, name in LANES.items()}
        elif self.url.startswith("sqlite://"):
            self.sqlite_path = Path(self.url[len("sqlite://"):]).expanduser()
            if self.sqlite_path == default_queue_path():
                self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            elif not self.sqlite_path.parent.is_dir():
                raise QueueError(f"queue URL {redact(self.url)}: no directory "
                                 f"{self.sqlite_path.parent} (create it first)")
            self.lanes = {lane: waiting_out_busy(  # huey creates its tables, in a write
                lambda name=name: SqliteHuey(name, filename=str(self.sqlite_path), serializer=self.serializer,
                                             timeout=BUSY_SECONDS).storage, self.tries)
                for lane, name in LANES.items()}
        else:
            raise QueueError(f"unsupported queue URL {redact(self.url)!r}: use "
                             "redis://[:password@]host:port/db, rediss://..., or sqlite:///path")
        self.storage = self.lanes[TRAINING]  # huey's result store held the registry before 0.2

    def _upgrade_lanes(self) -> None:
        """Entries that tlm before priorities left in a Redis list move into the sorted set
        huey's priority storage keeps under the same key (at normal priority)."""
        for storage in self.lanes.values():
            if self.redis.type(storage.queue_key) == b"list":
                entries = self.redis.lrange(storage.queue_key, 0, -1)
                self.redis.delete(storage.queue_key)
                for raw in reversed(entries):  # huey's list: newest on the left
                    storage.enqueue(raw, 0)

    def push(self, job_id: str, lane: str, priority: int = 0) -> None:
        entry = self.serializer.serialize({"job": job_id})
        waiting_out_busy(lambda: self.lanes[lane].enqueue(entry, priority), self.tries)
        self.wake(lane)

    def wake(self, lane: str) -> None:
        """Tell idle workers (on Redis) that a lane has work: a push, or a gang to gather."""
        if self.redis is not None:
            self.redis.publish(WAKE_CHANNEL, lane)

    @contextlib.contextmanager
    def wakeups(self) -> Iterator[Optional[Callable[[float], bool]]]:
        """``wait(timeout) -> woken``: returns at once, True, when a job is pushed to a lane
        (Redis publishes each push), so an idle worker waits without polling; None on the
        embedded queue (a worker polls its local file, which costs no network)."""
        if self.redis is None:
            yield None
            return
        with subscribed(self.redis, WAKE_CHANNEL, burst=0.0) as wait:
            yield wait

    def pop(self, lane: str) -> Optional[str]:
        """The lane's next job id, or None. Raises PayloadError for an entry that is not ours."""
        raw = self.lanes[lane].dequeue()
        return None if raw is None else self._job_id(raw)

    def head(self, lane: str, count: Optional[int] = None) -> list[str]:
        """The job ids of a lane's first ``count`` wake-ups (all: None), most urgent first, left
        in place; an entry that is not ours is skipped."""
        ids = (self._named(raw) for raw in self.lanes[lane].enqueued_items(limit=count))
        return [i for i in ids if i is not None]

    def forget(self, lane: str, job_ids: set[str]) -> int:
        """Remove the lane's wake-ups naming these jobs (ended or deleted ones: a wake-up is
        otherwise only dropped when a worker pops it); return how many."""
        storage = self.lanes[lane]
        if self.redis is not None:  # huey prefixes each entry with 8 bytes of time
            stale = [raw for raw in self.redis.zrange(storage.queue_key, 0, -1)
                     if self._named(raw[8:]) in job_ids]
            return self.redis.zrem(storage.queue_key, *stale) if stale else 0
        rows = [(storage.name, self.serializer.serialize({"job": i})) for i in job_ids]
        with storage.db(commit=True) as cursor:
            cursor.executemany("DELETE FROM task WHERE queue = ? AND data = ?", rows)
            return cursor.rowcount

    def pending(self, lane: str) -> set[str]:
        """The job ids waiting in a lane (a short list: live work only)."""
        return set(self.head(lane))

    def _named(self, raw: bytes) -> Optional[str]:
        """The job an entry names; None for an entry that is not ours."""
        try:
            return self._job_id(raw)
        except PayloadError:
            return None

    def _job_id(self, raw: bytes) -> str:
        entry = self.serializer.deserialize(raw)
        if not isinstance(entry, dict) or not isinstance(entry.get("job"), str):
            raise PayloadError("queue entry without a job id")
        return entry["job"]

    def clock_offset(self) -> float:
        """Seconds to add to this machine's clock to read the queue's: Redis's TIME, taken mid
        round trip; 0 for SQLite, whose workers all share one machine's clock."""
        if self.redis is None:
            return 0.0
        before = time.time()
        sec, usec = self.redis.time()
        return sec + usec / 1e6 - (before + time.time()) / 2

    def probe(self) -> None:
        """One round trip on this queue's own connections (QUEUE_ERRORS if it is down): for
        Redis a small write, since one that refuses writes still answers a ping."""
        if self.redis is not None:
            self.redis.set(f"{QUEUE_NAME}:probe", b"1", ex=60)
        else:
            self.storage.queue_size()

    def ping(self) -> None:
        """Raise QueueError (one line, no password) unless the backend answers.

        Redis is asked once without retries: an unknown host, a refused port or
        a wrong password is an answer in seconds; retries are for a Redis that
        was there and went away.
        """
        try:
            if self.redis is None:
                self.storage.queue_size()
            else:
                once = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=10,
                                            retry=Retry(ExponentialBackoff(), 0))
                try:
                    once.ping()
                finally:
                    once.close()
                self._upgrade_lanes()  # it answers: the lanes can be read
        except (*QUEUE_ERRORS, redis.exceptions.RedisError) as e:
            why = outage(e)
            if "WRONGPASS" in why or "invalid username-password" in why:
                why = "wrong password"
            elif "NOAUTH" in why or "authenticated" in why or "Authentication required" in why:
                why = "Redis asks for a password: redis://:PASSWORD@host:port/db"
            raise QueueError(f"cannot reach the queue at {redact(self.url)}: {why}") from None
