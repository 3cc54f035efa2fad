"""The run's metrics log: ``<save_dir>/metrics.jsonl``, one JSON object per line.

Every report (train loss) and evaluation (validation or test loss) appends a
record; a resumed or re-queued run appends to the same file. Steps trained
again after a crash (past the last checkpoint) appear twice: readers keep the
last record for each (kind, step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

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


def append(save_dir: str | Path, rec: dict[str, Any]) -> None:
    with open(Path(save_dir) / FILE, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read(save_dir: str | Path) -> list[dict[str, Any]]:
    """The run's records in step order, the last one kept for each (kind, step)."""
    path = Path(save_dir) / FILE
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(rec, dict) and {"kind", "step", "loss"} <= rec.keys():
                latest[(rec["kind"], rec["step"])] = rec  # other lines are not ours: skipped
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
