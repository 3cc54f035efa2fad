"""Small file helpers shared by the data and checkpoint modules."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_digest(path: Path) -> str:
    """SHA1 of own text: a file's bytes, or a directory's .txt files (names and bytes, sorted)."""
    if not path.is_dir():
        return file_digest(path, "sha1")
    h = hashlib.sha1()
    for f in sorted(path.rglob("*.txt")):
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_digest(f, "sha1").encode())
    return h.hexdigest()
