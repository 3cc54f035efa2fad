"""Data-parallel ranks: one process against 2 ranks at the same global batch, and the
all-reduce's cost, so a Mac user can predict their speed-up from their link.

    python benchmarks/ranks.py [--mirror ../shared/data] [--steps 30]

For the seed default and the ptb-cpu shapes: tokens/s of `tlm train` in one process
and with `--nodes 2` (here both ranks share this machine's cores, so the figure
shows the all-reduce's overhead, not a speed-up), and the time and bytes of one
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
from tlm.ranks import free_ports

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
            for nodes in (1, 2):
                run = Path(tmp) / f"{name}-{nodes}"
                subprocess.run(tlm + ["train", "--save_dir", str(run), *shape, "--num_iters", str(args.steps),
                                      "--steps_per_report", "5", "--steps_per_eval", "100000",
                                      "--eval_tokens", "500", "--nodes", str(nodes)],
                               env=env, check=True, capture_output=True)
                rates[nodes] = tokens_per_sec(run)
            ckpt = next((Path(tmp) / f"{name}-1").glob("*.safetensors"))
            n = sum(v.size for v in load_file(str(ckpt)).values())
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
            procs = [subprocess.Popen([sys.executable, "-c", ALL_REDUCE, str(n)], stdout=subprocess.PIPE,
                                      text=True, env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)})
                     for r in range(2)]
            out = [p.communicate(timeout=300)[0] for p in procs]
            seconds = json.loads(out[0].strip().splitlines()[-1])["seconds"]
            mb = n * 4 / 1e6
            print(f"{name}: 1 process {rates[1]:,.0f} tok/s, 2 ranks {rates[2]:,.0f} tok/s (x{rates[2] / rates[1]:.2f}, "
                  f"both on this machine's cores); gradients {n / 1e6:.1f}M parameters = {mb:.1f} MB per step, "
                  f"one ring all-reduce of them {seconds * 1000:.0f} ms on 127.0.0.1 "
                  f"({2 * mb / seconds / 1e3:.2f} GB/s effective)", flush=True)


if __name__ == "__main__":
    main()
