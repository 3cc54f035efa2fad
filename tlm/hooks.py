"""The trainer's one callback object (as mlx-lm's ``TrainingCallback``) and the events it
reports: what it tells and asks while it runs. No MLX here, so front ends can implement it
and read its events without importing it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Progress:
    """One event of a training run, for whoever displays or records it."""

    kind: str  # "start", "report", "eval", "save", "message", "done"
    step: int
    total: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    learning_rate: Optional[float] = None
    it_per_sec: Optional[float] = None
    tokens_per_sec: Optional[float] = None
    peak_memory_gb: Optional[float] = None
    message: str = ""
    bits_per_char: bool = False
    checkpoint: Optional[str] = None  # the identifier, on "save"
    elapsed: Optional[float] = None  # seconds of training of this run so far, across resumes

    @property
    def val_metric(self) -> Optional[float]:
        """Perplexity for word-level data, bits per character for character-level data."""
        if self.val_loss is None:
            return None
        return self.val_loss / math.log(2) if self.bits_per_char else math.exp(self.val_loss)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> Optional[str]:
        """One human line (None for events with nothing to say)."""
        if self.kind == "report":
            return (f"iter {self.step}/{self.total}  train loss {self.train_loss:.3f}  "
                    f"{self.it_per_sec:.2f} it/s  {self.tokens_per_sec:,.0f} tok/s  "
                    f"lr {self.learning_rate:.2e}  peak mem {self.peak_memory_gb:.2f} GB")
        if self.kind == "eval":
            split = self.message or "valid"
            metric = f"{self.val_metric:.3f} bpc" if self.bits_per_char else f"ppl {self.val_metric:.2f}"
            return f"iter {self.step}  {split} loss {self.val_loss:.3f}  {split} {metric}"
        return self.message or None if self.kind in ("start", "save", "message") else None


@dataclass
class TrainResult:
    step: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    test_loss: Optional[float] = None
    stopped: bool = False
    checkpoint: Optional[str] = None




class TrainingHooks:
    """What the trainer tells and asks while it runs; each method does nothing by default."""

    def log(self, line: str) -> None:
        """A line for the user (data preparation, resume, save retries)."""

    def on_start(self, config: dict[str, Any]) -> None:
        """The run's resolved configuration (its checkpoint's, over the flags given), once."""

    def on_progress(self, progress: Progress) -> None:
        """An event: start, report, eval, save, done."""

    def on_record(self, record: dict[str, Any]) -> None:
        """A record just appended to the run's metrics.jsonl (rank 0 only)."""

    def should_stop(self) -> bool:
        """Asked after every step: True stops the run after a save."""
        return False

    def before_publish(self) -> None:
        """Called before a checkpoint becomes the latest and before each metrics.jsonl record
        is written (rank 0); raise to refuse (a lost lease: a stale holder writes no more)."""
