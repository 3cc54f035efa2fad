"""The registry's store in SQLite: a lab on one machine, in the embedded queue's own file.

One row per job with indexed columns (state, run, finish time), the record as JSON;
a partial unique index for "one live trainer per run"; ``BEGIN IMMEDIATE`` for each
change (WAL mode: readers never wait); followers watch SQLite's ``data_version``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator, Optional

from tlm_worker.kinds import LIVE
from tlm_worker.queue import BUSY_SECONDS, waiting_out_busy
from tlm_worker.registry.store import STREAMS, WORKER_TTL, RawChange, loads


class SqliteStore:
    """The ``Store`` in one SQLite file; see the module docstring."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS tlm_job (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, run TEXT NOT NULL, state TEXT NOT NULL,
        created REAL NOT NULL, finished REAL, record TEXT NOT NULL, trainer INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX IF NOT EXISTS tlm_job_state ON tlm_job (state);
    CREATE INDEX IF NOT EXISTS tlm_job_run ON tlm_job (run, created);
    CREATE INDEX IF NOT EXISTS tlm_job_finished ON tlm_job (finished, id);
    CREATE TABLE IF NOT EXISTS tlm_line (
        job TEXT NOT NULL, stream TEXT NOT NULL, n INTEGER NOT NULL, line TEXT NOT NULL,
        PRIMARY KEY (job, stream, n));
    CREATE TABLE IF NOT EXISTS tlm_worker (
        id TEXT PRIMARY KEY, heartbeat REAL NOT NULL, record TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS tlm_lab (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS tlm_run (key TEXT PRIMARY KEY, score REAL NOT NULL, row TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS tlm_run_score ON tlm_run (score, key);
    """

    def __init__(self, path, tries: int = 1):
        """``tries``: a write's tries at a file another process keeps busy (a command-line
        user waits; a worker handles a busy file as an outage itself)."""
        self.path = str(path)
        self.tries = tries
        self._local = threading.local()
        waiting_out_busy(self._create, tries)

    def _create(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(self.SCHEMA)
        self._upgrade()

    def _upgrade(self) -> None:
        """Files made before the kinds table named 'train' in their index: a trainer column;
        before keyset paging: the finish-time index with the id; before a live state was
        added (paused): the one-trainer index over the live states of now."""
        columns = [r[1] for r in self.db.execute("PRAGMA table_info(tlm_job)")]
        with self._tx() as db:
            if "trainer" not in columns:
                db.execute("ALTER TABLE tlm_job ADD COLUMN trainer INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE tlm_job SET trainer = 1 WHERE kind = 'train'")
            db.execute("DROP INDEX IF EXISTS tlm_one_trainer_per_run")
            if len(db.execute("PRAGMA index_info(tlm_job_finished)").fetchall()) == 1:  # (finished) only
                db.execute("DROP INDEX tlm_job_finished")
                db.execute("CREATE INDEX tlm_job_finished ON tlm_job (finished, id)")
            one_trainer = (f"CREATE UNIQUE INDEX tlm_one_live_trainer_per_run ON tlm_job (run) "
                           f"WHERE trainer = 1 AND state IN ({', '.join(repr(s) for s in LIVE)})")
            found = db.execute("SELECT sql FROM sqlite_master WHERE type = 'index' "
                               "AND name = 'tlm_one_live_trainer_per_run'").fetchone()
            if found is None or found[0] != one_trainer:
                db.execute("DROP INDEX IF EXISTS tlm_one_live_trainer_per_run")
                db.execute(one_trainer)

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (a worker's heartbeat thread, a dashboard's request threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        waiting_out_busy(lambda: db.execute("BEGIN IMMEDIATE"), self.tries)
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def first_value(self, name: str, value: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO tlm_lab VALUES (?, ?)", (name, value))
            return db.execute("SELECT value FROM tlm_lab WHERE name = ?", (name,)).fetchone()[0]

    def value(self, name: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM tlm_lab WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_value(self, name: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tlm_lab VALUES (?, ?)", (name, value))

    def take_turn(self, name: str, now: float, until: float) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT value FROM tlm_lab WHERE name = ?", (f"turn:{name}",)).fetchone()
            if row is not None and float(row[0]) > now:
                return False
            db.execute("INSERT OR REPLACE INTO tlm_lab VALUES (?, ?)", (f"turn:{name}", str(until)))
            return True

    def put_runs(self, rows: dict[str, tuple[float, str]]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO tlm_run VALUES (?, ?, ?)",
                           [(k, score, row) for k, (score, row) in rows.items()])

    def get_runs(self, keys: list[str]) -> dict[str, str]:
        out = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            out.update(self.db.execute(f"SELECT key, row FROM tlm_run WHERE key IN ({','.join('?' * len(chunk))})",
                                       chunk).fetchall())
        return out

    def drop_runs(self, keys: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM tlm_run WHERE key = ?", [(k,) for k in keys])

    def run_page(self, cursor: Optional[tuple[float, str]], count: int) -> tuple[list[str], tuple]:
        """Summaries best first after ``cursor`` (the last one's score and key: a keyset)."""
        after = "WHERE score > ? OR (score = ? AND key > ?)" if cursor else ""
        rows = self.db.execute(f"SELECT key, score, row FROM tlm_run {after} ORDER BY score, key LIMIT ?",
                               (*((cursor[0], cursor[0], cursor[1]) if cursor else ()), count)).fetchall()
        return [r[2] for r in rows], (rows[-1][1], rows[-1][0]) if rows else cursor

    def insert(self, job: dict[str, Any], exclusive: bool, migrating: bool = False) -> Optional[str]:
        with self._tx() as db:
            try:
                db.execute("INSERT INTO tlm_job VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (job["id"], job["kind"], job["run"], job["state"], job["created"],
                            job["finished"], json.dumps(job), int(exclusive)))
                return None
            except sqlite3.IntegrityError:
                if migrating:
                    return job["id"]
                row = db.execute(f"SELECT id FROM tlm_job WHERE run = ? AND trainer = 1 AND "
                                 f"state IN ({','.join('?' * len(LIVE))})", (job["run"], *LIVE)).fetchone()
                if row is None:
                    raise
                return row[0]

    def change(self, job_id: str, fn: RawChange, expire: Optional[float] = None,
               line: Optional[str] = None) -> Optional[dict]:
        with self._tx() as db:
            row = db.execute("SELECT id, state, record FROM tlm_job WHERE id = ?", (job_id,)).fetchone()
            job = self._decode(*row) if row else None
            changes = fn(job) if job is not None else None
            if changes is None:
                return None
            job.update(changes)
            db.execute("UPDATE tlm_job SET state = ?, finished = ?, record = ? WHERE id = ?",
                       (job["state"], job.get("finished"), json.dumps(job), job_id))
            if line is not None:
                self._add(db, job_id, "log", [line])
            return job

    @staticmethod
    def _decode(job_id: str, state: str, record: str) -> dict[str, Any]:
        """A row's record; one that is not a JSON object is marked bad (readers skip it)."""
        job = loads(record)
        if not isinstance(job, dict):
            return {"id": job_id, "state": state, "_bad": "is not a JSON object"}
        return job

    def set_fields(self, job_id: str, fields: dict[str, Any]) -> None:
        self.change(job_id, lambda job: fields)

    def read(self, ids: list[str], fields: Optional[tuple[str, ...]] = None) -> list[dict[str, Any]]:
        out = []  # whole records: a row is one column, so ``fields`` saves nothing here
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self.db.execute(f"SELECT id, state, record FROM tlm_job WHERE id IN "
                                   f"({','.join('?' * len(chunk))})", chunk).fetchall()
            by_id = {row[0]: row for row in rows}
            out += [self._decode(*by_id[j]) for j in chunk if j in by_id]
        return out

    def ids_in(self, states) -> list[str]:
        states = list(states)
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM tlm_job WHERE state IN ({','.join('?' * len(states))})", states)]

    def gang_ids(self, states) -> list[str]:
        states = list(states)
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM tlm_job WHERE state IN ({','.join('?' * len(states))}) AND "
            "CASE WHEN json_valid(record) THEN json_extract(record, '$.params.nodes') END > 1", states)]

    def finished_page(self, cursor: Optional[tuple[float, str]], count: int) -> tuple[list[str], tuple]:
        """Finished ids newest first after ``cursor`` (the last one's finish time and id: a
        keyset on the (finished, id) index, where an OFFSET would count past every row before)."""
        after = "AND (finished < ? OR (finished = ? AND id < ?))" if cursor else ""
        rows = self.db.execute(  # only final states set `finished`
            f"SELECT id, finished FROM tlm_job WHERE finished IS NOT NULL {after} "
            "ORDER BY finished DESC, id DESC LIMIT ?",
            (*((cursor[0], cursor[0], cursor[1]) if cursor else ()), count)).fetchall()
        return [r[0] for r in rows], (rows[-1][1], rows[-1][0]) if rows else cursor

    def trainer_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM tlm_job WHERE trainer = 1 ORDER BY created")]

    def run_ids(self, run: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM tlm_job WHERE run = ? ORDER BY created DESC", (run,))]

    def match_prefix(self, prefix: str, count: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM tlm_job WHERE id >= ? AND id < ? LIMIT ?",
            (prefix, prefix + "\uffff", count))]

    def append(self, job_id: str, stream: str, lines: list[str]) -> None:
        with self._tx() as db:
            self._add(db, job_id, stream, lines)

    @staticmethod
    def _add(db: sqlite3.Connection, job_id: str, stream: str, lines: list[str]) -> None:
        """Append inside the caller's transaction, dropping the oldest past the cap."""
        last = db.execute("SELECT COALESCE(MAX(n), 0) FROM tlm_line WHERE job = ? AND stream = ?",
                          (job_id, stream)).fetchone()[0]
        db.executemany("INSERT INTO tlm_line VALUES (?, ?, ?, ?)",
                       [(job_id, stream, last + 1 + i, line) for i, line in enumerate(lines)])
        db.execute("DELETE FROM tlm_line WHERE job = ? AND stream = ? AND n <= ?",
                   (job_id, stream, last + len(lines) - STREAMS[stream]))

    def read_stream(self, job_id: str, stream: str,
                    after: Optional[int]) -> tuple[list[str], Optional[int]]:
        rows = self.db.execute("SELECT n, line FROM tlm_line WHERE job = ? AND stream = ? AND n > ? "
                               "ORDER BY n", (job_id, stream, after or 0)).fetchall()
        return [line for _, line in rows], rows[-1][0] if rows else after

    @contextlib.contextmanager
    def waiter(self) -> Iterator[Callable[[float], bool]]:
        """Polls SQLite's data_version on a connection of its own: it moves when another
        connection commits."""
        db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)

        def version() -> int:
            return db.execute("PRAGMA data_version").fetchone()[0]
        seen = version()

        def wait(timeout: float) -> bool:
            nonlocal seen
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if version() != seen:
                    seen = version()
                    return True
                time.sleep(0.05)
            return False
        try:
            yield wait
        finally:
            db.close()

    def put_worker(self, worker_id: str, record: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tlm_worker VALUES (?, ?, ?)",
                       (worker_id, record["heartbeat"], json.dumps(record)))

    def drop_worker(self, worker_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM tlm_worker WHERE id = ?", (worker_id,))

    def workers(self) -> list[dict[str, Any]]:
        with self._tx() as db:
            db.execute("DELETE FROM tlm_worker WHERE heartbeat < ?", (time.time() - WORKER_TTL,))
        return [loads(r[0]) for r in self.db.execute("SELECT record FROM tlm_worker")]

    def finished_before(self, before: float) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM tlm_job WHERE finished < ?", (before,))]

    def delete(self, ids: list[str]) -> None:
        """Finished jobs and their lines; the file gives its space back once most of it is free
        (VACUUM: skipped while another connection writes, tried again at the next prune)."""
        with self._tx() as db:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM tlm_line WHERE job IN ({marks})", chunk)
                db.execute(f"DELETE FROM tlm_job WHERE id IN ({marks})", chunk)
        free, pages = (self.db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_count"))
        if pages > 256 and free > pages / 2:
            with contextlib.suppress(sqlite3.OperationalError):
                self.db.execute("VACUUM")
