"""Terminal rendering of training progress: a rich progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

from typing import IO, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

from tlm.train import Progress


def format_progress(p: Progress) -> Optional[str]:
    """One human line per event (None for events with nothing to say)."""
    if p.kind == "report":
        return (f"iter {p.step}/{p.total}  train loss {p.train_loss:.3f}  "
                f"{p.it_per_sec:.2f} it/s  {p.tokens_per_sec:,.0f} tok/s  "
                f"lr {p.learning_rate:.2e}  peak mem {p.peak_memory_gb:.2f} GB")
    if p.kind == "eval":
        split = p.message or "valid"
        metric = f"{p.val_metric:.3f} bpc" if p.bits_per_char else f"ppl {p.val_metric:.2f}"
        return f"iter {p.step}  {split} loss {p.val_loss:.3f}  {split} {metric}"
    if p.kind in ("start", "save", "message") and p.message:
        return p.message
    return None


class ProgressPrinter:
    """Callable ``on_progress`` sink writing to a stream; use as a context manager."""

    def __init__(self, total: int, stream: IO[str]):
        self.console = Console(file=stream, highlight=False)
        self.bar: Optional[Bar] = None
        if self.console.is_terminal:
            self.bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                           console=self.console, transient=False)
            self.task = self.bar.add_task("train", total=total, info="")

    def __enter__(self) -> "ProgressPrinter":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, p: Progress) -> None:
        line = format_progress(p)
        if self.bar:
            self.bar.update(self.task, completed=p.step,
                            info=f"loss {p.train_loss:.3f}" if p.train_loss is not None else "")
        if line:
            self.console.print(line, markup=False, soft_wrap=True)
