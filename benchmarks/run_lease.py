"""What the run directory's lease (tlm/lease.py) costs a training run: the check before each
checkpoint and metrics record, the renewal every quarter ttl, and ptb-cpu's shape trained with
and without a lease in one process (alternating, so a busy machine weighs on both alike).

    python benchmarks/run_lease.py [--steps 40] [--rounds 2] [--dir /tmp/tlm-lease-bench]

Prints microseconds per check and renewal, seconds per step of each variant and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import tlm  # noqa: F401  (optimized BLAS before MLX)
from tlm.config import PRESETS, TrainConfig
from tlm.data import Dataset
from tlm.lease import RunLease
from tlm.train import Trainer
from tlm.vocab import WordTokenizer


def per_call(fn, n: int = 2000) -> float:
    tic = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - tic) / n * 1e6


def step_seconds(root: Path, steps: int, leased: bool, data: Dataset) -> float:
    """Seconds per step of ``steps`` ptb-cpu steps (a report, so a metrics record and a lease
    check, every 10), after two warm-up steps; a fresh run directory each time."""
    run = root / ("leased" if leased else "plain")
    shutil.rmtree(run, ignore_errors=True)
    flags = {k: v for k, v in PRESETS["ptb-cpu"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{**flags, "save_dir": str(run), "num_iters": steps + 2, "time_budget": 0,
                         "steps_per_eval": 10**6, "steps_per_report": 10, "eval_test": False,
                         "dataset": "ptb"})
    lease = RunLease(run).take() if leased else None
    try:
        trainer = Trainer(cfg, data, lease=lease)
        trainer.config = TrainConfig(**{**cfg.to_dict(), "num_iters": 2})
        trainer.run()  # compile and warm up, not timed
        trainer.config = cfg
        tic = time.perf_counter()
        trainer.run()
        return (time.perf_counter() - tic) / steps
    finally:
        if lease is not None:
            lease.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/tlm-lease-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)

    lease = RunLease(root / "micro").take()
    check, renew = per_call(lease.check), per_call(lease.renew, 500)
    lease.release()
    print(f"lease check: {check:.1f} us per call (one per checkpoint and metrics record)")
    print(f"lease renewal: {renew:.1f} us per call (one per quarter ttl, in a thread)")

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 10000, 400_000, dtype=np.int32)
    data = Dataset("ptb", WordTokenizer([str(i) for i in range(10000)]), tokens, tokens[:50_000], tokens[:50_000])
    times = {False: [], True: []}
    for r in range(args.rounds):
        for leased in (False, True) if r % 2 == 0 else (True, False):
            times[leased].append(step_seconds(root, args.steps, leased, data))
            print(f"round {r + 1}: {'with' if leased else 'without'} a lease: "
                  f"{times[leased][-1]:.3f} s/step", flush=True)
    plain, leased = min(times[False]), min(times[True])
    print(f"ptb-cpu step, best of {args.rounds}: without {plain:.3f} s, with {leased:.3f} s: "
          f"x{leased / plain:.3f}; the check itself is {check * 0.1 / (plain * 1e6):.2e} of a step")


if __name__ == "__main__":
    main()
