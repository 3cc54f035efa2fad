"""Dataset preparation: first run (read, tokenize, cache) against a cached run.

    python benchmarks/data_prep.py [--mirror ../shared/data] [--big-copies 110]

Each case runs in a fresh process (so its peak memory is its own): PTB and
Tiny Shakespeare from the mirror, and, standing in for WikiText-103 (over 100M
words), PTB's training text repeated ``--big-copies`` times as your own text
with the word tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(name: str, data_dir: str, mirror: str, tokenizer: str | None) -> None:
    import tlm  # noqa: F401
    from tlm.data import load_dataset

    tic = time.perf_counter()
    d = load_dataset(name, data_dir, mirror, tokenizer=tokenizer)
    seconds = time.perf_counter() - tic
    tokens = len(d.train) + len(d.valid) + len(d.test)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "vocab": d.vocab_size,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(name: str, data_dir: Path, mirror: str, tokenizer: str | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, str(data_dir), mirror,
                          tokenizer or ""], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR", "../shared/data"))
    ap.add_argument("--big-copies", type=int, default=110)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, data_dir, mirror, tok = args.child
        child(name, data_dir, mirror, tok or None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "big.txt"
        with open(big, "w") as f:
            train = (Path(args.mirror) / "ptb" / "ptb.train.txt").read_text()
            for _ in range(args.big_copies):
                f.write(train)
        cases = [("ptb", None), ("shakespeare", None), (str(big), "word")]
        for name, tok in cases:
            first = run(name, tmp / "data", args.mirror, tok)
            cached = run(name, tmp / "data", args.mirror, tok)
            label = f"{args.big_copies}x PTB as own text (word)" if name == str(big) else name
            print(f"{label:>30}: first {first['seconds']:6.1f} s ({first['tokens'] / first['seconds']:>12,.0f} "
                  f"tokens/s, {first['tokens']:,} tokens, vocab {first['vocab']:,}, peak {first['peak_mb']:,.0f} MB)"
                  f"  cached {cached['seconds']:.3f} s (peak {cached['peak_mb']:,.0f} MB)  "
                  f"ratio x{first['seconds'] / cached['seconds']:,.0f}", flush=True)


if __name__ == "__main__":
    main()
