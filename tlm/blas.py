"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links netlib's reference BLAS (~6 GFLOP/s for a float32
matmul). Loading OpenBLAS or MKL into the global symbol namespace *before*
``mlx.core`` is imported makes MLX's ``cblas_sgemm`` resolve to it (~30x
faster). On macOS MLX uses Accelerate and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

# Where the set-up script (or the user) puts an optimized BLAS, best first.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
# Intel MKL from PyPI (``pip install mkl``, the set-up's fallback without root).
_MKL_GLOB = "libmkl_rt.so*"

#: What was loaded: a library path, "accelerate" (macOS), "reference", or
#: "disabled" (``TLM_BLAS=reference``).
active: str = "reference"


def _load() -> str:
    if sys.platform == "darwin":
        return "accelerate"
    if not sys.platform.startswith("linux"):
        return "reference"
    choice = os.environ.get("TLM_BLAS", "")
    if choice == "reference":
        return "disabled"
    if "mlx.core" in sys.modules:
        return "reference"  # too late: MLX already bound its BLAS symbols
    found = ctypes.util.find_library("openblas")
    mkl = sorted(str(p) for p in (Path(sys.prefix) / "lib").glob(_MKL_GLOB))
    for path in [choice] * bool(choice) + list(_CANDIDATES) + [found] * bool(found) + mkl:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return "reference"


def ensure_loaded() -> str:
    """Load the best BLAS found (once) and return what is active."""
    global active
    if active == "reference":
        active = _load()
    return active


def describe() -> str:
    """One line for start-up logs: which BLAS MLX's CPU matmuls use."""
    if active == "accelerate":
        return "BLAS: Apple Accelerate"
    if active == "disabled":
        return "BLAS: reference (TLM_BLAS=reference)"
    if active == "reference":
        return ("WARNING: BLAS: only MLX's reference BLAS was found; CPU training is ~30x slower. "
                "Run scripts/setup.sh or install libopenblas0-pthread (Debian/Ubuntu).")
    return f"BLAS: {active}"
