"""Race a preset to a validation-loss target: wall time from process start, with the data cached.

    python benchmarks/race.py --preset shakespeare-cpu --target 1.88 --limit 60
    python benchmarks/race.py --preset ptb-cpu --split test --target 4.753 --limit 900

(PTB targets are test losses, evaluated at the end of the run: ln 115.9 = 4.753,
ln 82.1 = 4.408.) Starts ``tlm train`` as a fresh process, follows the run's
metrics.jsonl, stops the run (SIGINT: it saves) when a whole-split loss of the
raced split reaches the target or at the time limit, and prints time-to-target,
tokens seen and the curve (validation and test loss against seconds). Extra
arguments after ``--`` go to ``tlm train``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tlm  # noqa: F401
from tlm import metrics
from tlm.config import PRESETS
from tlm.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--target", type=float, required=True, help="validation loss to reach (nats)")
    ap.add_argument("--split", default="valid", choices=["valid", "test"],
                    help="the split whose loss must reach the target")
    ap.add_argument("--limit", type=float, default=600, help="seconds before giving up")
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"))
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temporary directory)")
    ap.add_argument("extra", nargs="*", help="more tlm train flags (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.keep or Path(tmp) / "run")
        load_dataset(PRESETS[args.preset]["dataset"], run / "datasets", args.mirror)  # cached first
        cmd = [sys.executable, "-m", "tlm_cli.main", "train", "--preset", args.preset,
               "--save_dir", str(run), *args.extra]
        print("command:", " ".join(cmd[2:]), flush=True)
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reached, seen = None, set()
        while time.time() - start < args.limit and reached is None:
            finished = proc.poll() is not None  # then read once more: a run's last record (test) ends it
            time.sleep(0.5)
            evals = [r for r in metrics.read(run) if r["kind"] in ("valid", "test")]
            for r in evals:
                if (r["kind"], r["step"]) in seen:
                    continue  # records come sorted by (step, kind), so count-based slicing misses some
                seen.add((r["kind"], r["step"]))
                metric = f"ppl {r['ppl']:.1f}" if "ppl" in r else f"bpc {r['bpc']:.3f}"
                print(f"  {r['time'] - start:7.1f} s  step {r['step']:6d}  tokens {r['tokens']:>11,}  "
                      f"{r['kind']:>5} loss {r['loss']:.4f} ({metric})", flush=True)
                if r["kind"] == args.split and r["loss"] <= args.target and reached is None:
                    reached = r
            if finished:
                break
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        if reached:
            print(f"{args.preset}: {args.split} loss {reached['loss']:.4f} <= {args.target} after "
                  f"{reached['time'] - start:.1f} s wall ({reached['elapsed']:.1f} s training), "
                  f"{reached['tokens']:,} tokens, step {reached['step']}")
        else:
            print(f"{args.preset}: {args.split} loss did not reach {args.target} within {args.limit:.0f} s")


if __name__ == "__main__":
    main()
