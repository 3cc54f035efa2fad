"""Queue benchmark: what history costs, a sample beside training, latency, throughput.

    python benchmarks/job_queue.py [--redis redis://127.0.0.1:6379/14] [--mirror ../shared/data]
                                   [--history 10000] [--logged 1000] [--stale 3] [--only fencing]

For each backend (an embedded SQLite file, and Redis when given: its database
is flushed), with real tlm-worker processes:

* the claim (the best job a worker can run, by priority and needs) with 1, 100
  and 1,000 claimable jobs of mixed needs seen by 10 workers of different
  capabilities, beside 10 and then --history finished jobs (it follows the
  live work: the 1,000-job figure is what it costs, whatever the history);
* `tlm status`, `tlm submit`, a job-id prefix lookup and one worker sweep with
  10 finished jobs, then with --history finished jobs (--logged of them with
  2,000 log lines each), as a ratio (goal: at most x1.2, cost independent of
  history; `tlm status` lists the live jobs and the latest 10 finished);
  Redis memory per finished job; pruning them all;
* submit-to-first-token of a queued `tlm sample` while a training job runs on
  the same (only) worker (goal: under 2 s);
* submit-to-start latency, trivial jobs/s with 1 and 2 workers, and the
  worker's overhead per training step (goal: under 2%);
* what fencing costs a `ptb-cpu` step (a job process confirms its hold once a
  second at most, one look per step: goal under 1%; and a metrics record's
  `job`/`fence` labels), and the longest time a stale holder (its worker and
  job process SIGSTOPped past the lease, then woken) writes after the next
  holder's first record, over --stale rounds.

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import redis

import tlm  # noqa: F401
from tlm import metrics
from tlm.config import PRESETS, TrainConfig
from tlm.data import load_dataset
from tlm.hooks import TrainingHooks
from tlm.train import Trainer
from tlm_worker.jobs import Context
from tlm_worker.trainer_hooks import CANCEL_POLL_SECONDS
from tlm_worker.process import Worker
from tlm_worker.queue import Queue
from tlm_worker.registry import MAX_LOG_LINES, Registry

TINY = dict(dim=32, num_heads=2, num_blocks=1, context_size=16, batch_size=8, eval_tokens=500)
STEP = dict(dim=256, num_heads=4, num_blocks=2, context_size=64, batch_size=16, eval_tokens=500,
            steps_per_report=10)
LOG_LINE = "12:00:00 iter 1200/5000  train loss 4.512  3.41 it/s  11,200 tok/s  lr 2.9e-03  peak mem 0.41 GB"


def tlm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlm_cli.main", *args], capture_output=True,
                          text=True, check=True)


def start_workers(url: str, n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def stop(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        w.terminate()
    for w in workers:
        w.wait()


def wait(reg: Registry, ids: list[str], states: tuple[str, ...]) -> None:
    while any(reg.get(i).state not in states for i in ids):
        time.sleep(0.01)


def best(fn: Callable[[], object], n: int = 5) -> float:
    """Best of n wall times, in ms."""
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times) * 1000


class Rates(TrainingHooks):
    """Tokens/s and steps/s of each report."""

    def __init__(self):
        self.seen, self.steps = [], []

    def on_progress(self, p) -> None:
        if p.kind == "report":
            self.seen.append(p.tokens_per_sec)
            self.steps.append(p.it_per_sec)


def fencing_costs(url: str, data: Path, root: Path, rounds: int) -> None:
    """What fencing costs a ptb-cpu step, and how long a woken stale holder writes."""
    reg = Registry(Queue(url, patient=False))
    job = reg.create("train", {"save_dir": str(root)}, "bench:fence")
    held = reg.claim(job.id, "bench")
    c = Context(reg, held, held.fence, str(root), {}, False, None, lambda line: None, lambda: False)
    look = best(c.look, 50)
    check = best(lambda: reg.check_fence(job.id, held.fence), 50)  # before each record is written
    reg.finish(job.id, "cancelled", held.fence)  # not a job for the workers below
    cfg = {k: v for k, v in PRESETS["ptb-cpu"].items() if k not in ("time_budget", "eval_test")}
    rates = Rates()
    Trainer(TrainConfig(save_dir=str(root / "ptb-cpu"), **{**cfg, "num_iters": 30, "steps_per_eval": 1000,
                                                          "steps_per_report": 10}),
            load_dataset("ptb", data), hooks=rates).run()
    step = 1000 / statistics.median(rates.steps[1:])  # ms
    rec = {"time": 0.0, "kind": "train", "step": 1, "tokens": 2048, "elapsed": 1.0, "loss": 5.0,
           "lr": 0.003, "tokens_per_sec": 1e4, "peak_memory_gb": 0.4}
    plain = best(lambda: [metrics.append(root, rec) for _ in range(200)], 3) / 200
    fenced = check + best(lambda: [metrics.append(root, {**rec, "job": held.id, "fence": 7})
                                   for _ in range(200)], 3) / 200
    per_step = look / max(step, CANCEL_POLL_SECONDS * 1000)
    print(f"  fencing: a look at the job's record {look:.2f} ms, at most one per step and per "
          f"{CANCEL_POLL_SECONDS:g}s; a ptb-cpu step {step:.0f} ms: {per_step * 100:.3f}% of a step "
          f"(goal under 1%); a metrics record {plain:.3f} ms, fenced (its labels and a fence "
          f"check) {fenced:.3f} ms ({fenced / plain:.2f}x, one per report and evaluation)")

    worst = []
    for i in range(rounds):
        run = root / f"stale{i}"
        run.mkdir()
        (run / "datasets").symlink_to(data)
        workers = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--lease", "4"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        job = reg.create("train", {"save_dir": str(run), **TINY, "num_iters": 400, "steps_per_eval": 25,
                                   "steps_per_report": 5}, f"bench:stale{i}")
        while not reg.get(job.id).checkpoint:
            time.sleep(0.05)
        first = reg.get(job.id)
        pids = [workers[0].pid] + [int(p) for p in subprocess.run(
            ["pgrep", "-f", "multiprocessing.spawn"], capture_output=True, text=True).stdout.split()
            if Path(f"/proc/{p}/status").exists() and f"PPid:\t{workers[0].pid}\n" in
            Path(f"/proc/{p}/status").read_text()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        workers.append(subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--lease", "4"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while reg.get(job.id).fence == first.fence or reg.get(job.id).progress.get("step", 0) <= \
                first.progress.get("step", 0):
            time.sleep(0.05)
        time.sleep(2)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        wait(reg, [job.id], ("succeeded", "failed"))
        stop(workers)
        worst.append(metrics.stale_writes(metrics.raw(run)))
    print(f"  stale holder (stopped past a 4 s lease, then woken; heartbeat 1 s), {rounds} rounds: "
          f"longest write after the next holder's first {max(worst):.3f} s "
          f"(each: {', '.join(f'{w:.3f}' for w in worst)})")


def add_finished(reg: Registry, n: int, logged: int) -> None:
    """n finished jobs, the first ``logged`` of them with a full log."""
    for i in range(n):
        job = reg.create("eval", {"save_dir": f"/runs/h{i % 50}"}, f"dir:/runs/h{i % 50}")
        held = reg.claim(job.id, "bench")
        if i < logged:
            reg.store.append(job.id, "log", [LOG_LINE] * MAX_LOG_LINES)
        reg.finish(job.id, "succeeded", held.fence, result={"loss": 4.5})


NEEDS = [{}, {"gpu": True}, {"memory": 8 * 2**30}, {"labels": {"room": "office"}}, {"host": "studio"}]
WORKER_CAPS = [{"device": "gpu" if i % 3 == 0 else "cpu", "memory_available": (4 + 4 * i) * 2**30,
                "host": "studio" if i == 9 else f"mac{i}", "labels": {"room": "office"} if i % 2 else {}}
               for i in range(10)]


def claim_costs(reg: Registry, label: str) -> None:
    """ms per claim with N claimable jobs of mixed needs and priorities; 10 workers claim in turn,
    and each claimed job is replaced, so N stays what it says."""
    print(f"  claim with {label}:")
    for n in (1, 100, 1000):
        def add(i: int) -> None:
            reg.create("eval", {}, "dir:/claims", priority=(i % 3 - 1) * 10, needs=NEEDS[i % len(NEEDS)])
        for i in range(n):
            add(i)
        times = []
        for i in range(30):
            tic = time.perf_counter()
            job = reg.claim_next("interactive", f"w{i % 10}", WORKER_CAPS[i % 10])
            times.append(time.perf_counter() - tic)
            if job is not None:
                reg.finish(job.id, "succeeded", job.fence)
                add(i)
        print(f"    {n:5,d} claimable: {statistics.median(times) * 1000:8.2f} ms per claim (median of 30)")
        for job_id in reg.store.ids_in(("queued",)):
            reg.cancel(job_id)
    for q in reg.queue.lanes.values():
        while q.dequeue() is not None:
            pass


def history_costs(url: str, reg: Registry, run: Path, label: str) -> dict[str, float]:
    live = reg.create("train", {"save_dir": "/runs/live"}, "dir:/runs/live")
    worker = Worker(url)
    figures = {
        "status (registry read)": best(lambda: reg.jobs(10)),
        "status (`tlm status` wall)": best(lambda: tlm_cli("status", "--limit", "10", "--queue", url), 3),
        "submit (registry)": best(lambda: reg.cancel(reg.create("eval", {}, "dir:/x").id)),
        "submit (`tlm submit eval` wall)": best(lambda: tlm_cli(
            "submit", "eval", "--save_dir", str(run), "--queue", url), 3),
        "prefix lookup": best(lambda: reg.get(live.id[:6])),
        "one worker sweep": best(worker._sweep),
    }
    for job_id in reg.store.ids_in(("queued",)):  # the live job and what the CLI submitted
        reg.cancel(job_id)
    for q in reg.queue.lanes.values():
        while q.dequeue() is not None:
            pass
    print(f"  with {label}:")
    for name, ms in figures.items():
        print(f"    {name:34s} {ms:9.3f} ms")
    return figures


def bench(url: str, data: Path, history: int, logged: int, stale: int) -> None:
    root = Path(tempfile.mkdtemp(dir=data.parent))  # this backend's runs
    if url.startswith("redis"):
        redis.Redis.from_url(url).flushdb()
    queue = Queue(url)
    reg = Registry(queue)
    run = root / "tiny"
    run.mkdir()
    (run / "datasets").symlink_to(data)
    Trainer(TrainConfig(save_dir=str(run), num_iters=2, **TINY), load_dataset("ptb", data)).run()

    # What history costs.
    add_finished(reg, 10, 0)
    small = history_costs(url, reg, run, "10 finished jobs")
    claim_costs(reg, "no history beside")
    reg.prune(0)  # what the claims left
    add_finished(reg, 10, 0)
    memory = redis.Redis.from_url(url).info("memory")["used_memory"] if queue.redis else 0
    tic = time.time()
    add_finished(reg, logged, logged)
    mid = redis.Redis.from_url(url).info("memory")["used_memory"] if queue.redis else 0
    add_finished(reg, history - 10 - logged, 0)
    print(f"  (added {history - 10:,} finished jobs, {logged:,} with {MAX_LOG_LINES:,} log lines, "
          f"in {time.time() - tic:.0f} s)")
    claim_costs(reg, f"{history:,} finished jobs beside")
    large = history_costs(url, reg, run, f"{history:,} finished jobs")
    print("    ratios (large/small): " + ", ".join(
        f"{name.split(' (')[0] if '(' in name else name} {large[name] / small[name]:.2f}"
        for name in small))
    if queue.redis:
        end = redis.Redis.from_url(url).info("memory")["used_memory"]
        print(f"  Redis memory per finished job: {(end - mid) / (history - 10 - logged) / 1024:.2f} KiB "
              f"without logs, {(mid - memory) / logged / 1024:.0f} KiB with {MAX_LOG_LINES:,} log lines")
    tic = time.perf_counter()
    pruned = reg.prune(0)
    print(f"  `prune` of all {pruned:,} finished jobs: {time.perf_counter() - tic:.1f} s")

    # A sample beside training, on the one worker.
    workers = start_workers(url, 1)
    train = reg.create("train", {"save_dir": str(run), **TINY, "num_iters": 100000,
                                 "steps_per_eval": 50}, "bench:train")
    wait(reg, [train.id], ("running",))
    while not reg.get(train.id).checkpoint:
        time.sleep(0.1)
    firsts = []
    for i in range(5):
        tic = time.perf_counter()
        tlm_cli("sample", "--save_dir", str(run), "--prompt", "the", "--max_tokens", "1",
                "--seed", str(i), "--queue", url)
        firsts.append(time.perf_counter() - tic)
    step = reg.get(train.id).progress["step"]
    reg.cancel(train.id)
    wait(reg, [train.id], ("cancelled",))
    print(f"  queued `tlm sample` while the only worker trains: first token after "
          f"{statistics.median(firsts):.2f} s median ({min(firsts):.2f}-{max(firsts):.2f} s, "
          f"CLI start included); training reached step {step}")
    stop(workers)

    # Latency and throughput.
    def submit_eval() -> str:
        return reg.create("eval", {"save_dir": str(run), "tokens": 100}, "bench:eval").id

    workers = start_workers(url, 1)
    wait(reg, [submit_eval()], ("succeeded",))  # the sampler process is up
    latencies = []
    for _ in range(5):
        tic = time.time()
        job_id = submit_eval()
        wait(reg, [job_id], ("running", "succeeded"))
        latencies.append(time.time() - tic)
        wait(reg, [job_id], ("succeeded",))
    print(f"  submit-to-start latency: median {statistics.median(latencies) * 1000:.0f} ms")
    stop(workers)
    for n in (1, 2):
        workers = start_workers(url, n)
        time.sleep(2)
        tic = time.time()
        ids = [submit_eval() for _ in range(16)]
        wait(reg, ids, ("succeeded",))
        print(f"  trivial eval jobs with {n} worker(s): {16 / (time.time() - tic):.1f} jobs/s "
              "(in each worker's long-lived interactive process)")
        stop(workers)

    # Worker overhead: the same training, directly and as a queued job.
    cfg = dict(STEP, num_iters=150, steps_per_eval=1000)
    rates_direct = Rates()
    Trainer(TrainConfig(save_dir=str(root / "direct"), **cfg), load_dataset("ptb", data),
            hooks=rates_direct).run()
    direct = statistics.median(rates_direct.seen[2:])
    queued_dir = root / "queued"
    queued_dir.mkdir()
    (queued_dir / "datasets").symlink_to(data)
    workers = start_workers(url, 1)
    job = reg.create("train", {"save_dir": str(queued_dir), **cfg}, "bench:overhead")
    rates = []
    while reg.get(job.id).state not in ("succeeded", "failed"):
        p = reg.get(job.id).progress
        if p.get("step", 0) > 20 and p.get("tokens_per_sec") and (not rates or rates[-1][0] != p["step"]):
            rates.append((p["step"], p["tokens_per_sec"]))
        time.sleep(0.05)
    stop(workers)
    queued = statistics.median(r for _, r in rates)
    print(f"  train step (dim 256, 2 blocks, batch 16x64): direct {direct:,.0f} tok/s, "
          f"in a worker {queued:,.0f} tok/s: overhead {(1 - queued / direct) * 100:+.1f}%")
    fencing_costs(url, data, root, stale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=None, help="also benchmark this Redis URL (flushed!)")
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"))
    ap.add_argument("--history", type=int, default=10000, help="finished jobs for the large case")
    ap.add_argument("--logged", type=int, default=1000, help="of which with a full log")
    ap.add_argument("--stale", type=int, default=3, help="rounds of the stale-holder measurement")
    ap.add_argument("--only", choices=["fencing"], default=None, help="run only this part")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        load_dataset("ptb", root / "datasets", args.mirror)
        targets = [("embedded SQLite", f"sqlite://{root / 'queue.db'}")]
        if args.redis:
            targets.append(("Redis", args.redis))
        for name, url in targets:
            print(f"{name}:", flush=True)
            if args.only == "fencing":
                (root / name[:5]).mkdir()
                fencing_costs(url, root / "datasets", root / name[:5], args.stale)
            else:
                bench(url, root / "datasets", args.history, args.logged, args.stale)


if __name__ == "__main__":
    main()
