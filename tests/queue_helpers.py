"""Real workers, real queues: helpers for the orchestrator tests."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import pytest
import redis

from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

from conftest import tlm_cmd

TINY = ["--dim", "32", "--num_heads", "2", "--num_blocks", "1", "--context_size", "16",
        "--batch_size", "8", "--eval_tokens", "500", "--steps_per_report", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Start and stop tlm-worker processes against one queue; logs kept per worker."""

    def __init__(self, url: str, tmp: Path):
        self.url, self.tmp, self.procs = url, tmp, []

    def start(self, *args: str, lease: float = 4, clock: float = 0.0) -> subprocess.Popen:
        """``clock``: seconds this worker's clock (and its job processes') is off: a Mac whose
        time is wrong (tests/sandbox)."""
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "w")
        env = {**os.environ, "TLM_TEST_CLOCK_OFFSET": str(clock)} if clock else None
        proc = subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", self.url,
                                 "--lease", str(lease), *args], stdout=log, stderr=log, env=env)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def log(self, proc) -> str:
        return Path(proc.log_path).read_text()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        # Job processes left behind notice their worker is gone and exit by themselves.


def tlm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(tlm_cmd(*args), capture_output=True, text=True, timeout=120, **kw)


def submit(url: str, *args: str) -> str:
    proc = tlm("submit", *args, "--queue", url)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def registry(url: str) -> Registry:
    return Registry(Queue(url))


def wait_for(url: str, job_id: str, states: Iterable[str], timeout: float = 120,
             until=lambda job: True) -> dict:
    reg, deadline = registry(url), time.time() + timeout
    while time.time() < deadline:
        job = reg.get(job_id)
        if job.state in states and until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not in {list(states)} after {timeout}s: {json.dumps(job.to_record())}\n"
                         + "\n".join(reg.logs(job_id)[0]))


def backend_url(kind: str, tmp_path: Path, redis_db: int) -> str:
    """A fresh queue of either backend: a SQLite file, or a flushed database of the suite's own
    redis-server (each test module its own, so modules never share state). The suite never
    touches a Redis it did not start: a user's lab may live on 6379."""
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'queue.db'}"
    url = f"redis://127.0.0.1:{suite_redis().port}/{redis_db}"
    redis.Redis.from_url(url).flushdb()
    return url


_SUITE_REDIS: list["RedisServer"] = []


def suite_redis() -> "RedisServer":
    """The test session's redis-server, started on a free port at first use and killed at exit."""
    if not _SUITE_REDIS:
        if shutil.which("redis-server") is None:
            pytest.skip("no redis-server installed (scripts/setup.sh installs it)")
        server = RedisServer(Path(tempfile.mkdtemp(prefix="tlm-test-redis-")), durable=False)
        atexit.register(server.kill)
        _SUITE_REDIS.append(server)
    return _SUITE_REDIS[0]


def plant(url: str, reg: Registry) -> list[str]:
    """Four live records no tlm wrote: a missing field, a non-JSON field, params that are a
    list, an unknown kind; each with a wake-up entry in the training lane."""
    good = reg.create("eval", {}, "run:planted").to_record()
    reg.cancel(good["id"])
    bad = [{**good, "id": "bad000000001", "state": "queued", "params": ["x"]},
           {**good, "id": "bad000000002", "state": "queued", "kind": "deploy"},
           {k: v for k, v in {**good, "id": "bad000000003", "state": "queued"}.items() if k != "run"},
           {**good, "id": "bad000000004", "state": "queued"}]
    if url.startswith("redis"):
        r = redis.Redis.from_url(url)
        for rec in bad:
            fields = {k: json.dumps(v) for k, v in rec.items()}
            if rec["id"].endswith("4"):
                fields["progress"] = "{not json"
            r.hset(f"tlm:job:{rec['id']}", mapping=fields)
            r.sadd("tlm:state:queued", rec["id"])
            r.zadd("tlm:ids", {rec["id"]: 0})
    else:
        import sqlite3
        db = sqlite3.connect(url[len("sqlite://"):])
        for rec in bad:
            text = json.dumps(rec) if not rec["id"].endswith("4") else "{not json"
            db.execute("INSERT INTO tlm_job (id, kind, run, state, created, finished, record) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (rec["id"], str(rec.get("kind")), "run:planted",
                                                          "queued", 0.0, None, text))
        db.commit()
        db.close()
    for rec in bad:
        reg.queue.push(rec["id"], "train")
    return [rec["id"] for rec in bad]


class RedisServer:
    """A redis-server of the test's own on a free port, to kill, stop, flush and restart;
    ``durable``: every write in an append-only file, so a restart keeps the data."""

    def __init__(self, tmp: Path, durable: bool = True):
        self.port, self.dir = free_port(), tmp / f"redis-{free_port()}"
        self.dir.mkdir()
        self.durable, self.proc = durable, None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self, keep_data: bool = True) -> None:
        if not keep_data:
            for f in self.dir.rglob("*"):
                if f.is_file():
                    f.unlink()
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.dir), "--save", "", *persist],
                                     stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def restart(self, keep_data: bool = True, down: float = 0.0) -> None:
        self.kill()
        time.sleep(down)
        self.start(keep_data)

    def pause(self) -> None:  # a hung Redis: connections open, nothing answers
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def job_pid(log: str, job_id: str) -> int:
    """The pid of the job process a worker's log says it started for ``job_id`` (the latest)."""
    pids = re.findall(rf"started \w+ job {job_id} \(.*?pid (\d+)\)", log)
    assert pids, log
    return int(pids[-1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def until(predicate, timeout: float = 60, what: str = "condition", step: float = 0.1):
    """Poll ``predicate`` until it is true (return its value) or fail after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what}: not after {timeout}s")
