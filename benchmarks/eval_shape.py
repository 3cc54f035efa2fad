"""What one evaluation batch shape saves (issue 42): ptb-cpu's model evaluated on a split whose
last batch is partial, with the last batch padded to the full shape (tlm today) and ragged (as
before), each variant in a fresh process with a fresh kernel cache (MLX's CPU backend writes the
kernels it compiles under $TMPDIR/mlx and reuses them across processes).

    python benchmarks/eval_shape.py [--evals 3] [--tokens 30000]

Prints, per variant: kernels compiled, seconds of the first and of the later evaluations, and the
loss; then the ratios and the losses' difference.
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


def run_variant(variant: str, evals: int, tokens: int) -> dict:
    """One evaluation series in this process: ``variant`` 'padded' or 'ragged'."""
    import numpy as np

    import tlm  # noqa: F401  (optimized BLAS before MLX)
    import mlx.core as mx

    from tlm import data, train
    from tlm.config import PRESETS, TrainConfig
    from tlm.model import Model

    if variant == "ragged":  # the batches as before: the padding rows dropped
        padded = data.eval_windows

        def ragged(*args, **kwargs):
            for x, y, w in padded(*args, **kwargs):
                keep = w.sum(axis=1) > 0
                yield x[keep], y[keep], w[keep]
        train.eval_windows = ragged
    flags = {k: v for k, v in PRESETS["ptb-cpu"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**flags)
    mx.random.seed(0)
    model = Model(train.model_args(cfg, 10_000))
    mx.eval(model.parameters())
    split = np.random.default_rng(0).integers(0, 10_000, tokens + 1).astype(np.int32)
    seconds, loss = [], None
    for _ in range(evals):
        tic = time.perf_counter()
        loss = train.evaluate(model, split, cfg.context_size)
        seconds.append(time.perf_counter() - tic)
    return {"seconds": seconds, "loss": loss}


def fresh(variant: str, evals: int, tokens: int) -> dict:
    """``run_variant`` in a new process whose kernel cache starts empty; counts what it compiled."""
    with tempfile.TemporaryDirectory(prefix="tlm-eval-shape-") as tmp:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--evals", str(evals),
                              "--tokens", str(tokens)], env={**os.environ, "TMPDIR": tmp},
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["kernels"] = sum(1 for _ in Path(tmp).rglob("*.so"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=30_000, help="split length (a partial last batch)")
    ap.add_argument("--variant", choices=("padded", "ragged"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.evals, args.tokens)))
        return
    results = {v: fresh(v, args.evals, args.tokens) for v in ("ragged", "padded")}
    for variant, r in results.items():
        later = sum(r["seconds"][1:]) / max(1, len(r["seconds"]) - 1)
        print(f"{variant:7} kernels compiled {r['kernels']:3}  first evaluation {r['seconds'][0]:7.2f}s  "
              f"later {later:6.2f}s  loss {r['loss']:.7f}")
    ragged, padded = results["ragged"], results["padded"]
    print(f"padded/ragged: first evaluation x{padded['seconds'][0] / ragged['seconds'][0]:.2f}, "
          f"later x{sum(padded['seconds'][1:]) / max(1e-9, sum(ragged['seconds'][1:])):.2f}, "
          f"kernels {padded['kernels']}/{ragged['kernels']}; "
          f"loss difference {abs(padded['loss'] - ragged['loss']):.1e}")


if __name__ == "__main__":
    main()
