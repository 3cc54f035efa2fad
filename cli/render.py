"""Terminal rendering of training progress: a rich progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

from typing import IO, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

from tlm.train import Progress


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
        line = p.describe()
        if self.bar:
            self.bar.update(self.task, completed=p.step,
                            info=f"loss {p.train_loss:.3f}" if p.train_loss is not None else "")
        if line:
            self.console.print(line, markup=False, soft_wrap=True)
