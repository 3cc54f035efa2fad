"""tlm sweep on this machine: ASHA against running every trial to its budget, and preset searches.

    .venv/bin/python benchmarks/sweep.py asha   [--workers 2]   # the same 16 configurations twice
    .venv/bin/python benchmarks/sweep.py search --preset shakespeare-cpu --budget 0.2m --trials 24 \\
        --search learning_rate=log:1e-3:2e-2 --search muon_learning_rate=log:5e-3:5e-2 ...

Each run uses a fresh embedded queue and real tlm-worker processes (--workers of
them) under a temporary save root; TLM_DATA_MIRROR for offline data. Prints
figures (worker time is the sum over trials of their jobs' running time);
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TLM = [sys.executable, "-m", "tlm_cli.main"]
# 16 configurations of a small character model of Tiny Shakespeare: 4 widths x 4 learning rates.
GRID = ["--search", "dim=32,64,96,128", "--search", "learning_rate=3e-4,1e-3,3e-3,1e-2"]
SHAPE = ["--flag", "dataset=shakespeare", "--flag", "num_blocks=2", "--flag", "num_heads=4",
         "--flag", "context_size=64", "--flag", "batch_size=16", "--flag", "eval_tokens=20000",
         "--flag", "steps_per_eval=25", "--flag", "steps_per_report=25", "--flag", "lr_warmup=10"]


def run_sweep(name: str, args: list[str], workers: int) -> dict:
    """Submit a sweep to a fresh queue, run workers until it ends, return its leaderboard."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TLM_QUEUE": f"sqlite://{tmp}/queue.db"}
        root = Path(tmp) / "root"
        root.mkdir()
        subprocess.run([*TLM, "sweep", "submit", "--name", name, *args], env=env, check=True,
                       capture_output=True, text=True)
        tic = time.time()
        procs = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--save_root", str(root),
                                   "--burst"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(workers)]
        for p in procs:
            p.wait()
        wall = time.time() - tic
        out = subprocess.run([*TLM, "sweep", "status", name, "--json"], env=env, check=True,
                             capture_output=True, text=True)
        data = json.loads(out.stdout)
        table = subprocess.run([*TLM, "sweep", "status", name], env={**env, "COLUMNS": "160"},
                               capture_output=True, text=True).stdout
        best = subprocess.run([*TLM, "sweep", "best", name], env=env, capture_output=True, text=True)
        return {"trials": data["trials"], "wall": wall, "table": table, "best": best.stdout.strip()}


def curve(trials: list[dict]) -> list[tuple[float, float]]:
    """(worker time so far, best loss so far), trials taken in the order they finished."""
    out, spent, best = [], 0.0, float("inf")
    for t in sorted(trials, key=lambda t: t["finished"] or 0):
        spent += t["worker_time"]
        if t["best"] is not None:
            best = min(best, t["best"])
        out.append((spent, best))
    return out


def asha(args) -> None:
    common = [*SHAPE, *GRID, "--sampler", "grid", "--trials", "16", "--parallel", str(args.workers),
              "--budget", str(args.steps), "--seed", "0"]
    results = {}
    for prune in ("none", "asha"):
        r = run_sweep(f"bench-{prune}", [*common, "--prune", prune], args.workers)
        results[prune] = r
        spent = sum(t["worker_time"] for t in r["trials"])
        best = min(t["best"] for t in r["trials"] if t["best"] is not None)
        states = {s: sum(t["state"] == s for t in r["trials"]) for s in {t["state"] for t in r["trials"]}}
        print(f"--prune {prune}: best valid loss {best:.4f}, worker time {spent:.0f} s, wall {r['wall']:.0f} s, "
              f"{states}", flush=True)
        print(r["table"])
    full, fast = curve(results["none"]["trials"]), curve(results["asha"]["trials"])
    full_best = full[-1][1]
    reach = next((t for t, b in fast if b <= full_best), None)
    full_reach = next(t for t, b in full if b <= full_best)
    asha_spent = fast[-1][0]
    at_same = next((b for t, b in reversed(full) if t <= asha_spent), float("nan"))
    print(f"worker time to the full sweep's best ({full_best:.4f}): every trial to the budget "
          f"{full_reach:.0f} s, ASHA " + (f"{reach:.0f} s (x{full_reach / reach:.2f} less)" if reach
                                          else f"never (its best: {fast[-1][1]:.4f})"))
    print(f"best loss within ASHA's whole worker time ({asha_spent:.0f} s): ASHA {fast[-1][1]:.4f}, "
          f"every trial to the budget {at_same:.4f}; the whole budget-to-end sweep took {full[-1][0]:.0f} s "
          f"(x{full[-1][0] / asha_spent:.2f} ASHA's)")


def search(args) -> None:
    flags = ["--preset", args.preset, "--budget", args.budget, "--trials", str(args.trials),
             "--parallel", str(args.workers), "--prune", args.prune, "--seed", str(args.seed)]
    for s in args.search:
        flags += ["--search", s]
    for f in args.flag:
        flags += ["--flag", f]
    r = run_sweep(f"search-{args.preset}", flags, args.workers)
    print(f"{args.trials} trials of {args.budget} on {args.workers} workers: wall {r['wall']:.0f} s")
    print(r["table"])
    print(r["best"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("asha")
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--steps", type=int, default=200)
    s = sub.add_parser("search")
    s.add_argument("--preset", required=True)
    s.add_argument("--budget", required=True)
    s.add_argument("--trials", type=int, default=24)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--prune", default="asha")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--search", action="append", default=[])
    s.add_argument("--flag", action="append", default=[])
    args = ap.parse_args()
    asha(args) if args.what == "asha" else search(args)


if __name__ == "__main__":
    main()
