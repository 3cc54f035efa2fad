"""Race a preset, and variants of it, to a loss target: wall time from process start, with the data cached.

    python benchmarks/race.py --preset shakespeare-cpu --target 1.88 --limit 60
    python benchmarks/race.py --preset ptb-cpu --split test --target 4.477 --limit 900 \\
        --variant wsd="--lr_cooldown 0.4" --variant batch16="--batch_size 16"

(PTB targets are test losses, evaluated at the end of the run: ln 115.9 = 4.753,
ln 88 = 4.477, ln 82.1 = 4.408.) Each contender (the preset, then each
``--variant NAME="FLAGS"`` in turn, one at a time so each has the machine) is
``tlm train`` in a fresh process; the race follows the run's metrics.jsonl,
stops the run (SIGINT: it saves) when a whole-split loss of the raced split
reaches the target or at the time limit, and prints the curve (validation and
test loss against seconds), time-to-target, and at the end one table with each
variant's last loss and perplexity as a ratio of the preset's, from the same
run. Extra arguments after ``--`` go to every contender's ``tlm train``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import tlm  # noqa: F401
from tlm import metrics
from tlm.config import PRESETS
from tlm.data import load_dataset


def race(cmd: list[str], run: Path, split: str, target: float, limit: float) -> tuple[Optional[dict], Optional[dict]]:
    """Run one contender: (the record that reached the target or None, the last record of ``split``)."""
    print("command:", " ".join(cmd[2:]), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reached, last, seen = None, None, set()
    while time.time() - start < limit and reached is None:
        finished = proc.poll() is not None  # then read once more: a run's last record (test) ends it
        time.sleep(0.5)
        for r in metrics.read(run):
            if r["kind"] not in ("valid", "test") or (r["kind"], r["step"]) in seen:
                continue  # records come sorted by (step, kind), so count-based slicing misses some
            seen.add((r["kind"], r["step"]))
            r["wall"] = r["time"] - start
            metric = f"ppl {r['ppl']:.1f}" if "ppl" in r else f"bpc {r['bpc']:.3f}"
            print(f"  {r['wall']:7.1f} s  step {r['step']:6d}  tokens {r['tokens']:>11,}  "
                  f"{r['kind']:>5} loss {r['loss']:.4f} ({metric})", flush=True)
            if r["kind"] == split:
                last = r
                if r["loss"] <= target and reached is None:
                    reached = r
        if finished:
            break
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    return reached, last


def variant(text: str) -> tuple[str, list[str]]:
    """``NAME="FLAGS"`` -> (NAME, the flags as tlm train arguments)."""
    name, sep, flags = text.partition("=")
    if not (name and sep):
        raise argparse.ArgumentTypeError(f'{text!r} is not NAME="FLAGS", e.g. wsd="--lr_cooldown 0.5"')
    return name, shlex.split(flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--target", type=float, required=True, help="loss to reach (nats)")
    ap.add_argument("--split", default="valid", choices=["valid", "test"],
                    help="the split whose loss must reach the target")
    ap.add_argument("--limit", type=float, default=600, help="seconds before giving up, per contender")
    ap.add_argument("--variant", action="append", default=[], type=variant, metavar='NAME="FLAGS"',
                    help="race the preset with these tlm train flags too (repeatable)")
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"))
    ap.add_argument("--keep", metavar="DIR", help="run in DIR/<contender> and keep them (default: a temporary directory)")
    ap.add_argument("extra", nargs="*", help="more tlm train flags for every contender (after --)")
    args = ap.parse_args()
    contenders = [(args.preset, []), *args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        results = []
        for name, flags in contenders:
            run = root / name
            load_dataset(PRESETS[args.preset]["dataset"], run / "datasets", args.mirror)  # cached first
            cmd = [sys.executable, "-m", "tlm_cli.main", "train", "--preset", args.preset,
                   "--save_dir", str(run), *args.extra, *flags]
            reached, last = race(cmd, run, args.split, args.target, args.limit)
            if reached:
                print(f"{name}: {args.split} loss {reached['loss']:.4f} <= {args.target} after "
                      f"{reached['wall']:.1f} s wall ({reached['elapsed']:.1f} s training), "
                      f"{reached['tokens']:,} tokens, step {reached['step']}", flush=True)
            else:
                print(f"{name}: {args.split} loss did not reach {args.target} within {args.limit:.0f} s", flush=True)
            results.append((name, flags, reached, last))
    base = results[0][3]
    print(f"\n{'contender':<14} {'last ' + args.split + ' loss':>16} {'ppl':>8} {'x preset':>9} {'wall s':>8} "
          f"{'steps':>7}  target reached at")
    for name, flags, reached, last in results:
        if last is None:
            print(f"{name:<14} {'no ' + args.split + ' evaluation':>16}")
            continue
        ratio = math.exp(last["loss"] - base["loss"]) if base else float("nan")
        at = f"{reached['wall']:.1f} s" if reached else "-"
        print(f"{name:<14} {last['loss']:>16.4f} {math.exp(last['loss']):>8.2f} {ratio:>9.3f} "
              f"{last['wall']:>8.1f} {last['step']:>7}  {at}   {' '.join(flags)}")


if __name__ == "__main__":
    main()
