"""Small file helpers shared by the data, metrics, export and checkpoint modules."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import stat
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

# Errors a write may not meet again in a few seconds, or on another machine: a disk or quota
# full for a moment, an NFS or SMB hiccup. Others (read-only, permission, no such directory)
# are the run's setup, and fail at once.
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ESTALE,
                       errno.ETIMEDOUT, errno.EBUSY, errno.EINTR})


# Errors of the run's setup: a directory made read-only, deleted, or not writable by us.
SETUP = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                   errno.EISDIR, errno.ENAMETOOLONG})


def transient(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in TRANSIENT


def with_retries(write: Callable[[], T], what: str, log: Optional[Callable[[str], None]] = None,
                 retries: int = 5, cap: float = 8.0) -> T:
    """Run ``write``, retrying a transient I/O error with back-off (0.5s, 1s, 2s, ... up to
    ``cap``), as the checkpoint save does; the last error, or any other, is raised (naming
    ``what`` when it names no file, as a write to an open file does not)."""
    for attempt in itertools.count():
        try:
            return write()
        except OSError as e:
            if not transient(e) or attempt >= retries:
                e.filename = e.filename or what
                raise
            delay = min(0.5 * 2**attempt, cap)
            if log:
                log(f"{what} failed ({e.strerror or e}); retrying in {delay:g}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary beside it, which then
    replaces it (removed if anything fails)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_small(path: Path, limit: int) -> Optional[bytes]:
    """A regular file's bytes, at most ``limit`` of them, or None if there is no such file.
    Opened without blocking and checked before reading, so a FIFO, a device or a folder planted
    under that name (in a shared save root anyone can write) never hangs or floods a reader:
    they raise OSError (EISDIR, or EINVAL naming what it is)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read(limit)
