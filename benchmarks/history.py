"""What a long history costs: the listings at 1k, 10k and 100k finished jobs, on both stores.

    python benchmarks/history.py [--redis redis://127.0.0.1:PORT/0] [--sizes 1000,10000,100000]

For each backend (an embedded SQLite file; Redis when given, its database flushed: never a
lab's), the registry is filled with finished jobs as workers leave them (a tenth of them
training runs, one per run, with their configuration and best validation loss, each folded
into its run's summary as it ends; the rest evaluations; each with its one-line log), then, at
each size:

* the first page of `tlm status --all` (its first finished job on screen), of `tlm runs`
  (its first row; and how many runs it lists: a tenth of the jobs) and of the dashboard's `/api/runs` (the first page of the runs table), and
  how each grows from the smallest size to the largest (goal: at most x2, under 1 s);
* bytes per finished job with its log (Redis's used memory, or the SQLite file), the SQLite
  file after a prune of everything, and how long loading a sweep's study takes beside a sweep
  of 1,000 earlier trials.

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

from tlm_worker.kinds import Job
from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

CONFIG = {"dataset": "ptb", "dim": 256, "num_blocks": 4, "num_heads": 4, "context_size": 64, "batch_size": 32,
          "optimizer": "muon", "learning_rate": 3e-3, "dropout": 0.0, "num_iters": 950}
LINE = "12:00:00 succeeded at iteration 950, checkpoint 9b1ca2ff2f01c252842477c5c340da8d777353e5"


def fill(reg: Registry, start: int, end: int) -> None:
    """Finished jobs ``start`` to ``end``: every tenth a run's training job, the rest evaluations;
    each training job folded into its run's summary as it ends (as a worker's end does)."""
    now = reg.now()
    trained = []
    for i in range(start, end):
        trainer = i % 10 == 0
        key = f"dir:/runs/r{i // 10}"
        progress = {"step": 950, "total": 950, "config": {**CONFIG, "learning_rate": 1e-3 + i * 1e-7},
                    "best_valid": [4.6 + (i % 97) / 100, 950, 600.0], "elapsed": 600.0,
                    "tokens_per_sec": 2600.0, "test_loss": 4.58} if trainer else {}
        job = Job(id=uuid.uuid4().hex[:12], kind="train" if trainer else "eval", params={"save_dir": key[4:]},
                  run=key, state="succeeded", created=now - (end - i), enqueued=now - (end - i),
                  started=now - (end - i), finished=now - (end - i) + 0.5, progress=progress,
                  attempts=1, fence=1, worker="bench")
        reg.store.insert(job.to_record(), exclusive=trainer)
        reg.store.append(job.id, "log", [LINE])
        trained += [job] if trainer else []
        if len(trained) == 100 or (i == end - 1 and trained):
            reg.summarize(trained)
            trained = []


def first_line(args: list[str], url: str) -> tuple[float, float, int]:
    """(seconds to the first line on stdout, seconds to the end, rows) of a `tlm` command."""
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tlm_cli.main", *args, "--queue", url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    first, rows = None, 0
    for line in proc.stdout:
        if line.strip() and "┃" not in line and "━" not in line and line.strip() != "jobs":
            first = first or time.perf_counter() - tic
            rows += 1
    proc.wait()
    return first or float("nan"), time.perf_counter() - tic, rows


def size_of(reg: Registry, url: str) -> int:
    if reg.queue.redis is not None:
        return int(reg.queue.redis.info("memory")["used_memory"])
    path = url[len("sqlite://"):]
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def bench(url: str, sizes: list[int]) -> None:
    if url.startswith("redis"):
        redis.Redis.from_url(url).flushdb()
    reg = Registry(Queue(url))
    port = 8800 + os.getpid() % 100
    server = subprocess.Popen([sys.executable, "-m", "tlm_cli.main", "dashboard", "--queue", url,
                               "--port", str(port)], stderr=subprocess.DEVNULL)
    figures: dict[str, list[float]] = {}
    try:
        done, empty = 0, size_of(reg, url)
        for n in sizes:
            tic = time.time()
            fill(reg, done, n)
            done = n
            per_job = (size_of(reg, url) - empty) / n
            status, status_all, _ = first_line(["status", "--all"], url)
            runs, runs_all, _ = first_line(["runs"], url)
            _, every, listed = first_line(["runs", "--all", "--csv"], url)  # a header, then a row per run
            httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=600)  # warm
            t0 = time.perf_counter()
            page = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=600)
            api = time.perf_counter() - t0
            for name, value in (("status --all", status), ("runs", runs), ("/api/runs", api)):
                figures.setdefault(name, []).append(value)
            print(f"  {n:>7,} finished jobs (filled in {time.time() - tic:.0f} s): first page of "
                  f"`tlm status --all` {status:.2f} s (all {status_all:.1f} s), `tlm runs` {runs:.2f} s "
                  f"(all {runs_all:.1f} s; every run, {listed - 1:,}, as CSV {every:.1f} s), /api/runs {api:.2f} s ({len(page.content) / 1e3:,.0f} kB); "
                  f"{per_job:,.0f} bytes per finished job with its log")
        for name, values in figures.items():
            print(f"  {name}: x{values[-1] / values[0]:.2f} from {sizes[0]:,} to {sizes[-1]:,} jobs")
        before = size_of(reg, url)
        reg.prune(0)
        if reg.queue.redis is None:
            reg.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        print(f"  after `tlm prune` of everything: {size_of(reg, url) / 1e6:.1f} MB (before {before / 1e6:.1f} MB)")
        study_load(reg)
    finally:
        server.terminate()
        server.wait()


def study_load(reg: Registry) -> None:
    """How long a sweep's study takes to load beside another sweep of 1,000 told trials."""
    import optuna

    from tlm_worker.sweeps import storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    times = []
    for earlier in (0, 1000):
        old, new = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
        study = optuna.create_study(study_name=old, storage=storage(reg, old, create=True))
        for _ in range(earlier):
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            study.tell(trial, 1.0)
        optuna.create_study(study_name=new, storage=storage(reg, new, create=True))
        tic = time.perf_counter()
        optuna.load_study(study_name=new, storage=storage(reg, new))
        times.append(time.perf_counter() - tic)
    print(f"  a sweep's study loads in {times[0] * 1000:.1f} ms beside a sweep of 0 trials, "
          f"{times[1] * 1000:.1f} ms beside one of 1,000 (x{times[1] / times[0]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=None, help="also benchmark this Redis URL (its database is flushed!)")
    ap.add_argument("--sizes", default="1000,10000,100000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        print("SQLite:")
        bench(f"sqlite://{Path(tmp) / 'queue.db'}", sizes)
    if args.redis:
        print(f"Redis ({args.redis}):")
        bench(args.redis, sizes)


if __name__ == "__main__":
    main()
