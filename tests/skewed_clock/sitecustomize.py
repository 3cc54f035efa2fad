"""A Mac whose clock is off, for one worker and the job processes it spawns: on PYTHONPATH,
this shifts ``time.time`` by TLM_TEST_CLOCK_OFFSET seconds before anything reads it.
(libfaketime would shift the C library's clock too, but its sleeps and timed waits fail
under Python here: EINVAL or a hang.) Monotonic clocks, as a real skew leaves them, are untouched."""

import os
import time

_offset = float(os.environ.get("TLM_TEST_CLOCK_OFFSET", "0"))
_time = time.time
time.time = lambda: _time() + _offset
