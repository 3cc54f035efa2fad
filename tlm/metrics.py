"""The run's metrics log: ``<save_dir>/metrics.jsonl``, one JSON object per line.

Every report (train loss) and evaluation (validation or test loss) appends a
record; a resumed or re-queued run appends to the same file. Steps trained
again after a crash (past the last checkpoint) appear twice: readers keep the
last record for each (kind, step), but never a stale holder's over its
successor's (records written by a worker job carry its ``job`` and ``fence``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tlm import files

FILE = "metrics.jsonl"


def record(p, tokens_per_step: int, labels: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The log record for a trainer Progress event, or None for events not logged."""
    if p.kind == "report":
        kind, loss = "train", p.train_loss
    elif p.kind == "eval":
        kind, loss = p.message or "valid", p.val_loss
    else:
        return None
    out = {"time": time.time(), "kind": kind, "step": p.step, "tokens": p.step * tokens_per_step,
           "elapsed": p.elapsed, "loss": loss, **labels}
    if kind != "train":
        out["bpc" if p.bits_per_char else "ppl"] = (loss / math.log(2) if p.bits_per_char
                                                      else math.exp(min(loss, 700)))
    else:
        out.update(lr=p.learning_rate, tokens_per_sec=p.tokens_per_sec,
                   peak_memory_gb=p.peak_memory_gb)
    return out


def append(save_dir: str | Path, rec: dict[str, Any], log: Optional[Callable[[str], None]] = None) -> None:
    """Append one record, retrying a transient write error (a disk full for a moment); a line
    a failed write cut short is ended first, so it costs only itself."""
    path = Path(save_dir) / FILE
    line = (json.dumps(rec) + "\n").encode()

    def write() -> None:
        with open(path, "ab+") as f:
            if f.tell():
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line)
    files.with_retries(write, f"writing {path}", log)


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record for each (kind, step), in step order: the last one written, except that a
    record of a job's earlier holder (a lower ``fence`` of the same ``job``: a worker that
    had lost its lease and did not know yet) never replaces its successor's."""
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        key = (rec["kind"], rec["step"])
        old = kept.get(key)
        if old is not None and old.get("job") == rec.get("job") and \
                _fence(rec) < _fence(old):
            continue
        kept[key] = rec
    return sorted(kept.values(), key=lambda r: (r["step"], r["kind"]))


def _fence(rec: dict[str, Any]) -> int:
    fence = rec.get("fence", 0)
    return fence if isinstance(fence, int) else 0


MAX_BYTES = 1 << 28  # 256 MiB: 20 times a 200,000-step run's log; a bigger file is read that far


def raw(save_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of the run as written, in file order (re-trained steps and stale holders'
    records included); lines that are not ours, cut short by a crash, or whose values are of
    another type are skipped, and a metrics.jsonl that is no regular file reads as empty."""
    try:
        data = files.read_small(Path(save_dir) / FILE, MAX_BYTES)
    except OSError:
        return []
    records = []
    for line in (data or b"").decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(rec, dict) and _well_formed(rec):
            records.append(rec)
    return records


def _well_formed(rec: dict[str, Any]) -> bool:
    """Kind a string, step an int, loss a finite number; the optional numbers numbers or absent."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return (isinstance(rec.get("kind"), str) and isinstance(rec.get("step"), int)
            and not isinstance(rec["step"], bool) and number(rec.get("loss"))
            and all(number(rec[k]) for k in ("elapsed", "tokens_per_sec", "time") if rec.get(k) is not None))


def read(save_dir: str | Path) -> list[dict[str, Any]]:
    """The run's records, one per (kind, step) (see ``latest``)."""
    return latest(raw(save_dir))


def stale_writes(records: Iterable[dict[str, Any]]) -> float:
    """The longest time a job's earlier holder went on writing after the next holder's first
    record, in seconds (0.0: none did): what the chaos test and benchmarks/job_queue.py
    measure of two processes training one run."""
    times: dict[tuple[Any, int], list[float]] = {}
    for rec in records:
        if isinstance(rec.get("time"), (int, float)):
            times.setdefault((rec.get("job"), _fence(rec)), []).append(rec["time"])
    worst = 0.0
    for (job, fence), written in times.items():
        successors = [min(t) for (j, f), t in times.items() if j == job and f > fence]
        if successors:
            worst = max(worst, max(written) - min(successors))
    return worst
