"""Train-step throughput and model FLOP utilisation: optimized vs reference BLAS, CPU streams vs one.

Each (shape, variant) runs in its own process, because the BLAS and MLX's
graph-walk width must be chosen before ``mlx.core`` is imported. Prints
tokens/s, MFU against the measured sgemm peak, and per shape the ratios of
the default (optimized BLAS, one stream per core) to one stream with a
multi-threaded BLAS and MLX's default walk (how tlm ran before
``tlm.parallel``), to the reference BLAS and, where PyTorch is installed, to
nanoGPT's model and train step in PyTorch (``torch_reference.py``).

    python benchmarks/train_throughput.py [--steps 10] [--reference-steps 1] [--torch-python PY]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

SHAPES = {
    # name: (dim, blocks, heads, context, batch, vocab)
    "seed-default": (1024, 4, 8, 48, 32, 10000),
    "small": (128, 4, 4, 64, 12, 65),
}


def measure(shape: str, steps: int, checkpoint: bool = False) -> dict:
    import numpy as np

    import tlm  # noqa: F401  (loads the BLAS chosen by TLM_BLAS)
    import mlx.core as mx
    from tlm import blas, parallel
    from tlm.config import TrainConfig
    from tlm.data import Dataset
    from tlm.vocab import WordTokenizer
    from tlm.train import Trainer, num_params

    dim, blocks, heads, context, batch, vocab = SHAPES[shape]
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    tic = time.perf_counter()
    for _ in range(5):
        mx.eval(a @ a)
    peak = 5 * 2 * 1024**3 / (time.perf_counter() - tic)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, 200_000, dtype=np.int32)
    data = Dataset("random", WordTokenizer([str(i) for i in range(vocab)]), tokens, tokens, tokens)
    cfg = TrainConfig(dim=dim, num_blocks=blocks, num_heads=heads, context_size=context,
                      batch_size=batch, num_iters=10**6, save_dir="/tmp", checkpoint=checkpoint)
    trainer = Trainer(cfg, data)
    for _ in range(2):  # compile and warm up
        mx.eval(trainer._train_step(mx.array(next(trainer.batches))), trainer._state)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(steps):
        loss = trainer._train_step(mx.array(next(trainer.batches)))
        mx.eval(loss, trainer._state)
    seconds = time.perf_counter() - tic
    tokens_per_sec = steps * batch * context / seconds
    # 6 FLOPs per parameter per token (forward + backward), embeddings excluded
    # (a lookup), plus attention scores and values: 12 * layers * context * dim.
    n = num_params(trainer.model) - (0 if cfg.tie_embeddings else vocab * dim)
    flops_per_token = 6 * n + 12 * blocks * context * dim
    return {"shape": shape, "blas": blas.describe(), "tokens_per_sec": tokens_per_sec,
            "streams": len(parallel.streams()),
            "mfu": tokens_per_sec * flops_per_token / peak, "sgemm_gflops": peak / 1e9,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "checkpoint": checkpoint}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reference-steps", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--checkpoint", action="store_true", help="also measure gradient checkpointing")
    ap.add_argument("--torch-python", metavar="PY", help="a Python with torch for the PyTorch reference "
                    "(default: this one, if it has torch)")
    ap.add_argument("--child", nargs=3, metavar=("SHAPE", "STEPS", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shape, steps, ckpt = args.child
        print(json.dumps(measure(shape, int(steps), ckpt == "1")))
        return

    def run(shape: str, reference: bool, steps: int, ckpt: bool = False, one_stream: bool = False) -> dict:
        env = dict(os.environ, TLM_BLAS="reference" if reference else os.environ.get("TLM_BLAS", ""))
        if one_stream:
            env.update(TLM_CPU_STREAMS="1", MLX_BFS_MAX_WIDTH="20")
        out = subprocess.run([sys.executable, __file__, "--child", shape, str(steps), str(int(ckpt))],
                             env=env, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['shape']:>13}  {'reference' if reference else 'optimized':>9} BLAS, "
              f"{r['streams']} stream(s){'  +checkpoint' if ckpt else ''}: {r['tokens_per_sec']:10,.0f} tok/s  "
              f"MFU {r['mfu']:6.1%} of {r['sgemm_gflops']:.0f} GFLOP/s sgemm  "
              f"peak mem {r['peak_memory_gb']:.2f} GB   [{r['blas']}]", flush=True)
        return r

    torch_python = args.torch_python or (sys.executable if importlib.util.find_spec("torch") else None)

    def run_torch(shape: str, steps: int) -> dict:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
        out = subprocess.run([torch_python, script, json.dumps(SHAPES[shape]), str(steps)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{shape:>13}  PyTorch {r['torch']}, nanoGPT's model, {r['threads']} threads: "
              f"{r['tokens_per_sec']:10,.0f} tok/s", flush=True)
        return r

    for shape in args.shapes.split(","):
        fast = run(shape, False, args.steps)
        single = run(shape, False, args.steps, one_stream=True)
        print(f"{shape:>13}  streams / one stream: x{fast['tokens_per_sec'] / single['tokens_per_sec']:.2f}")
        if args.checkpoint:
            ck = run(shape, False, args.steps, True)
            print(f"{shape:>13}  checkpointing: speed x{ck['tokens_per_sec'] / fast['tokens_per_sec']:.2f}, "
                  f"peak memory x{ck['peak_memory_gb'] / fast['peak_memory_gb']:.2f}")
        if args.reference_steps > 0:
            ref = run(shape, True, args.reference_steps)
            print(f"{shape:>13}  optimized / reference BLAS: "
                  f"x{fast['tokens_per_sec'] / ref['tokens_per_sec']:.1f}")
        if torch_python:
            torch = run_torch(shape, args.steps)
            print(f"{shape:>13}  tlm / PyTorch: x{fast['tokens_per_sec'] / torch['tokens_per_sec']:.2f}")
        else:
            print(f"{shape:>13}  PyTorch reference skipped: no torch here (--torch-python PY)")


if __name__ == "__main__":
    main()
