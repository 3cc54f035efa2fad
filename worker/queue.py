"""The queue: huey's storage (Redis, or an embedded SQLite file) holding JSON only.

tlm-worker is its own consumer over huey's storage layer: huey's consumer
waits for running tasks on SIGINT, kills them on SIGTERM and never
re-delivers a task whose worker died, none of which fits hours-long training.
Queue entries and registry records are JSON; nothing read from the queue is
ever unpickled, so an entry written by someone else cannot run code here.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Optional

import platformdirs
import redis
from huey import RedisHuey, SqliteHuey
from huey.serializer import Serializer
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

QUEUE_NAME = "tlm"
# What an unreachable or restarting backend raises.
QUEUE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                sqlite3.OperationalError)


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


class Queue:
    """Jobs in, jobs out: ``push``/``pop`` JSON entries on a huey storage backend."""

    def __init__(self, url: Optional[str] = None):
        self.url = queue_url(url)
        self.serializer = JSONSerializer()
        if self.url.startswith(("redis://", "rediss://", "unix://")):
            # Fail in seconds when Redis is unreachable; ride out restarts with retries.
            pool = redis.ConnectionPool.from_url(
                self.url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=5, base=0.2), retries=int(os.environ.get(
                    "TLM_QUEUE_RETRIES", "12"))),
                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
            self.huey = RedisHuey(QUEUE_NAME, connection_pool=pool, serializer=self.serializer,
                                  read_timeout=1)
        elif self.url.startswith("sqlite://"):
            path = Path(self.url[len("sqlite://"):]).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.huey = SqliteHuey(QUEUE_NAME, filename=str(path), serializer=self.serializer,
                                   timeout=30)
        else:
            raise QueueError(f"unsupported queue URL {redact(self.url)!r}: use "
                             "redis://[:password@]host:port/db, rediss://..., or sqlite:///path")
        self.storage = self.huey.storage

    def push(self, job_id: str) -> None:
        self.storage.enqueue(self.serializer.serialize({"job": job_id}))

    def pop(self) -> Optional[str]:
        """The next job id, or None. Raises PayloadError for an entry that is not ours."""
        raw = self.storage.dequeue()
        if raw is None:
            return None
        entry = self.serializer.deserialize(raw)
        if not isinstance(entry, dict) or not isinstance(entry.get("job"), str):
            raise PayloadError("queue entry without a job id")
        return entry["job"]

    def ping(self) -> None:
        """Raise QueueError (one line, no password) unless the backend answers."""
        try:
            self.storage.queue_size()
        except QUEUE_ERRORS as e:
            raise QueueError(f"cannot reach the queue at {redact(self.url)}: {e}") from None
