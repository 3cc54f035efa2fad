"""A worker's guard on its queue calls: an outage said once, waited out without blocking."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from tlm_worker.queue import QUEUE_ERRORS, Queue


class Outage:
    """Runs a worker's queue operations; None for one made while the queue is down
    (unreachable, or refusing writes: out of memory, read-only). While it is, a probe a second
    tries it and every call returns at once (none while stopping: exiting never waits on a
    queue that is gone); the outage is said once, and its end, whichever thread (the loop,
    the heartbeat) sees it."""

    def __init__(self, queue: Queue, say: Callable[[str], None], self_fence: float,
                 stopping: Callable[[], bool]):
        self.queue, self.say, self.self_fence, self.stopping = queue, say, self_fence, stopping
        self.lock = threading.Lock()
        self.down_since: Optional[float] = None  # the queue has not answered since (monotonic)
        self.next_probe = 0.0  # while it is down: the next call that may try it
        self.back_at = -float("inf")  # when it last came back after an outage (monotonic)

    def call(self, fn: Callable, *args: Any) -> Any:
        try:
            since = self.down_since
            if since is not None:
                if time.monotonic() < self.next_probe or self.stopping():
                    return None
                self.next_probe = time.monotonic() + 1.0
                self.queue.probe()
                with self.lock:
                    if self.down_since is not None:
                        self.say(f"queue back after {time.monotonic() - since:.0f}s")
                        self.down_since, self.back_at = None, time.monotonic()
            return fn(*args)
        except QUEUE_ERRORS as e:
            with self.lock:
                if self.down_since is None:
                    self.down_since, self.next_probe = time.monotonic(), time.monotonic() + 1.0
                    self.say(f"queue unreachable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                             f"jobs train on; those not confirmed for {self.self_fence:.0f}s "
                             "save and stop; trying again every second")
            return None
