"""Placement: what a worker has, what a job needs, and whether they meet.

A worker's heartbeat carries its capabilities (``capabilities``); a job
carries its needs (``--gpu``, ``--needs memory=24G``, ``--on key=value``,
``--on host=NAME``, and a training job's estimated memory). Each rule of
``RULES`` is one predicate over (the need, the capabilities): a new placement
rule is one entry. A worker claims only jobs with no unmet need
(``unmet``); a job that no live worker can run says why (``waiting_reason``, ``waiting_reasons``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Optional

from tlm.config import TRUE_WORDS
from tlm.memory import size_text
from tlm_worker.kinds import CLAIMABLE, Job, misfit

FAKE_CAPABILITIES = "TLM_FAKE_CAPABILITIES"  # the test seam: JSON merged over the probe's
# What the rules read of a worker's capabilities (other keys are shown, never compared): a
# worker record that does not fit is read with none, so it meets no need.
CAPABILITIES = {"device": str, "memory_total": int, "memory_available": int, "host": str,
                "labels": {str: str}, "cores": (int, type(None)), "lab_root": bool}


@dataclass(frozen=True)
class Rule:
    need: str  # the key in a job's needs
    met: Callable[[Any, dict[str, Any]], bool]  # (the need's value, a worker's capabilities)
    says: Callable[[Any], str]  # what the job needs, in words


RULES = (
    Rule("gpu", lambda want, caps: not want or caps.get("device") == "gpu", lambda want: "needs gpu"),
    Rule("memory", lambda want, caps: caps.get("memory_available", 0) >= want,
         lambda want: f"needs {size_text(want)} of memory"),
    Rule("host", lambda want, caps: caps.get("host") == want, lambda want: f"needs host {want}"),
    Rule("labels", lambda want, caps: all(caps.get("labels", {}).get(k) == v for k, v in want.items()),
         lambda want: "needs " + ", ".join(f"{k}={v}" for k, v in want.items())),
    Rule("lab_root", lambda want, caps: caps.get("lab_root", True) or not want,
         lambda want: "needs the lab's shared folder (its worker's --save_root)"),
)


def unmet(needs: dict[str, Any], caps: dict[str, Any]) -> Optional[str]:
    """The first need these capabilities do not meet, in words; None if they meet all."""
    for rule in RULES:
        if rule.need in needs and not rule.met(needs[rule.need], caps):
            return rule.says(needs[rule.need])
    return None


def waiting_reason(needs: dict[str, Any], workers: list[dict[str, Any]]) -> Optional[str]:
    """Why a claimable job waits: no worker is alive, or none that lives meets its needs."""
    live = [w for w in workers if not w.get("stopping")]
    if not live:
        return "waiting: no live worker (start one: tlm-worker)"
    reasons = [unmet(needs, w.get("capabilities") or {}) for w in live]
    if not needs or any(r is None for r in reasons):
        return None
    return f"waiting: {reasons[0]}; no live worker has it"


def waiting_reasons(jobs: list[Job], workers: list[dict[str, Any]]) -> dict[str, str]:
    """Claimable jobs that no live worker can run, and why ("waiting: needs gpu; ...")."""
    out = {}
    for job in jobs:
        why = waiting_reason(job.placement, workers) if job.state in CLAIMABLE else None
        if why:
            out[job.id] = why
    return out


def parse_needs(needs: tuple[str, ...], on: tuple[str, ...], gpu: bool = False) -> dict[str, Any]:
    """``--needs memory=24G`` / ``gpu`` and ``--on key=value`` / ``host=NAME`` as a job's needs;
    ValueError (one line) for anything else."""
    out: dict[str, Any] = {"gpu": True} if gpu else {}
    for item in needs:
        key, _, value = item.partition("=")
        if key == "memory":
            out["memory"] = parse_size(value)
        elif key == "gpu" and value.lower() in ("", *TRUE_WORDS):
            out["gpu"] = True
        else:
            raise ValueError(f"--needs {item!r}: give memory=SIZE (e.g. memory=24G) or gpu")
    for item in on:
        key, eq, value = item.partition("=")
        if not eq or not key or not value or not re.fullmatch(r"[\w.-]+", key):
            raise ValueError(f"--on {item!r}: give key=value (a worker's --label) or host=NAME")
        if key == "host":
            out["host"] = value
        else:
            out.setdefault("labels", {})[key] = value
    return out


def parse_labels(labels: tuple[str, ...]) -> dict[str, str]:
    """``tlm-worker --label key=value`` (repeatable)."""
    out = {}
    for item in labels:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[\w.-]+", key) or not value or key == "host":
            raise ValueError(f"--label {item!r}: give key=value, e.g. room=office "
                             "(host is the machine's own name)")
        out[key] = value
    return out


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--needs memory={text!r}: give a size such as 24G or 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


# -- probes: what this machine has (the OS-specific parts, behind one function each) ----

def _memory() -> tuple[int, int]:
    """(total, available) bytes of memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if sys.platform == "darwin":  # free + inactive + speculative pages, as Activity Monitor counts
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
            page = int(re.search(r"page size of (\d+)", out).group(1))
            pages = sum(int(m) for m in re.findall(
                r"Pages (?:free|inactive|speculative):\s+(\d+)", out))
            return total, pages * page
        except (OSError, AttributeError, ValueError, subprocess.SubprocessError):
            return total, total
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return total, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return total, total


def _chip() -> Optional[str]:
    if sys.platform != "darwin":
        try:
            with open("/proc/cpuinfo") as f:
                return next((line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name")), None)
        except OSError:
            return platform.processor() or None
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _machine() -> dict[str, Any]:
    """What does not change while a worker runs (asked once)."""
    return {"chip": _chip(), "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "mlx": _version("mlx"), "tlm": _version("tlm"), "host": socket.gethostname()}


def capabilities(gpu: bool, labels: dict[str, str]) -> dict[str, Any]:
    """This worker's capabilities, as its heartbeat carries them (memory read afresh)."""
    total, available = _memory()
    caps = {"device": "gpu" if gpu else "cpu", **_machine(), "memory_total": total,
            "memory_available": available, "labels": labels}
    fake = os.environ.get(FAKE_CAPABILITIES)
    if fake:
        try:
            extra = json.loads(fake)
        except (ValueError, RecursionError):
            raise ValueError(f"{FAKE_CAPABILITIES} is not JSON") from None
        why = misfit(extra, CAPABILITIES, FAKE_CAPABILITIES)
        if why:
            raise ValueError(why)
        caps.update(extra)
    return caps
