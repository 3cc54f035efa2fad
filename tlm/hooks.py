"""The trainer's one callback object (as mlx-lm's ``TrainingCallback``): what it tells and
asks while it runs. No MLX here, so front ends can implement it without importing it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlm.train import Progress


class TrainingHooks:
    """What the trainer tells and asks while it runs; each method does nothing by default."""

    def log(self, line: str) -> None:
        """A line for the user (data preparation, resume, save retries)."""

    def on_start(self, config: dict[str, Any]) -> None:
        """The run's resolved configuration (its checkpoint's, over the flags given), once."""

    def on_progress(self, progress: "Progress") -> None:
        """An event: start, report, eval, save, done."""

    def on_record(self, record: dict[str, Any]) -> None:
        """A record just appended to the run's metrics.jsonl (rank 0 only)."""

    def should_stop(self) -> bool:
        """Asked after every step: True stops the run after a save."""
        return False

    def before_publish(self) -> None:
        """Called before a checkpoint becomes the latest and before each metrics.jsonl record
        is written (rank 0); raise to refuse (a lost lease: a stale holder writes no more)."""
