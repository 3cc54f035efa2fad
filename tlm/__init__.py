"""tlm: train small decoder-only Transformer language models with MLX.

Importing the package loads an optimized BLAS on Linux before anything
imports ``mlx.core`` (see :mod:`tlm.blas`).
"""

from tlm import blas as _blas

_blas.ensure_loaded()

__version__ = "0.1.0"
