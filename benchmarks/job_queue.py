"""Queue benchmark: submit-to-start latency, status latency with 1,000 jobs,
jobs/s with 1 and 2 workers, and the worker's overhead per training step.

    python benchmarks/job_queue.py [--redis redis://127.0.0.1:6379/14] [--mirror ../shared/data]

Uses real tlm-worker processes on an embedded SQLite queue and, when given, Redis
(the Redis database is flushed). Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tlm  # noqa: F401
from tlm.config import TrainConfig
from tlm.data import load_dataset
from tlm.train import Trainer
from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

TINY = dict(dim=32, num_heads=2, num_blocks=1, context_size=16, batch_size=8, eval_tokens=500)
STEP = dict(dim=256, num_heads=4, num_blocks=2, context_size=64, batch_size=16, eval_tokens=500,
            steps_per_report=10)


def start_workers(url: str, n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def stop(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        w.terminate()
    for w in workers:
        w.wait()


def wait(reg: Registry, ids: list[str], states: tuple[str, ...]) -> None:
    while any(reg.get(i)["state"] not in states for i in ids):
        time.sleep(0.02)


def bench(url: str, data: Path) -> None:
    root = Path(tempfile.mkdtemp(dir=data.parent))  # this backend's runs
    queue = Queue(url)
    queue.storage.flush_all()
    reg = Registry(queue)
    run = root / "tiny"
    run.mkdir()
    (run / "datasets").symlink_to(data)
    Trainer(TrainConfig(save_dir=str(run), num_iters=2, **TINY), load_dataset("ptb", data)).run()

    def submit_eval() -> str:
        job = reg.create("eval", {"save_dir": str(run), "tokens": 100}, f"bench:{time.time()}")
        queue.push(job["id"])
        return job["id"]

    workers = start_workers(url, 1)
    time.sleep(2)
    latencies = []
    for _ in range(5):
        t = time.time()
        job_id = submit_eval()
        wait(reg, [job_id], ("running", "succeeded"))
        latencies.append(time.time() - t)
        wait(reg, [job_id], ("succeeded",))
    print(f"  submit-to-start latency: median {statistics.median(latencies) * 1000:.0f} ms")
    tic = time.time()
    subprocess.run([sys.executable, "-m", "tlm_cli.main", "submit", "eval", "--save_dir", str(run),
                    "--queue", url], capture_output=True, check=True)
    print(f"  `tlm submit eval` wall time: {(time.time() - tic) * 1000:.0f} ms")
    stop(workers)

    for n in (1, 2):
        workers = start_workers(url, n)
        time.sleep(2)
        tic = time.time()
        ids = [submit_eval() for _ in range(8)]
        wait(reg, ids, ("succeeded",))
        print(f"  trivial jobs with {n} worker(s): {8 / (time.time() - tic):.2f} jobs/s "
              "(each runs in a fresh spawned process that imports MLX)")
        stop(workers)

    for i in range(1000):
        reg.create("train", {"save_dir": f"/runs/{i}"}, f"dir:/runs/{i}")
    tic = time.time()
    jobs = reg.jobs()
    listing = time.time() - tic
    tic = time.time()
    subprocess.run([sys.executable, "-m", "tlm_cli.main", "status", "--queue", url],
                   capture_output=True, check=True)
    print(f"  status with {len(jobs)} jobs: registry read {listing * 1000:.0f} ms, "
          f"`tlm status` wall {(time.time() - tic) * 1000:.0f} ms")
    queue.storage.flush_all()

    # Worker overhead: the same training, directly and as a queued job.
    cfg = dict(STEP, num_iters=150, steps_per_eval=1000)
    direct_dir = root / "direct"
    seen = []
    Trainer(TrainConfig(save_dir=str(direct_dir), **cfg), load_dataset("ptb", data)
            ).run(on_progress=lambda p: seen.append(p.tokens_per_sec) if p.kind == "report" else None)
    direct = statistics.median(seen[2:])
    queued_dir = root / "queued"
    queued_dir.mkdir()
    (queued_dir / "datasets").symlink_to(data)
    job = reg.create("train", {"save_dir": str(queued_dir), **cfg}, "bench:overhead")
    rates = []
    workers = start_workers(url, 1)
    queue.push(job["id"])
    while reg.get(job["id"])["state"] not in ("succeeded", "failed"):
        p = reg.get(job["id"])["progress"]
        if p.get("step", 0) > 20 and p.get("tokens_per_sec") and (not rates or rates[-1][0] != p["step"]):
            rates.append((p["step"], p["tokens_per_sec"]))
        time.sleep(0.05)
    stop(workers)
    queued = statistics.median(r for _, r in rates)
    print(f"  train step (dim 256, 2 blocks, batch 16x64): direct {direct:,.0f} tok/s, "
          f"in a worker {queued:,.0f} tok/s: overhead {(1 - queued / direct) * 100:+.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=None, help="also benchmark this Redis URL (flushed!)")
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        load_dataset("ptb", root / "datasets", args.mirror)
        targets = [("embedded SQLite", f"sqlite://{root / 'queue.db'}")]
        if args.redis:
            targets.append(("Redis", args.redis))
        for name, url in targets:
            print(f"{name}:", flush=True)
            bench(url, root / "datasets")


if __name__ == "__main__":
    main()
