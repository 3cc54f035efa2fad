"""tlm: train small decoder-only Transformer language models with MLX.

Importing the package loads an optimized BLAS on Linux before anything
imports ``mlx.core`` (see :mod:`tlm.blas`).
"""

import os as _os

from tlm import blas as _blas


def _standard_descriptors_open() -> None:
    """Open descriptors 0-2 on /dev/null where they are closed (``exec 0<&-``, some service
    managers): a checkpoint file opened as descriptor 0 makes MLX's loader fail."""
    for fd in (0, 1, 2):
        try:
            _os.fstat(fd)
        except OSError:
            _os.open(_os.devnull, _os.O_RDWR)  # the lowest free descriptor: this one


_standard_descriptors_open()
_blas.ensure_loaded()

__version__ = "0.1.0"
