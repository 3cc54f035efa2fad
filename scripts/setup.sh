#!/usr/bin/env bash
# Set up tlm on a fresh Linux or macOS machine: a .venv with the project and
# its test tools, and on Linux an optimized BLAS for MLX's CPU backend.
# Idempotent; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"

apt_install() {  # Debian packages, updating the package lists once if they are stale
    command -v apt-get >/dev/null && { $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$@" >/dev/null 2>&1; }; }
}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

if [ "$(uname -s)" = Linux ] && ! .venv/bin/python - <<'PY'
import sys
from tlm import blas
sys.exit(blas.active in ("reference", "disabled"))
PY
then
    # MLX's Linux wheel ships reference BLAS (~30x slower): install OpenBLAS.
    if apt_install libopenblas0-pthread; then
        echo "setup: installed Debian's libopenblas0-pthread" >&2
    else
        echo "setup: no apt-get/root: installing Intel MKL from PyPI into .venv instead" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check mkl
    fi
fi
# A Linux machine with an NVIDIA GPU: MLX's CUDA build, so `tlm-worker --gpu` trains on it.
if [ "$(uname -s)" = Linux ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check 'mlx[cuda12]' \
        && echo "setup: installed MLX's CUDA build (nvidia-smi found a GPU)" >&2 \
        || echo "setup: could not install mlx[cuda12]: tlm-worker --gpu will not find the GPU" >&2
fi
# The dashboard's tests drive a real browser: Debian's Chromium and ChromeDriver
# (a browser download, as Playwright's installer does, fails on machines without internet).
if [ "$(uname -s)" = Linux ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if apt_install chromium chromium-driver; then
        echo "setup: installed Debian's chromium and chromium-driver (for the dashboard's tests)" >&2
    else
        echo "setup: could not install chromium: the dashboard's browser tests will be skipped" >&2
    fi
fi
# The test suite starts redis-servers of its own on free ports (never the lab's 6379).
if ! command -v redis-server >/dev/null; then
    if [ "$(uname -s)" = Linux ] && apt_install redis-server; then
        echo "setup: installed Debian's redis-server (the tests start their own on free ports)" >&2
    else
        echo "setup: no redis-server (brew install redis): the Redis tests will be skipped" >&2
    fi
fi
.venv/bin/python -c "from tlm import blas; print('setup:', blas.describe())" >&2
