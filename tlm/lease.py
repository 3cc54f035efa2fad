"""The run directory holds its own trainer: a lease file inside the run's folder.

One trainer per run cannot rest on names or paths as a registry sees them: two labs may
share one folder, and one folder may be reached by two paths (a bind mount, a symlink, a
case-insensitive or Unicode-normalising volume). The folder is the one thing every Mac
truly shares, so it holds the rule: before a trainer writes anything into a run
directory it takes ``<run>/.tlm-trainer``, renews it while it trains, and checks it is
still its own before every checkpoint and metrics record.

What it relies on: ``rename`` within one directory replacing a file atomically (local
disks, SMB, AFP, NFS and USB disks alike). What it does not: advisory locks (not honoured
across SMB), or clocks that agree (Macs' clocks differ). A holder is judged alive by
watching its file change on the reader's own clock: one whose bytes stay the same for its
``ttl`` is gone. On one host a holder whose process has ended is gone at once.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from tlm.files import read_small, with_retries

NAME = ".tlm-trainer"
MAX_BYTES = 64 * 1024
DEFAULT_TTL = 30.0  # seconds without a change after which a holder is taken to be gone
MAX_TTL = 600.0  # a planted file's ttl is never trusted beyond this


class RunHeld(RuntimeError):
    """Another live trainer holds the run directory; the message is one line."""


class LeaseLost(RuntimeError):
    """This trainer no longer holds its run directory (another took it over): write no more."""


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether a holder on this host still has its process (False only when surely gone)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True  # another machine's: only its file's changes tell
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone else's live process
    return True


def describe(holder: Optional[dict[str, Any]]) -> str:
    """A holder in a few words, for messages."""
    if not holder:
        return "an unreadable lease"
    who = [f"job {holder['job']}" if holder.get("job") else "tlm train",
           f"on {holder.get('host')}" if holder.get("host") else None,
           f"pid {holder.get('pid')}" if holder.get("pid") else None,
           f"lab {str(holder['lab'])[:8]}" if holder.get("lab") else None]
    return " ".join(str(w) for w in who if w)


class RunLease:
    """This process's hold on one run directory.

    ``take()`` waits while another live holder has it (at most ``wait`` seconds), takes a
    stale or released one, and starts renewing it every quarter ``ttl``; ``check()`` raises
    LeaseLost once another holder has replaced it; ``release()`` removes it (if still ours).
    """

    def __init__(self, directory: str | Path, who: Optional[dict[str, Any]] = None,
                 ttl: float = DEFAULT_TTL, log: Callable[[str], None] = lambda m: None):
        self.path = Path(directory) / NAME
        self.ttl, self.log = max(float(ttl), 1.0), log
        self.me: dict[str, Any] = {"holder": uuid.uuid4().hex, "host": socket.gethostname(),
                                   "pid": os.getpid(), **(who or {}), "ttl": self.ttl, "beat": 0}
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the file -----------------------------------------------------------------

    def _read(self) -> tuple[Optional[bytes], Optional[dict[str, Any]]]:
        """The lease file's bytes (None: no file) and what they say (None: not a lease)."""
        try:
            raw = read_small(self.path, MAX_BYTES)
        except OSError as e:
            if e.errno in (errno.EISDIR, errno.EINVAL):
                return b"?", None  # something planted: judged by its changes like any holder
            raise
        if raw is None:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None
        return raw, holder if isinstance(holder, dict) else None

    def _write(self) -> None:
        """Replace the file whole (a temporary of this holder's own, renamed over it)."""
        tmp = self.path.with_name(f"{NAME}.{self.me['holder']}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({**self.me, "written": time.time()}, f)  # the time is for people only
            os.replace(tmp, self.path)
        except OSError as e:  # a write to an open file names no file: say which
            e.filename = e.filename or f"writing {self.path}"
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _mine(self, holder: Optional[dict[str, Any]]) -> bool:
        return bool(holder) and holder.get("holder") == self.me["holder"]

    # -- taking, keeping, leaving -------------------------------------------------------

    def take(self, wait: Optional[float] = None) -> "RunLease":
        """Hold the run directory, or raise RunHeld after ``wait`` seconds (default: two of
        the other holder's ttls) of watching another holder stay alive."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        seen, since, said, start = None, time.monotonic(), False, time.monotonic()
        while True:
            raw, holder = self._read()
            now = time.monotonic()
            if raw != seen:  # changed (or first seen): alive as of now, on our clock
                seen, since = raw, now
            ttl = min(float(holder.get("ttl") or DEFAULT_TTL), MAX_TTL) if holder else DEFAULT_TTL
            free = (raw is None or (holder is not None and holder.get("released"))
                    or (holder is not None and not _alive_here(holder)) or now - since >= ttl)
            if free and self._claim():
                self._start()
                return self
            limit = 2 * ttl if wait is None else wait
            if now - start >= limit:
                raise RunHeld(f"{self.path.parent} is being trained by {describe(holder)} (its lease "
                              f"{self.path.name} renewed within the last {ttl:g}s): one trainer per run; "
                              "not started")
            if not said:
                said = True
                self.log(f"{self.path.parent} is held by {describe(holder)}: waiting up to {limit:.0f}s "
                         f"for it to stop or to go {ttl:g}s without renewing its lease")
            time.sleep(min(ttl / 8, 1.0))

    def _claim(self) -> bool:
        """Write our lease, then read it back after a moment: of two claiming at once, the
        one whose rename landed last holds it, and the other sees that and waits. A full disk
        or a share's hiccup is retried with back-off, as a checkpoint save is."""
        with_retries(self._write, f"writing {self.path}", self.log)
        time.sleep(min(self.ttl / 20, 0.25))
        return self._mine(self._read()[1])

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="tlm-run-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except OSError as e:  # a share's hiccup: the next renewal may pass; a holder
                self.log(f"could not renew {self.path} ({e.strerror or e})")  # too long silent loses it
            if self.lost:
                return

    def renew(self) -> None:
        """Show that this holder is alive (its file changes), if it still holds the lease."""
        _, holder = self._read()
        if not self._mine(holder):
            self.lost = f"{self.path.parent} is now held by {describe(holder)}"
            return
        self.me["beat"] += 1
        self._write()

    def check(self) -> None:
        """Raise LeaseLost unless the run directory's lease is still this holder's."""
        if self.lost is None:
            try:
                _, holder = self._read()
            except OSError:
                return  # unreadable for a moment: the renewals decide
            if not self._mine(holder):
                self.lost = f"{self.path.parent} is now held by {describe(holder)}"
        if self.lost:
            raise LeaseLost(f"{self.lost}: this trainer writes nothing more there")

    def release(self) -> None:
        """Stop renewing and leave the lease marked released, so the next trainer need not
        wait out its ttl (a file another holder replaced is left alone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.lost is None and self._mine(self._read()[1]):
                self.me["released"] = True
                self._write()
        except OSError:
            pass  # the next holder waits out the ttl instead

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
