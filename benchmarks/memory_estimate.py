"""The queue's memory estimate (tlm.memory.estimate) against MLX's measured peak memory.

Each preset (and any extra shape) trains 3 steps and one evaluation in a fresh
process, which prints mx.get_peak_memory(); the estimate is computed beside it.
Presets whose data is not at hand (no mirror copy) are listed as skipped.

    .venv/bin/python benchmarks/memory_estimate.py [--presets ptb-cpu,shakespeare-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys
import tlm
import mlx.core as mx
from tlm.run import train
train(json.loads(sys.argv[1]))
print("PEAK", mx.get_peak_memory())
"""


def measure(flags: dict) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(flags)], capture_output=True,
                         text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK"):
            return int(line.split()[1])
    raise RuntimeError(out.stderr[-2000:])


def shapes(names: list[str]) -> dict[str, dict]:
    from tlm.config import PRESETS
    out = {}
    for name in names:
        if name in PRESETS:
            out[name] = {**PRESETS[name], "preset": name}
        else:  # an extra shape: key=value pairs separated by ';'
            out[name] = {k: json.loads(v) if v[0].isdigit() else v
                         for k, v in (kv.split("=") for kv in name.split(";"))}
    return out


def main() -> None:
    from tlm.config import PRESETS, TrainConfig
    from tlm.memory import EVAL_TOKENS, estimate

    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    mirror = os.environ.get("TLM_DATA_MIRROR") or str(ROOT.parent / "shared" / "data")
    have = {"ptb": "ptb/ptb.train.txt", "shakespeare": "tinyshakespeare/input.txt"}
    print(f"{'shape':18} {'estimate':>10} {'measured':>10} {'ratio':>6}")
    for name, flags in shapes(args.presets.split(",")).items():
        cfg = TrainConfig(**{k: v for k, v in flags.items() if k != "preset"})
        if cfg.dataset not in have or not (Path(mirror) / have[cfg.dataset]).exists():
            print(f"{name:18} skipped: no {cfg.dataset} data here")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run = {**flags, "save_dir": tmp, "num_iters": 3, "steps_per_eval": 3, "time_budget": 0,
                   "eval_tokens": EVAL_TOKENS, "eval_test": False, "gpu": False, "data_mirror": mirror}
            peak = measure(run)
        guess = estimate(flags)
        print(f"{name:18} {guess / 2**30:9.2f}G {peak / 2**30:9.2f}G {guess / peak:6.2f}", flush=True)


if __name__ == "__main__":
    main()
