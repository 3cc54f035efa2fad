"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links netlib's reference BLAS (~6 GFLOP/s for a float32
matmul). Loading OpenBLAS or MKL into the global symbol namespace *before*
``mlx.core`` is imported makes MLX's ``cblas_sgemm`` resolve to it (~30x
faster). On macOS MLX uses Accelerate and nothing is done.

On Linux it also widens MLX's breadth-first graph walk, so that the CPU
streams of :mod:`tlm.parallel` interleave, and keeps freed memory in the
process (see ``_keep_freed_memory``). All of this only takes effect before
``mlx.core`` is imported.
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
_library: ctypes.CDLL | None = None

# MLX orders a graph's operations by a breadth-first walk at most this wide (its
# default is 20). Narrow, one stream's operations come in long runs and the other
# streams wait; wide enough, they interleave. Measured at the seed default and
# the small shape: 200 and 1,000 varied from run to run, the whole graph did best.
_BFS_WIDTH = "1000000"


def _load() -> str:
    if sys.platform == "darwin":
        return "accelerate"
    if not sys.platform.startswith("linux"):
        return "reference"
    if "mlx.core" in sys.modules:
        return "reference"  # too late: MLX already bound its BLAS symbols
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", _BFS_WIDTH)
    _keep_freed_memory()
    choice = os.environ.get("TLM_BLAS", "")
    if choice == "reference":
        return "disabled"
    found = ctypes.util.find_library("openblas")
    mkl = sorted(str(p) for p in (Path(sys.prefix) / "lib").glob(_MKL_GLOB))
    global _library
    for path in [choice] * bool(choice) + list(_CANDIDATES) + [found] * bool(found) + mkl:
        try:
            _library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return "reference"


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks instead of returning them to the kernel.

    MLX's Linux CPU backend allocates every array with malloc; glibc serves
    blocks over 32 MB (the logits of a 10,000-word vocabulary) with a fresh
    mmap and unmaps them when freed, so each step paid for zeroing new pages:
    a sixth of the time in page faults. Raising the mmap and trim thresholds
    keeps those pages: PTB evaluation x1.6, ptb-cpu train step x1.3.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def ensure_loaded() -> str:
    """Load the best BLAS found (once) and return what is active."""
    global active
    if active == "reference":
        active = _load()
    return active


def set_threads(n: int) -> None:
    """Threads per BLAS call (OpenBLAS or MKL loaded here; otherwise nothing to set)."""
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        setter = getattr(_library, name, None)
        if setter is not None:
            setter(n)
            return


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
