"""A Mac that stays awake while it trains, and one that works only while its owner is away.

The decisions are pure (``pause_reason``) and tested anywhere; what macOS
tells (idle time, power source) and the sleep assertion sit behind one small
seam, ``probe()`` and ``keep_awake()``:

* ``caffeinate -i -w PID`` holds an assertion against idle sleep for exactly
  as long as the job process PID lives (``pmset -g assertions`` lists it).
* idle time: ``HIDIdleTime`` of ``ioreg -c IOHIDSystem`` (nanoseconds since
  the last keyboard or mouse event).
* power source: ``pmset -g batt`` ("Battery Power" or "AC Power").

On Linux none of these exist: no assertion is taken, and a policy that needs a
probe has nothing to read, so it never pauses (tlm-worker --help says so).
``TLM_POWER_PROBE`` names a JSON file (``{"idle_seconds": 30, "on_battery":
false}``) read in place of the OS: the test seam.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tlm.files import read_small

LOOK_SECONDS = 5.0  # how often a worker with a policy asks the OS
FAKE_PROBE = "TLM_POWER_PROBE"


@dataclass(frozen=True)
class Policy:
    when_idle: Optional[float] = None  # minutes of user idleness before training is taken
    on_battery: str = "run"  # "run", or "pause": no training on battery power

    @property
    def active(self) -> bool:
        return self.when_idle is not None or self.on_battery == "pause"


def pause_reason(policy: Policy, idle_seconds: Optional[float], on_battery: Optional[bool]) -> Optional[str]:
    """Why training should pause now (None: take and run training jobs). Unknown readings
    (None: not macOS, or the probe failed) never pause."""
    if policy.on_battery == "pause" and on_battery:
        return "on battery power (--on_battery pause)"
    if policy.when_idle is not None and idle_seconds is not None and idle_seconds < policy.when_idle * 60:
        return (f"the user is active (idle {idle_seconds:.0f}s < --when_idle "
                f"{policy.when_idle:g} min)")
    return None


class Probe:
    """What macOS says; None where it says nothing (Linux, or a failed command)."""

    def idle_seconds(self) -> Optional[float]:
        out = _run(["ioreg", "-c", "IOHIDSystem", "-d", "4"])
        m = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', out or "")
        return int(m.group(1)) / 1e9 if m else None

    def on_battery(self) -> Optional[bool]:
        out = _run(["pmset", "-g", "batt"])
        if not out:
            return None
        return "Battery Power" in out


class FileProbe(Probe):
    """Readings from a JSON file (TLM_POWER_PROBE), re-read at each look."""

    def __init__(self, path: str):
        self.path = path

    def _read(self, key: str, types: tuple[type, ...]) -> Any:
        """The reading ``key`` if the file is a small JSON object holding it with one of
        ``types`` (a bool is no number); None otherwise, as a Mac without the probe reads."""
        try:
            data = json.loads(read_small(Path(self.path), 4096) or b"{}")
        except (OSError, ValueError, RecursionError):
            return None
        value = data.get(key) if isinstance(data, dict) else None
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        return value if ok else None

    def idle_seconds(self) -> Optional[float]:
        return self._read("idle_seconds", (int, float))

    def on_battery(self) -> Optional[bool]:
        return self._read("on_battery", (bool,))


def probe() -> Probe:
    path = os.environ.get(FAKE_PROBE)
    return FileProbe(path) if path else Probe()


def _run(cmd: list[str]) -> Optional[str]:
    if sys.platform != "darwin" or shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def keep_awake(pid: Optional[int]) -> Optional[subprocess.Popen]:
    """macOS: keep the Mac from idle sleep while process ``pid`` lives; None elsewhere."""
    if sys.platform != "darwin" or pid is None or shutil.which("caffeinate") is None:
        return None
    try:
        return subprocess.Popen(["caffeinate", "-i", "-w", str(pid)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def release(assertion: Optional[subprocess.Popen]) -> None:
    """End the assertion now (it also ends by itself when its process does)."""
    if assertion is not None and assertion.poll() is None:
        assertion.terminate()
        assertion.wait(5)
