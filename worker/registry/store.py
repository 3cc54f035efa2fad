"""The contract between the registry's rules and a backend: the primitives a store provides.

``Registry`` writes every rule once (who may claim, fence, end, re-queue, cancel, follow
a parent, gather a gang, prune) as pure ``change`` functions over decoded records. A
store only makes each primitive atomic and keeps its indexes; it decides nothing about
jobs. ``RedisStore`` and ``SqliteStore`` implement it, and one suite runs on both
(``tests/test_registry.py``, every test parametrized by backend).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, ContextManager, Optional, Protocol

MAX_LOG_LINES = 2000
MAX_POINTS = 20000  # metric records per job (a report every 10 steps: 200,000 steps)
STREAMS = {"log": MAX_LOG_LINES, "points": MAX_POINTS}  # per-job append-only lists, capped
WORKER_TTL = 120.0  # a worker record outlives its last heartbeat by this much

RawChange = Callable[[dict[str, Any]], Optional[dict[str, Any]]]  # what a store applies
Cursor = Any  # where a page, or a job's lines, left off: the store's own (a rank, a keyset, a number)


class Store(Protocol):
    """What a backend provides. Records are JSON-able dicts (a record that does not decode is
    still returned, marked ``_bad``); ids index by state, finish time, run and prefix."""

    # -- records: one atomic read-modify-write each
    def insert(self, job: dict[str, Any], exclusive: bool, migrating: bool = False) -> Optional[str]:
        """Add a record; with ``exclusive`` (a trainer), the id of its run's live trainer
        instead, if it has one (nothing written). ``migrating``: an id already there is kept."""

    def change(self, job_id: str, fn: RawChange, expire: Optional[float] = None,
               line: Optional[str] = None) -> Optional[dict[str, Any]]:
        """Apply ``fn(record) -> changes`` atomically (``fn`` may run again after a conflict),
        with ``line`` appended to the job's log in the same step; a final state frees the run's
        trainer and expires the record after ``expire`` seconds. The new record, or None."""

    def set_fields(self, job_id: str, fields: dict[str, Any]) -> None:
        """Overwrite fields other than the state, only while the record exists."""

    def read(self, ids: list[str], fields: Optional[tuple[str, ...]] = None) -> list[dict[str, Any]]:
        """The records that exist (or only ``fields`` of them, where that reads less)."""

    # -- indexes
    def ids_in(self, states: Any) -> list[str]: ...
    def gang_ids(self, states: Any) -> list[str]:
        """Ids of gang jobs (``--nodes`` over 1), at least those in these states (a superset:
        the registry reads each record): what a worker looks for, without every queued job."""
    def finished_page(self, cursor: Cursor, count: int) -> tuple[list[str], Cursor]:
        """Finished ids newest first after ``cursor`` (the last one's finish time and id; None:
        the newest): a page costs its rows, not the history."""
    def finished_before(self, before: float) -> list[str]: ...
    def trainer_ids(self) -> list[str]: ...
    def run_ids(self, run: str) -> list[str]:
        """A run's job ids, newest first."""
    def match_prefix(self, prefix: str, count: int) -> list[str]: ...
    def delete(self, ids: list[str]) -> None:
        """Forget finished jobs: records, lines and every index entry."""

    # -- a job's capped lists of lines (its log, its metric points)
    def append(self, job_id: str, stream: str, lines: list[str]) -> None:
        """Append, dropping the oldest past ``STREAMS[stream]``."""
    def read_stream(self, job_id: str, stream: str, after: Cursor) -> tuple[list[str], Cursor]:
        """The lines after ``after`` (None: all kept) and the cursor of the last."""

    def waiter(self) -> ContextManager[Callable[[float], bool]]:
        """``wait(timeout) -> changed``: True early when any job changes or logs."""

    # -- workers: records that lapse WORKER_TTL after their heartbeat
    def put_worker(self, worker_id: str, record: dict[str, Any]) -> None: ...
    def drop_worker(self, worker_id: str) -> None: ...
    def workers(self) -> list[Any]:
        """The live workers' records as stored (the registry checks them)."""

    # -- lab-wide values and run summaries
    def first_value(self, name: str, value: str) -> str:
        """``value`` if ``name`` has none yet (then stored), else the one stored first."""
    def value(self, name: str) -> Optional[str]: ...
    def set_value(self, name: str, value: str) -> None: ...
    def take_turn(self, name: str, now: float, until: float) -> bool:
        """True for one caller until ``until`` (the queue's clock): a lab-wide chore's turn."""
    def put_runs(self, rows: dict[str, tuple[float, str]]) -> None:
        """Run summaries: key -> (sort score, the row as JSON)."""
    def get_runs(self, keys: list[str]) -> dict[str, str]: ...
    def drop_runs(self, keys: list[str]) -> None:
        """Forget these runs' summaries (runs no job is left of, after a prune)."""
    def run_page(self, cursor: Cursor, count: int) -> tuple[list[str], Cursor]:
        """Summaries, lowest score first, after ``cursor``."""


def loads(text: Any) -> Any:
    """JSON, or None for text that is not (a record someone else wrote)."""
    with contextlib.suppress(TypeError, UnicodeDecodeError, json.JSONDecodeError):
        return json.loads(text)
    return None
