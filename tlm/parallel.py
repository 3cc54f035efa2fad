"""Data parallelism across CPU streams, so that every core works.

MLX's CPU backend runs each stream's operations on that stream's own thread,
but its kernels are single-threaded except the BLAS matmuls: on a 2-core
machine one core idled through the softmax, the activations, the loss and the
optimizer. Splitting a batch across one stream per core, with the BLAS pinned
to one thread per call, keeps both busy: x1.11-1.13 tokens/s at the seed default
shape, x1.06-1.23 at the small one (``benchmarks/train_throughput.py`` compares
``TLM_CPU_STREAMS=1``), up to x1.7 at larger batches.

The streams only overlap when MLX interleaves their operations while it walks
the graph, which its breadth-first walk does when it is wide enough; ``tlm``
widens it (``MLX_BFS_MAX_WIDTH``, see :mod:`tlm.blas`) before MLX is imported.

On the GPU, and on macOS (whose Accelerate BLAS cannot be pinned to one
thread), everything stays on the default stream.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from tlm import blas
from tlm.config import ConfigError

_local = threading.local()  # MLX streams belong to the thread that made them


def stream_count() -> int:
    """One stream per usable core on a Linux CPU (env ``TLM_CPU_STREAMS`` overrides), else 1."""
    if mx.default_device() != mx.cpu or not sys.platform.startswith("linux"):
        return 1
    wanted = os.environ.get("TLM_CPU_STREAMS")
    if not wanted:
        return len(os.sched_getaffinity(0))
    if not wanted.isdigit() or int(wanted) < 1:
        raise ConfigError(f"TLM_CPU_STREAMS must be a positive whole number, got {wanted!r}")
    return int(wanted)


def streams() -> list[mx.Stream]:
    """This thread's streams to split batches across (created once per thread)."""
    n = stream_count()
    if getattr(_local, "streams", None) is None or len(_local.streams) != n:
        if n == 1:
            _local.streams = [mx.default_stream(mx.default_device())]
        else:
            blas.set_threads(1)  # one BLAS thread per stream: the streams are the parallelism
            _local.streams = [mx.new_stream(mx.cpu) for _ in range(n)]
    return _local.streams


def map_shards(fn: Callable[..., Any], arrays: Sequence[mx.array]) -> list[tuple[float, Any]]:
    """``fn`` on each stream's share of the arrays' first axis: [(share of the rows, result)].

    Only builds the graph (inside ``mx.compile`` too); nothing is evaluated here.
    """
    n, parts = arrays[0].shape[0], streams()
    bounds = [n * i // len(parts) for i in range(len(parts) + 1)]
    out = []
    for stream, lo, hi in zip(parts, bounds, bounds[1:]):
        if hi > lo:
            with mx.stream(stream):
                out.append(((hi - lo) / n, fn(*(a[lo:hi] for a in arrays))))
    return out


def weighted_sum(shards: list[tuple[float, Any]]) -> Any:
    """Sum of the shards' results (arrays or trees of them), each times its share."""
    weights, results = zip(*shards)
    if len(results) == 1:
        return results[0]
    return tree_map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *results)


def spread_updates(optimizer: optim.Optimizer) -> None:
    """Run an optimizer's per-parameter updates on the least-loaded stream (by parameter size).

    Updates are elementwise (AdamW) or small matmul chains (Muon's Newton-Schulz
    iterations), each single-threaded; spread out, the streams run them side by side.
    """
    load: dict[int, int] = {}  # stream index -> parameter elements placed on it
    for part in getattr(optimizer, "optimizers", [optimizer]):  # a MultiOptimizer's parts
        part.apply_single = _on_least_loaded(part.apply_single, load)


def _on_least_loaded(apply_single: Callable, load: dict[int, int]) -> Callable:
    def wrapped(gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        parts = streams()
        i = min(range(len(parts)), key=lambda j: load.get(j, 0))
        load[i] = load.get(i, 0) + parameter.size
        with mx.stream(parts[i]):
            return apply_single(gradient, parameter, state)

    return wrapped
