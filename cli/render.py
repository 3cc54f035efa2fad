"""Terminal rendering of progress: a rich progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

from tlm.hooks import TrainingHooks

if TYPE_CHECKING:
    from tlm.train import Progress


class ProgressDisplay:
    """Lines above a progress bar (on a terminal); use as a context manager.

    Called with a trainer :class:`~tlm.train.Progress` event it is an
    ``on_progress`` sink.
    """

    def __init__(self, total: int, stream: IO[str]):
        self.console = Console(file=stream, highlight=False)
        self.bar: Optional[Bar] = None
        if self.console.is_terminal:
            self.bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                           console=self.console, transient=False)
            self.task = self.bar.add_task("train", total=total, info="")

    def __enter__(self) -> "ProgressDisplay":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def advance(self, step: int, total: int, train_loss: Optional[float]) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, total=total,
                            info=f"loss {train_loss:.3f}" if train_loss is not None else "")

    def __call__(self, p: "Progress") -> None:
        self.advance(p.step, p.total, p.train_loss)
        line = p.describe()
        if line:
            self.line(line)


class ConsoleHooks(TrainingHooks):
    """``tlm train``'s hooks: lines and a progress bar on the terminal; ``stop()`` (Ctrl+C)
    ends the run after a save."""

    def __init__(self, display: ProgressDisplay):
        self.display = display
        self.stop = lambda: False  # the Ctrl+C handler, once installed

    def log(self, line: str) -> None:
        self.display.line(line)

    def on_progress(self, progress: "Progress") -> None:
        self.display(progress)

    def should_stop(self) -> bool:
        return self.stop()


MIN_WIDTH = 100  # narrower, rich squeezes a table's cells to nothing: wrap lines instead


def table_console(piped_width: int = 200) -> Console:
    """A console for tables: the terminal's width but never under MIN_WIDTH (``COLUMNS=20``
    would blank every cell, ids included), or ``piped_width`` into a pipe or file."""
    probe = Console()
    return Console(width=max(probe.width, MIN_WIDTH) if probe.is_terminal else piped_width)
