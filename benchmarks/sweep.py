"""tlm sweep on this machine: ASHA against running every trial to its budget, and preset searches.

    .venv/bin/python benchmarks/sweep.py asha   [--workers 2]   # the same 16 configurations twice
    .venv/bin/python benchmarks/sweep.py compare [--seeds 0,1,2] [--seconds 120] [--steps 200]
        # one search space, seeds and worker budget: no pruning, stopping ASHA, promotion ASHA, PBT
    .venv/bin/python benchmarks/sweep.py train-on [--more 200] [--cooldown 0.2]
        # a sweep's winner trained on from its checkpoint vs its flags retrained from scratch
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
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

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


def evaluations(root: Path, trials: list[dict], start: float, workers: int) -> list[tuple[float, float]]:
    """(worker-seconds since the sweep began, best validation loss so far) at every evaluation
    of every trial, in time order: workers x wall time, as every worker of a burst is busy."""
    points = []
    for t in trials:
        for line in (root / t["run"] / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "valid":
                points.append((r["time"], r["loss"]))
    out, best = [], float("inf")
    for when, loss in sorted(points):
        best = min(best, loss)
        out.append(((when - start) * workers, best))
    return out


def rank_quality(series: list[dict[int, float]], rungs: list[float]) -> dict[str, list[float]]:
    """How well each rung metric ranks trials trained to the end (their final loss): Spearman's
    rank correlation at each rung of one evaluation at the rung, and of promotion ASHA's
    (``sweeps.rung_value``: the mean over the rung's second half)."""
    import numpy as np  # numpy

    from tlm_worker.sweeps import rung_value

    def spearman(a: list[float], b: list[float]) -> float:
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])
    done = [s for s in series if s]
    final = [s[max(s)] for s in done]
    return {"one evaluation": [spearman([s[min(k for k in s if k >= r)] for s in done], final) for r in rungs],
            "second-half mean": [spearman([rung_value(s, r) for s in done], final) for r in rungs]}


