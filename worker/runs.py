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

from tlm_worker.kinds import LIVE, Job
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


def fold(rows: dict[str, dict[str, Any]], job: Job) -> None:
    """Fold one training job into its run's row (made if new)."""
    _from_job(rows.setdefault(job.run, _row(job.run)), job)


def sort_score(row: dict[str, Any]) -> float:
    """Where a row sorts: by best validation loss, runs not evaluated yet last."""
    best = row.get("best_valid")
    return float(best) if isinstance(best, (int, float)) and math.isfinite(best) else NOT_EVALUATED


NOT_EVALUATED = 1e300


def _from_disk(row: dict[str, Any], directory: Path) -> None:
    from tlm import checkpoint, metrics  # MLX

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


def runs_table(registry, save_root: Optional[str] = None, disk: bool = True, limit: Optional[int] = None,
               cursor: Any = None) -> tuple[list[dict[str, Any]], Any]:
    """Runs, best validation loss first (runs not evaluated yet last), ``limit`` of them after
    ``cursor`` (None: all), and the cursor of the next page (None after the last).

    The registry's runs come from their summaries (kept as training jobs end: a page costs
    its own rows, however long the history), each with its live training job folded in; the
    first page also holds the live runs and the runs found only on disk under the save root
    (trained with `tlm train`, or whose jobs were pruned before summaries existed), so it may
    hold more than ``limit``.
    """
    first = cursor is None
    live = [j for j in registry.in_states(LIVE) if j.spec.trainer and not j.spec.driven]
    extra: dict[str, dict[str, Any]] = {}
    if first:
        extra = registry.run_summary(sorted({j.run for j in live}))
        for job in live:
            fold(extra, job)
        if disk:
            extra.update(_only_on_disk(registry, save_root, extra))
    rows, more, shown = [], True, {j.run for j in live} | set(extra)  # listed on the first page only
    while more:
        need = 1000 if limit is None else limit - len(rows) - len(extra)
        if need <= 0:
            break
        page, cursor = registry.run_summaries(cursor, need)
        more = bool(page)
        rows += [r for r in page if r["key"] not in shown]
    rows = sorted(rows + list(extra.values()), key=lambda r: (sort_score(r), r["key"]))
    return rows, cursor if more and limit is not None else None  # the first page: its extras too


def _only_on_disk(registry, save_root: Optional[str], known: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows of the run folders under the save root that the registry has no summary of."""
    root = save_root_of(save_root)
    if not root.is_dir():
        return {}
    found = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        for run_dir in [directory, *sorted(p for p in directory.iterdir() if p.is_dir()
                                           and p.name.startswith("trial-"))]:
            if (run_dir / "metrics.jsonl").exists():
                found[f"run:{run_dir.relative_to(root)}"] = run_dir
    summarized = registry.run_summary([k for k in found if k not in known])
    out = {}
    for key, run_dir in found.items():
        if key not in known and key not in summarized:
            out[key] = _row(key)
            _from_disk(out[key], run_dir)
    return out
