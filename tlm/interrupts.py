"""Signals as a cooperative stop: the first asks to stop, the second exits at once.

Training code polls :meth:`StopOnSignal.__call__` (a "should stop?" callback).
Exiting on the second signal cannot leave a half-published checkpoint that a
resume would pick, because :mod:`tlm.checkpoint` publishes weights last.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Iterable


class StopOnSignal:
    """Install handlers for ``signals``; calling the object says whether one arrived."""

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
                 on_first: Callable[[int], None] = lambda s: None,
                 on_second: Callable[[], None] = lambda: None, exit_code: int = 130):
        self.requested = False
        self.on_first, self.on_second, self.exit_code = on_first, on_second, exit_code
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now\n")
            sys.stderr.flush()
            self.on_second()
            os._exit(self.exit_code)
        self.requested = True
        self.on_first(signum)

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
