"""Loaded by every Python process the test suite starts (conftest puts this folder on
PYTHONPATH, and imports it into pytest itself):

* The default Redis port is firewalled: a connection to port 6379 is refused, so no test, worker
  or job process can touch the Redis a user's lab may live on. The suite's Redis is its own
  redis-server on a free port (tests/queue_helpers.suite_redis).
* TLM_TEST_CLOCK_OFFSET: a Mac whose clock is off, for one worker and the job processes it
  spawns: ``time.time`` shifted by that many seconds before anything reads it. (libfaketime
  would shift the C library's clock too, but its sleeps and timed waits fail under Python here:
  EINVAL or a hang.) Monotonic clocks, as a real skew leaves them, are untouched.
"""

import os
import socket
import time

FIREWALLED_PORT = 6379


def _guard(connect):
    def guarded(self, address, *args):
        if isinstance(address, tuple) and len(address) >= 2 and address[1] == FIREWALLED_PORT:
            raise ConnectionRefusedError(111, f"the test suite never connects to port {FIREWALLED_PORT} "
                                              "(a user's Redis): use tests/queue_helpers.suite_redis")
        return connect(self, address, *args)
    return guarded


if not getattr(socket.socket.connect, "tlm_guarded", False):
    socket.socket.connect = _guard(socket.socket.connect)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)
    socket.socket.connect.tlm_guarded = True

_offset = float(os.environ.get("TLM_TEST_CLOCK_OFFSET", "0"))
if _offset:
    _time = time.time
    time.time = lambda: _time() + _offset
