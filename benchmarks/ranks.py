"""Data-parallel ranks: one process against 2 ranks at the same global batch, and the
all-reduce's cost, so a Mac user can predict their speed-up from their link.

    python benchmarks/ranks.py [--mirror ../shared/data] [--steps 30]

For the seed default and the ptb-cpu shapes: tokens/s of `tlm train` in one process,
with `--nodes 2`, and as a gang job of two `tlm-worker`s through the queue (here all
ranks share this machine's cores, so the figures show the all-reduce's and the
queue's overhead, not a speed-up; for the gang also the seconds from submit to
start, gathering the workers), and the time and bytes of one
all-reduce of the model's gradients between 2 ranks over the ring backend on
127.0.0.1. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.numpy import load_file

from tlm import metrics
from tlm.ranks import free_ports, rank_env
from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

SHAPES = {"seed default": ["--dim", "1024", "--num_blocks", "4", "--num_heads", "8", "--context_size", "48",
                           "--batch_size", "32"],
          "ptb-cpu": ["--preset", "ptb-cpu", "--time_budget", "0"]}

ALL_REDUCE = r"""
import json, sys, time
import tlm, mlx.core as mx
group = mx.distributed.init(strict=True, backend="ring")
n = int(sys.argv[1])
x = mx.ones((n,))
mx.eval(mx.distributed.all_sum(x, group=group))
times = []
for _ in range(10):
    tic = time.perf_counter()
    mx.eval(mx.distributed.all_sum(x, group=group))
    times.append(time.perf_counter() - tic)
if group.rank() == 0:
    print(json.dumps({"seconds": sorted(times)[len(times) // 2]}))
"""


def tokens_per_sec(run: Path) -> float:
    rates = [r["tokens_per_sec"] for r in metrics.read(run) if r["kind"] == "train"]
    return statistics.median(rates[1:] or rates)


def gang(tlm: list[str], run: Path, flags: list[str], env: dict) -> float:
    """Train as a gang of two burst workers on a fresh SQLite queue; seconds to gather them."""
    url = f"sqlite://{run.parent / (run.name + '.db')}"
    job_id = subprocess.run(tlm + ["submit", "train", "--save_dir", str(run), *flags, "--queue", url],
                            env=env, check=True, capture_output=True, text=True).stdout.strip()
    workers = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--burst"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    for w in workers:
        w.wait(timeout=1800)
    job = Registry(Queue(url)).get(job_id)
    assert job["state"] == "succeeded", job
    return job["started"] - job["created"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    env = dict(os.environ, **({"TLM_DATA_MIRROR": args.mirror} if args.mirror else {}))
    tlm = [sys.executable, "-m", "tlm_cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            rates = {}
            flags = [*shape, "--num_iters", str(args.steps), "--steps_per_report", "5",
                     "--steps_per_eval", "100000", "--eval_tokens", "500"]
            for nodes in (1, 2):
                run = Path(tmp) / f"{name}-{nodes}"
                subprocess.run(tlm + ["train", "--save_dir", str(run), *flags, "--nodes", str(nodes)],
                               env=env, check=True, capture_output=True)
                rates[nodes] = tokens_per_sec(run)
            run = Path(tmp) / f"{name}-gang"
            gathered = gang(tlm, run, [*flags, "--nodes", "2"], env)
            rates["gang"] = tokens_per_sec(run)
            ckpt = next((Path(tmp) / f"{name}-1").glob("*.safetensors"))
            n = sum(v.size for v in load_file(str(ckpt)).values())
            members = [{"address": "127.0.0.1", "port": p} for p in free_ports(2)]
            procs = [subprocess.Popen([sys.executable, "-c", ALL_REDUCE, str(n)], stdout=subprocess.PIPE,
                                      text=True, env={**env, **rank_env("ring", members, r, Path(tmp))})
                     for r in range(2)]
            out = [p.communicate(timeout=300)[0] for p in procs]
            seconds = json.loads(out[0].strip().splitlines()[-1])["seconds"]
            mb = n * 4 / 1e6
            print(f"{name}: 1 process {rates[1]:,.0f} tok/s, 2 ranks {rates[2]:,.0f} tok/s (x{rates[2] / rates[1]:.2f}, "
                  f"both on this machine's cores), a gang of 2 workers {rates['gang']:,.0f} tok/s "
                  f"(x{rates['gang'] / rates[1]:.2f}; gathered {gathered:.1f} s after submit); gradients {n / 1e6:.1f}M parameters = {mb:.1f} MB per step, "
                  f"one ring all-reduce of them {seconds * 1000:.0f} ms on 127.0.0.1 "
                  f"({2 * mb / seconds / 1e3:.2f} GB/s effective)", flush=True)


if __name__ == "__main__":
    main()
