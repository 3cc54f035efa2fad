"""The job registry: job records, logs, cancel flags, heartbeats and fencing tokens.

Everything lives in the queue's own key-value store (huey's result store: a
Redis hash or a SQLite table), so Redis users and single-machine users get the
same behaviour from one implementation. Each key has one writer at a time:

* ``job:<id>``    the record: the CLI while queued, the worker that claimed it
                  while running, a recovering worker after its lease expired;
* ``hb:<id>``     the running job's heartbeat (the worker's heartbeat thread);
* ``log:<id>``    log lines (the process running the job);
* ``cancel:<id>`` "stop" or "force" (the CLI);
* ``worker:<id>`` a worker's host, pid, device, heartbeat and current job.

Claims use ``put_if_empty`` (atomic in both backends) and fencing tokens an
atomic counter, so two workers never run one job and a worker that lost its
lease cannot publish a checkpoint over a newer one.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

from huey.constants import EmptyData

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
CANCELLED, SUCCEEDED, FAILED, INTERRUPTED = "cancelled", "succeeded", "failed", "interrupted"
LIVE = (QUEUED, RUNNING, CANCELLING, INTERRUPTED)  # interrupted jobs are back in the queue
FINAL = (CANCELLED, SUCCEEDED, FAILED)
MAX_LOG_LINES = 2000


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


class LeaseLost(RuntimeError):
    """This worker no longer holds the job (it was re-queued elsewhere)."""


class Registry:
    def __init__(self, queue):
        self.queue = queue
        self.storage = queue.storage

    # -- raw JSON values -----------------------------------------------------

    def _get(self, key: str) -> Any:
        raw = self.storage.peek_data(key)
        return None if raw is EmptyData else json.loads(raw)

    def _put(self, key: str, value: Any) -> None:
        self.storage.put_data(key, json.dumps(value).encode())

    # -- jobs ------------------------------------------------------------------

    def create(self, kind: str, params: dict[str, Any], run_key: str) -> dict[str, Any]:
        job = {"id": uuid.uuid4().hex[:12], "kind": kind, "params": params, "run": run_key,
               "state": QUEUED, "worker": None, "attempts": 0, "fence": 0,
               "created": time.time(), "started": None, "finished": None,
               "progress": {}, "checkpoint": None, "error": None, "result": None}
        self._put(f"job:{job['id']}", job)
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        """A job by id or unique id prefix."""
        job = self._get(f"job:{job_id}")
        if job is None:
            matches = [j for j in self.jobs() if j["id"].startswith(job_id)] if job_id else []
            if len(matches) != 1:
                raise JobNotFound(job_id)
            job = matches[0]
        return job

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        job = self.get(job_id)
        job.update(fields)
        self._put(f"job:{job_id}", job)
        return job

    def jobs(self) -> list[dict[str, Any]]:
        """All job records, oldest first."""
        items = self.storage.result_items()
        out = [json.loads(v) for k, v in items.items()
               if (k.decode() if isinstance(k, bytes) else k).startswith("job:")]
        return sorted(out, key=lambda j: j["created"])

    def live_job_for_run(self, run_key: str) -> Optional[dict[str, Any]]:
        """The queued or running training job of a run (one trainer per run)."""
        return next((j for j in self.jobs() if j["run"] == run_key and j["kind"] == "train"
                     and j["state"] in LIVE), None)

    def claim(self, job: dict[str, Any], worker_id: str) -> Optional[int]:
        """Take a queued job for this worker; return its fencing token, or None if taken."""
        attempt = job["attempts"] + 1
        if not self.storage.put_if_empty(f"claim:{job['id']}:{attempt}", worker_id.encode()):
            return None
        fence = self.storage.incr(f"fence:{job['id']}")
        self.heartbeat_job(job["id"], worker_id)
        self.update(job["id"], state=RUNNING, worker=worker_id, attempts=attempt, fence=fence,
                    started=time.time(), error=None)
        return fence

    def check_fence(self, job_id: str, fence: int) -> None:
        """Raise LeaseLost unless ``fence`` is still the job's current token."""
        job = self.get(job_id)
        if job["fence"] != fence or job["state"] not in (RUNNING, CANCELLING):
            raise LeaseLost(f"job {job_id} was taken over (fence {fence} -> {job['fence']}, "
                            f"state {job['state']}): not saving")

    def requeue(self, job_id: str, reason: str) -> None:
        """Put an interrupted job back in the queue (a new fence voids the old holder)."""
        fence = self.storage.incr(f"fence:{job_id}")
        self.update(job_id, state=INTERRUPTED, worker=None, fence=fence, error=reason)
        self.log(job_id, f"re-queued: {reason}")
        self.queue.push(job_id)

    # -- heartbeats, cancel flags, logs ---------------------------------------

    def heartbeat_job(self, job_id: str, worker_id: str) -> None:
        self._put(f"hb:{job_id}", {"t": time.time(), "worker": worker_id})

    def job_heartbeat(self, job_id: str) -> Optional[float]:
        hb = self._get(f"hb:{job_id}")
        return hb["t"] if hb else None

    def request_cancel(self, job_id: str, force: bool = False) -> None:
        self._put(f"cancel:{job_id}", "force" if force else "stop")

    def cancel_requested(self, job_id: str) -> Optional[str]:
        return self._get(f"cancel:{job_id}")

    def log(self, job_id: str, line: str) -> None:
        lines = self._get(f"log:{job_id}") or []
        lines.append(f"{time.strftime('%H:%M:%S')} {line}")
        self._put(f"log:{job_id}", lines[-MAX_LOG_LINES:])

    def logs(self, job_id: str) -> list[str]:
        return self._get(f"log:{job_id}") or []

    # -- workers ---------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        self._put(f"worker:{worker_id}", {**info, "id": worker_id, "heartbeat": time.time()})

    def remove_worker(self, worker_id: str) -> None:
        self.storage.delete_data(f"worker:{worker_id}")

    def workers(self) -> list[dict[str, Any]]:
        items = self.storage.result_items()
        return [json.loads(v) for k, v in items.items()
                if (k.decode() if isinstance(k, bytes) else k).startswith("worker:")]
