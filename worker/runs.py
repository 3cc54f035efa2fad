"""The runs table: every run the registry knows and every run under a save root, one row
each, for `tlm runs` and the dashboard's runs page (TensorBoard's HParams, Aim's runs table).

A run's row comes from its training jobs' records (their progress carries the resolved
configuration, the best validation loss with its step, the test loss, steps, training time
and speed), newest job last; a run only on disk (trained with `tlm train`, or whose jobs
were pruned) from its metrics.jsonl and its newest checkpoint's recorded state, read
without hashing. Nothing here reads a metrics stream per job: the table costs one read of
the training jobs' records (an index of them: SQLite's trainer column, a Redis sorted set).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from tlm_worker.kinds import Job
from tlm_worker.targets import save_root_of

COLUMNS = ("run", "dataset", "dim", "num_blocks", "num_heads", "context_size", "batch_size", "optimizer",
           "learning_rate", "dropout", "best_valid", "best_step", "test", "steps", "minutes",
           "tokens_per_sec", "state", "jobs")
SHAPE = ("dataset", "dim", "num_blocks", "num_heads", "context_size", "batch_size", "optimizer",
         "learning_rate", "dropout")


def _row(key: str) -> dict[str, Any]:
    return {"key": key, "run": key.split(":", 1)[1], **{c: None for c in COLUMNS[1:]}, "jobs": 0,
            "config": {}}


def _from_job(row: dict[str, Any], job: Job) -> None:
    p = job.progress or {}
    config = p.get("config") or {k: v for k, v in job.params.items() if k in SHAPE}
    row["config"] = {**row["config"], **config}
    row.update({k: row["config"].get(k) for k in SHAPE})
    best = p.get("best_valid")
    if best and (row["best_valid"] is None or best[0] < row["best_valid"]):
        row["best_valid"], row["best_step"] = best[0], best[1]
    row["test"] = p.get("test_loss", (job.result or {}).get("test_loss")) or row["test"]
    row["steps"] = max(row["steps"] or 0, p.get("step") or 0)
    if p.get("elapsed"):
        row["minutes"] = round(p["elapsed"] / 60, 2)
    row["tokens_per_sec"] = p.get("tokens_per_sec") or row["tokens_per_sec"]
    row["state"], row["jobs"] = job.state, row["jobs"] + 1


def _from_disk(row: dict[str, Any], directory: Path) -> None:
    from tlm import checkpoint, metrics

    records = metrics.read(directory)
    valid = [r for r in records if r["kind"] == "valid"]
    if valid and row["best_valid"] is None:
        best = min(valid, key=lambda r: r["loss"])
        row["best_valid"], row["best_step"] = best["loss"], best["step"]
    test = [r for r in records if r["kind"] == "test"]
    trains = [r for r in records if r["kind"] == "train"]
    row["test"] = row["test"] if row["test"] is not None else (test[-1]["loss"] if test else None)
    if records:
        row["steps"] = max(row["steps"] or 0, records[-1]["step"])
        row["minutes"] = row["minutes"] or round((records[-1].get("elapsed") or 0) / 60, 2)
    if trains and not row["tokens_per_sec"]:
        row["tokens_per_sec"] = trains[-1].get("tokens_per_sec")
    if not row["config"]:
        state = checkpoint.peek_state(directory)
        row["config"] = dict((state or {}).get("config") or {})
        row.update({k: row["config"].get(k) for k in SHAPE})
    row["state"] = row["state"] or "on disk"


def runs_table(registry, save_root: Optional[str] = None, disk: bool = True) -> list[dict[str, Any]]:
    """One row per run, best validation loss first (runs not evaluated yet last)."""
    rows: dict[str, dict[str, Any]] = {}
    for job in registry.trainers():  # oldest first: the newest job's state wins
        if job.spec.trainer and not job.spec.driven:
            _from_job(rows.setdefault(job.run, _row(job.run)), job)
    if disk:
        root = save_root_of(save_root)
        if root.is_dir():
            for directory in sorted(p for p in root.iterdir() if p.is_dir()):
                for run_dir in [directory, *sorted(p for p in directory.iterdir() if p.is_dir()
                                                   and p.name.startswith("trial-"))]:
                    if (run_dir / "metrics.jsonl").exists():
                        key = f"run:{run_dir.relative_to(root)}"
                        _from_disk(rows.setdefault(key, _row(key)), run_dir)
        for key, row in rows.items():  # registry runs whose directory this machine also sees
            if key.startswith("dir:") and row["best_valid"] is None and Path(row["run"]).is_dir():
                _from_disk(row, Path(row["run"]))
    return sorted(rows.values(), key=lambda r: (r["best_valid"] is None,
                                                r["best_valid"] if r["best_valid"] is not None else math.inf))


def leaderboard(rows: list[dict[str, Any]], top: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The best runs of each dataset by validation loss."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["best_valid"] is not None and row["dataset"]:
            board = out.setdefault(str(row["dataset"]), [])
            if len(board) < top:
                board.append(row)
    return out