def run_for(name: str, args: list[str], workers: int, seconds: float) -> dict:
    """A sweep of many trials on a fresh queue, its workers given ``seconds`` of wall time (so
    workers x seconds of worker time), then cancelled: the best validation loss it had found
    by then, in the trials' own evaluations and on the whole validation split (its trial's
    checkpoint when the budget ran out), and the best-so-far curve against worker time."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TLM_QUEUE": f"sqlite://{tmp}/queue.db"}
        root = Path(tmp) / "root"
        root.mkdir()
        tlm = lambda *a: subprocess.run([*TLM, *a], env=env, check=True, capture_output=True, text=True)  # noqa: E731
        tlm("sweep", "submit", "--name", name, *args)
        tic = time.time()
        procs = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--save_root", str(root)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
        time.sleep(max(0.0, tic + seconds - time.time()))
        subprocess.run([*TLM, "sweep", "cancel", name], env=env, capture_output=True)  # unless it ended: running
        # trials save; nothing after the budget counts
        deadline = time.time() + 120
        while json.loads(tlm("sweep", "status", name, "--json").stdout)["sweep"]["state"] == "running" \
                and time.time() < deadline:
            time.sleep(1)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        trials = json.loads(tlm("sweep", "status", name, "--json").stdout)["trials"]
        curve = [(t, b) for t, b in evaluations(root, trials, tic, workers) if t <= seconds * workers]
        best_loss = curve[-1][1] if curve else float("inf")
        winner = next((t for t in trials if t["best"] is not None and t["best"] <= best_loss), trials[0])
        scored = tlm("eval", "--save_dir", str(root / winner["run"]), "--split", "valid").stdout
        states = {s: sum(t["state"] == s for t in trials) for s in {t["state"] for t in trials}}
        states["sweep"] = json.loads(tlm("sweep", "status", name, "--json").stdout)["sweep"]["state"]
        return {"curve": curve, "found": best_loss, "states": states, "trials": trials,
                "whole": float(scored.split("valid loss ")[1].split()[0]),
                "series": [{r["step"]: r["loss"] for r in map(json.loads, (root / t["run"] / "metrics.jsonl")
                                                              .read_text().splitlines()) if r.get("kind") == "valid"}
                           for t in trials if (root / t["run"] / "metrics.jsonl").exists()]}


def compare(args) -> None:
    """The same space, seeds and worker budget searched with each pruning (and ``pbt``: population
    based training, its population sharing the worker budget, each member given an equal share of
    it as a time budget): the best found (in the trials' evaluations, and scored on the whole
    validation split), and the worker time each took to reach the best of stopping ASHA with trials
    as long as its own (``reference``)."""
    space = ["--search", "learning_rate=log:3e-4:3e-2", "--search", "dim=32,64,96,128", "--search", "lr_warmup=1:50"]
    figures: dict[str, list[dict]] = {}
    for seed in args.seeds:
        common = [*SHAPE, *space, "--sampler", "tpe", "--seed", str(seed)]
        share = args.seconds * args.workers / args.population * 0.85 / 60  # of training, less start-ups
        # a pruning's trials train --steps each, or, named PRUNE-long, as long as a PBT member may
        how = {prune: ["--schedule", "pbt", "--population", str(args.population), "--budget", f"{share:.2f}m"]
               if prune == "pbt" else ["--trials", "1000", "--parallel", str(args.workers), "--prune",
                                       prune.removesuffix("-long"), "--budget",
                                       f"{share:.2f}m" if prune.endswith("-long") else str(args.steps)]
               for prune in args.prunes}
        runs = {prune: run_for(f"cmp-{prune}-{seed}", [*common, *how[prune]], args.workers, args.seconds)
                for prune in args.prunes}
        if "none" in runs:  # every trial trained to the end: which rung metric ranks them better
            rungs = [25.0 * 3 ** k for k in range(3) if 25 * 3 ** k < args.steps]
            done = [s for s in runs["none"]["series"] if s and max(s) >= args.steps]
            for metric, rho in rank_quality(done, rungs).items():
                print(f"seed {seed}: rank correlation with the final loss of {len(done)} trials at rungs "
                      f"{rungs}, {metric}: " + ", ".join(f"{r:.3f}" for r in rho), flush=True)
        for prune, r in runs.items():
            ref = reference(prune, runs)
            reach = next((t for t, b in r["curve"] if ref and b <= runs[ref]["found"]), None)
            figures.setdefault(prune, []).append({"whole": r["whole"], "found": r["found"], "reach": reach})
            print(f"seed {seed} --prune {prune}: best found {r['found']:.4f} (whole split {r['whole']:.4f}), "
                  f"reached {ref}'s best " + (f"after {reach:.0f} worker-s" if reach is not None else "never")
                  + f", trials {r['states']}", flush=True)
    print(f"\nmean over seeds {args.seeds}, {args.workers} workers x {args.seconds:.0f} s each (perplexity = exp(loss)):")
    for prune, rows in figures.items():
        whole = sum(r["whole"] for r in rows) / len(rows)
        reached = [r["reach"] for r in rows if r["reach"] is not None]
        line = f"  {prune:14s} whole-split loss {whole:.4f} (ppl {math.exp(whole):.3f})"
        ref = reference(prune, figures)
        if ref:
            base = figures[ref]
            mean = sum(r["whole"] for r in base) / len(base)
            line += f", ppl x{math.exp(whole) / math.exp(mean):.4f} {ref}'s"
            ref_reach = [r["reach"] for r in base if r["reach"] is not None]
            line += (f", reached {ref}'s best in {sum(reached) / len(reached):.0f} worker-s on average "
                     f"(x{(sum(reached) / len(reached)) / (sum(ref_reach) / len(ref_reach)):.2f}), "
                     if reached and ref_reach else ", ") + f"in {len(reached)} of {len(rows)} seeds"
        print(line, flush=True)


def reference(method: str, runs: dict) -> Optional[str]:
    """What a method is measured against: stopping ASHA at the same length of trial (PBT's members
    train as long as the -long trials)."""
    ref = "asha-stop-long" if method.endswith("-long") or method == "pbt" else "asha-stop"
    return ref if ref in runs else None


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


def train_on(args) -> None:
    """`tlm sweep best --train-on`: the winner of a promotion-ASHA sweep trained ``--more`` steps
    on from its checkpoint, against its flags trained from scratch for the same total steps; each
    scored on the whole validation split, with its wall time (one worker). ``--cooldown C``: the
    trials use the warmup-stable-decay schedule (``--lr_cooldown C``), and training on branches
    from the winner's last checkpoint before its cooldown."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TLM_QUEUE": f"sqlite://{tmp}/queue.db", "TLM_SAVE_ROOT": f"{tmp}/root"}
        Path(tmp, "root").mkdir()
        space = ["--search", "learning_rate=log:3e-4:3e-2", "--search", "dim=32,64,96,128"]
        tlm = lambda *a: subprocess.run([*TLM, *a], env=env, check=True, capture_output=True, text=True)  # noqa: E731
        cooldown = ["--flag", f"lr_cooldown={args.cooldown}"] if args.cooldown else []
        tlm("sweep", "submit", "--name", "won", *SHAPE, *cooldown, *space, "--trials", str(args.trials), "--parallel",
            str(args.workers), "--budget", str(args.steps), "--seed", "0")

        def work(n: int = 1) -> None:
            procs = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--burst"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
            for p in procs:
                p.wait()
        work(args.workers)
        best = tlm("sweep", "best", "won").stdout.split()
        flags = [a if a != "NAME" else "scratch" for a in best[3:]]
        run = json.loads(tlm("sweep", "status", "won", "--json").stdout)["trials"][0]["run"]
        timings = {}
        for name, submit in (("trained on", ["sweep", "best", "won", "--train-on", str(args.more)]),
                             ("from scratch", ["submit", "train", *flags, "--num_iters", str(args.steps + args.more)])):
            tlm(*submit)
            tic = time.time()
            work()
            timings[name] = time.time() - tic
        for name, where in (("trained on", run), ("from scratch", "scratch")):
            scored = tlm("eval", "--save_dir", f"{tmp}/root/{where}", "--split", "valid").stdout
            loss = float(scored.split("valid loss ")[1].split()[0])
            print(f"{name:>12}: whole-split valid loss {loss:.4f} (ppl {math.exp(loss):.3f}) at "
                  f"{args.steps + args.more} steps; its job's wall time {timings[name]:.0f} s", flush=True)


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
    c = sub.add_parser("compare")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--seconds", type=float, default=120.0, help="each sweep's wall time (x --workers: its worker time)")
    c.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    c.add_argument("--prunes", type=lambda s: s.split(","), default=["none", "asha-stop", "asha", "pbt"],
                   help="pruning methods (PRUNE-long: each trial as long as a PBT member), and pbt for "
                        "population based training")
    c.add_argument("--population", type=int, default=4, help="pbt's population")
    t = sub.add_parser("train-on")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--more", type=int, default=200)
    t.add_argument("--trials", type=int, default=8)
    t.add_argument("--cooldown", type=float, default=0.0, help="--lr_cooldown of the trials (0: cosine)")
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
    {"asha": asha, "compare": compare, "train-on": train_on, "search": search}[args.what](args)


if __name__ == "__main__":
    main()
