"""What a claim costs as the queue deepens, and what idle workers cost the queue (issue 42).

    python benchmarks/claim.py [--depths 10,1000,10000] [--idle 4] [--seconds 20]
                               [--drain 1000 --workers 10 --mirror ../shared/data]

* Claim latency with 10, 1,000 and 10,000 cheap jobs queued, as a worker claims: pop the lane's
  most urgent wake-up, claim it (``Registry.claim_next(first=...)``); each claimed job is
  finished and replaced, so the depth stays what it says. Beside it, in the same run, the claim
  as it was before (every claimable record read and sorted). Both backends: an embedded SQLite
  file, and a redis-server of this benchmark's own. Goal: 10,000 within x1.5 of 10.
* Idle traffic: --idle tlm-worker processes on that Redis with nothing to do, its commands per
  worker per second over --seconds (INFO commandstats). Goal: under 1.
* Drain (--drain N, with --mirror for PTB): N small evaluations of a tiny run, drained by
  --workers tlm-workers on that Redis: queued before the workers start (a deep queue) against
  submitted while they sit idle (the rate the queue is then fed at); jobs/s from the time every
  worker has ended a job (their start left out) to the last, and the median gap on a worker
  from one job's end to its next start. Goal: the deep queue drains at 80% of the idle rate or more.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from tlm_worker.kinds import CLAIMABLE
from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

CLAIMS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(reg: Registry, n: int) -> None:
    for _ in range(n):
        reg.create("eval", {}, "dir:/claims")


def claim_ms(reg: Registry, before: bool) -> float:
    """Median ms of CLAIMS claims as a worker makes them (or as the claim was before: every
    claimable record read and sorted, whatever entry was popped)."""
    times = []
    for _ in range(CLAIMS):
        tic = time.perf_counter()
        if before:
            job = reg._claim_best(reg.store.ids_in(CLAIMABLE), "interactive", "w", {})
        else:
            job = reg.claim_next("interactive", "w", {}, first=reg.queue.pop("interactive"))
        times.append(time.perf_counter() - tic)
        reg.finish(job.id, "succeeded", job.fence)
        fill(reg, 1)
    return statistics.median(times) * 1000


def claims(url: str, label: str, depths: list[int]) -> None:
    """``url``: a Redis (flushed at each depth: the benchmark's own), or a SQLite file name
    with {depth} in it (a new file at each depth)."""
    print(f"claim latency, {label} (median of {CLAIMS}):")
    figures = {}
    for depth in depths:
        reg = Registry(Queue(url.format(depth=depth)))
        if reg.queue.redis is not None:
            reg.queue.redis.flushdb()
        fill(reg, depth)
        now = claim_ms(reg, before=False)  # first: "before" leaves entries its claims did not pop
        figures[depth] = (now, claim_ms(reg, before=True))
        print(f"  {depth:6,d} queued: {figures[depth][0]:7.2f} ms a claim;  before: {figures[depth][1]:8.2f} ms")
    low, high = min(depths), max(depths)
    print(f"  {high:,} against {low:,} queued: x{figures[high][0] / figures[low][0]:.2f} "
          f"(before: x{figures[high][1] / figures[low][1]:.2f})")


def idle_traffic(url: str, workers: int, seconds: float, tmp: Path) -> None:
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp / "xdg")}
    procs = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--save_root",
                               str(tmp / "root")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(workers)]
    try:
        time.sleep(10)  # started, and past their first sweep

        def total() -> int:
            return sum(v["calls"] for k, v in r.info("commandstats").items())
        start = total()
        time.sleep(seconds)
        rate = (total() - start - 2) / seconds / workers  # less this function's own two INFOs
        print(f"idle: {rate:.2f} Redis commands per worker per second ({workers} workers, {seconds:.0f} s)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def drain(url: str, workers: int, n: int, tmp: Path, mirror: str) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp / "xdg"), "TLM_DATA_MIRROR": mirror}
    root = tmp / "drain-root"  # a save root of its own: the lab's mark on "root" is the flushed lab's
    run = root / "drain"
    subprocess.run([sys.executable, "-m", "tlm_cli.main", "train", "--save_dir", str(run), "--dim", "32",
                    "--num_heads", "2", "--num_blocks", "1", "--context_size", "16", "--batch_size", "8",
                    "--eval_tokens", "500", "--num_iters", "2"], env=env, check=True, capture_output=True)
    reg = Registry(Queue(url))
    params = {"save_dir": str(run), "split": "valid", "tokens": 256, "data_mirror": mirror}

    def submit(count: int) -> list[str]:
        return [reg.create("eval", params, f"dir:{run}").id for _ in range(count)]

    def start() -> list[subprocess.Popen]:
        procs = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--save_root",
                                   str(root)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / f"worker-{i}.log", "w")) for i in range(workers)]
        time.sleep(1)
        return procs

    def stop(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)

    def drained(ids: list[str], label: str, procs: list[subprocess.Popen]) -> float:
        while True:
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a worker exited: see {tmp}/worker-*.log")
            jobs = reg.find(ids)
            if all(j.state in ("succeeded", "failed") for j in jobs):
                break
            time.sleep(0.5)
        failed = sum(j.state == "failed" for j in jobs)
        ends = sorted(j.finished for j in jobs)
        warm = max(min(j.finished for j in jobs if j.worker == w) for w in {j.worker for j in jobs})
        rate = sum(t > warm for t in ends) / (ends[-1] - warm)  # once every worker has ended a job
        gaps = []
        for worker in {j.worker for j in jobs}:
            mine = sorted((j for j in jobs if j.worker == worker), key=lambda j: j.started)
            gaps += [b.started - a.finished for a, b in zip(mine, mine[1:])]
        print(f"  {label}: {rate:.2f} jobs/s; a worker's gap from one job's end to its next start: "
              f"median {statistics.median(gaps):.2f} s, p95 {statistics.quantiles(gaps, n=20)[-1]:.2f} s"
              + (f" ({failed} failed)" if failed else ""))
        return rate

    print(f"drain: {n} evaluations of a tiny run, {workers} workers on Redis:")
    procs = start()
    try:
        drained(submit(2 * workers), "warm-up (each worker's interactive process started)", procs)
        idle = drained(submit(n), f"{n} submitted to idle workers", procs)
    finally:
        stop(procs)
    ids = submit(n)
    procs = start()
    try:
        deep = drained(ids, f"{n} queued, then the workers started", procs)
    finally:
        stop(procs)
    print(f"  the deep queue drains at x{deep / idle:.2f} the idle rate (goal: 0.8 or more)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="10,1000,10000")
    ap.add_argument("--idle", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--drain", type=int, default=0, help="evaluations to drain (0: skip; needs --mirror)")
    ap.add_argument("--workers", type=int, default=10, help="workers that drain them")
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"), help="the PTB data mirror")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    with tempfile.TemporaryDirectory(prefix="tlm-claim-") as tmp:
        tmp = Path(tmp)
        (tmp / "root").mkdir()
        claims(f"sqlite://{tmp}/queue-{{depth}}.db", "embedded SQLite", depths)
        port = free_port()
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            claims(url, "Redis", depths)
            idle_traffic(url, args.idle, args.seconds, tmp)
            if args.drain:
                redis.Redis.from_url(url).flushdb()
                drain(url, args.workers, args.drain, tmp, args.mirror)
        finally:
            server.kill()


if __name__ == "__main__":
    main()
