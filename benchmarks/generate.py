"""Generation speed, in one run: tlm against mlx-lm on the same exported model, and the
KV cache against full recomputation (the seed's method).

    python benchmarks/generate.py [--mirror ../shared/data]

Prints tokens/s of tlm's decode and mlx-lm's ``generate_step`` on one model
(the ptb-cpu shape, trained briefly, exported with ``tlm export`` and loaded
with ``mlx_lm.load``), greedy and sampled, 300 new tokens, best of three each,
as a ratio (goal: at least x1.0); tokens/s and time to first token for a few
prompt and output lengths at the seed's default shape and a small one, the
cache/recompute ratio; and the wall time of a queued `tlm sample` against
`tlm sample --local`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tlm  # noqa: F401
import mlx.core as mx

from tlm.config import TrainConfig, apply_preset
from tlm.data import load_dataset
from tlm.generate import SampleConfig, generate
from tlm.model import Model, ModelArgs
from tlm.train import Trainer

SHAPES = {"seed-default": (1024, 4, 8, 48, 10000), "small": (128, 4, 4, 64, 65)}
CASES = [(8, 32), (32, 64), (48, 128)]  # (prompt tokens, new tokens)


def recompute(model: Model, prompt: list[int], n: int, context: int):
    """The seed's method: the whole (windowed) sequence again for every token."""
    seq = list(prompt)
    for _ in range(n):
        token = int(mx.argmax(model(mx.array([seq[-context:]]))[0, -1]).item())
        seq.append(token)
        yield token


def timed(tokens) -> tuple[float, float, int]:
    tic = time.perf_counter()
    first, n = None, 0
    for _ in tokens:
        n += 1
        first = first or time.perf_counter() - tic
    return first, time.perf_counter() - tic, n


def bench_shapes() -> None:
    for name, (dim, blocks, heads, context, vocab) in SHAPES.items():
        mx.random.seed(0)
        model = Model(ModelArgs(vocab, dim, blocks, heads))
        mx.eval(model.parameters())
        model.eval()
        for p, n in CASES:
            prompt = list(range(1, p + 1))
            cfg = SampleConfig(max_tokens=n, temperature=0)
            list(generate(model, prompt, SampleConfig(max_tokens=2, temperature=0), context))
            ttft_c, total_c, _ = timed(generate(model, prompt, cfg, context))
            ttft_r, total_r, _ = timed(recompute(model, prompt, n, context))
            print(f"{name:>12} prompt {p:3d} new {n:3d}: cache {n / total_c:7.1f} tok/s "
                  f"(first {ttft_c * 1000:5.0f} ms)  recompute {n / total_r:7.1f} tok/s "
                  f"(first {ttft_r * 1000:5.0f} ms)  ratio x{total_r / total_c:.1f}", flush=True)


def bench_mlx_lm(mirror: str | None) -> None:
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from tlm import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "export"
        env = dict(os.environ, **({"TLM_DATA_MIRROR": mirror} if mirror else {}))
        tlm_ = [sys.executable, "-m", "tlm_cli.main"]
        config = TrainConfig(**{**apply_preset({"preset": "ptb-cpu"}), "save_dir": str(run),
                                "num_iters": 30, "eval_tokens": 500, "eval_test": False})
        Trainer(config, load_dataset("ptb", run / "datasets", mirror)).run()
        subprocess.run(tlm_ + ["export", "--save_dir", str(run), "--out", str(out)], env=env, check=True,
                       capture_output=True)
        ckpt = checkpoint.find(run)
        ours, context = ckpt.load_model(), ckpt.state["config"]["context_size"]
        theirs, _ = load(str(out))
        prompt = ckpt.tokenizer.encode("the company said")
        n = 300
        for label, temp, top_k in (("greedy", 0.0, 0), ("sampled t=0.5 top-k 50", 0.5, 50)):
            cfg = SampleConfig(max_tokens=n, temperature=temp, top_k=top_k, allow_unk=True)
            sampler = make_sampler(temp, top_k=top_k)

            runs = {"tlm": lambda: generate(ours, prompt, cfg, context),
                    "mlx-lm": lambda: generate_step(mx.array(prompt), theirs, max_tokens=n, sampler=sampler,
                                                    max_kv_size=context)}
            best = {}
            for name, fn in runs.items():
                list(fn())  # warm up
                best[name] = min(timed(fn())[1] for _ in range(3))
            print(f"decode, {label}: tlm {n / best['tlm']:6.0f} tok/s, mlx-lm generate_step "
                  f"{n / best['mlx-lm']:6.0f} tok/s: x{best['mlx-lm'] / best['tlm']:.2f} "
                  "(ptb-cpu shape, 300 new tokens, best of 3)", flush=True)


def bench_queue(mirror: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run, url = Path(tmp) / "run", f"sqlite://{tmp}/queue.db"
        env = dict(os.environ, **({"TLM_DATA_MIRROR": mirror} if mirror else {}))
        tlm_ = [sys.executable, "-m", "tlm_cli.main"]
        subprocess.run(tlm_ + ["train", "--save_dir", str(run), "--dim", "128", "--num_heads", "4",
                               "--num_iters", "5", "--eval_tokens", "500"],
                       env=env, check=True, capture_output=True)
        args = ["sample", "--save_dir", str(run), "--prompt", "the market", "--max_tokens", "30"]
        worker = subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url],
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            for label, extra in (("--local", ["--local"]), ("queued", ["--queue", url])):
                times = []
                for _ in range(3):
                    tic = time.perf_counter()
                    subprocess.run(tlm_ + args + extra, check=True, capture_output=True, env=env)
                    times.append(time.perf_counter() - tic)
                print(f"tlm sample {label:>8}: {min(times):.2f} s wall (best of 3, "
                      f"incl. process start)", flush=True)
        finally:
            worker.terminate()
            worker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", default=os.environ.get("TLM_DATA_MIRROR"))
    args = ap.parse_args()
    bench_shapes()
    bench_mlx_lm(args.mirror)  # after: its in-process training leaves the BLAS pinned to one thread
    bench_queue(args.mirror)


if __name__ == "__main__":
    main()
