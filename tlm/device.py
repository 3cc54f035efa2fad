"""Which MLX device a process computes on: a small module, so choosing one imports no trainer."""

from __future__ import annotations

import mlx.core as mx

from tlm.config import ConfigError


def select_device(gpu: bool) -> str:
    """Use MLX's GPU when asked (and present: Metal on macOS, CUDA on Linux), otherwise the CPU."""
    if gpu and not mx.is_available(mx.gpu):
        raise ConfigError("--gpu: no GPU backend (Metal or CUDA) is available on this machine")
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    return "gpu" if gpu else "cpu"

