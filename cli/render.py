"""Terminal rendering of progress: a rich progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

from typing import IO, Callable, Collection, ContextManager, Mapping, Optional, Sequence

from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn
from rich.table import Table

from tlm.hooks import Progress, TrainingHooks


class ProgressDisplay:
    """Lines above a progress bar (on a terminal); use as a context manager.

    Called with a trainer :class:`~tlm.hooks.Progress` event it is an
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


MIN_WIDTH = 20  # narrower than a job id and its gaps: the terminal wraps what does not fit
GAP = 2  # characters between two columns of a fitted table
SQUEEZE = 11  # the narrowest a column is folded to, unless a table says otherwise: "interrupted", "shakespeare" stay whole


def table_console(piped_width: int = 200) -> Console:
    """A console for tables: the terminal's width, or ``piped_width`` into a pipe or file."""
    probe = Console()
    return Console(width=max(probe.width, MIN_WIDTH) if probe.is_terminal else piped_width)


def fitted_table(title: Optional[str], columns: Sequence[str], rows: Sequence[Sequence[str]], width: int,
                 importance: Sequence[str], least: Mapping[str, int] = {},
                 right: Collection[str] = ()) -> Table:
    """A table that reads at ``width`` characters: each column as wide as its content, folded
    onto more lines down to ``least[column]`` (SQUEEZE unless given), and the columns that still
    do not fit left out, the last of ``importance`` first (the caption names them). The first of
    ``importance`` is never folded: a job id stays whole, to copy."""
    natural = {c: max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)}
    need = {c: natural[c] if c == importance[0] else min(natural[c], least.get(c, SQUEEZE)) for c in columns}
    shown, spare = [], width + GAP
    for c in importance:
        if GAP + need[c] <= spare:
            shown.append(c)
            spare -= GAP + need[c]
    for c in sorted(shown, key=lambda c: natural[c] - need[c]):  # what is left makes the most cells whole
        grow = min(natural[c] - need[c], spare)
        need[c], spare = need[c] + grow, spare - grow
    keep = [i for i, c in enumerate(columns) if c in shown]
    table = Table(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for i in keep:
        c = columns[i]
        table.add_column(c, width=need[c], no_wrap=c == importance[0], overflow="fold",
                         justify="right" if c in right else "left")
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    hidden = [c for c in columns if c not in shown]
    if hidden:
        table.caption = f"not shown at {width} columns: {', '.join(hidden)} (a wider terminal shows them)"
    return table


def watch_table(console: Console, changes: Callable[[], ContextManager[Callable[[float], bool]]],
                table: Callable[[], Table], done: Callable[[], bool]) -> None:
    """Redraw ``table()`` as the lab changes (``changes``: the registry's waiter) until
    ``done()`` or Ctrl+C: in place on a terminal; into a pipe or a file, the table again each
    time it reads differently (rich's Live writes nothing there until it stops)."""
    try:
        if console.is_terminal:
            with Live(table(), console=console, refresh_per_second=1) as live, changes() as wait:
                while not done():
                    wait(2.0)
                    live.update(table())
            return
        last = None
        with changes() as wait:
            while True:
                with console.capture() as captured:
                    console.print(table())
                if captured.get() != last:
                    last = captured.get()
                    console.file.write(last + "\n")
                    console.file.flush()
                if done():
                    return
                wait(2.0)
    except KeyboardInterrupt:
        pass
