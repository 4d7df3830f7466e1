"""Progress display, one home for every long loop: a rich bar when stderr is a terminal, plain lines otherwise.

With stderr redirected (CI logs, ``nohup``, SLURM) a rich bar is only drawn at the end, so a long audit would print
nothing for minutes. :func:`progress` then returns :class:`LineProgress`, which has the subset of rich's
``Progress`` API the package uses (``start``/``stop``, context manager, ``add_task``, ``advance``, ``update``) and
writes one line per task when it starts, when it completes, on each step of short tasks (checkpoints: at most
``STEP_LINES`` items), and otherwise at least every ``LINE_INTERVAL_S`` seconds.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Optional

#: seconds between progress lines of a long task when stderr is not a terminal
LINE_INTERVAL_S = 30.0
#: tasks with at most this many items print a line per item (e.g. one per checkpoint)
STEP_LINES = 50


def progress(*columns: Any, transient: bool = False, stream=None):
    """A rich ``Progress`` (with ``columns``) when ``stream`` (default stderr) is a terminal, else a
    :class:`LineProgress` writing plain lines to it."""
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from rich.console import Console
        from rich.progress import Progress

        return Progress(*columns, transient=transient, console=Console(file=stream))
    return LineProgress(stream)


@contextlib.contextmanager
def task_bar(enabled: bool, label: str, total: int):
    """One transient task of a library loop that is quiet unless asked: yields ``advance(n)`` (a no-op when not
    ``enabled``); the bar is stopped however the loop ends."""
    if not enabled:
        yield lambda n=1: None
        return
    bar = progress(transient=True)
    bar.start()
    task = bar.add_task(label, total=total)
    try:
        yield lambda n=1: bar.update(task, advance=n)
    finally:
        bar.stop()


class _Task:
    __slots__ = ("description", "total", "completed", "started", "last_line", "done")

    def __init__(self, description: str, total: Optional[float]) -> None:
        self.description = description
        self.total = total
        self.completed = 0.0
        self.started = time.monotonic()
        self.last_line = self.started
        self.done = False


class LineProgress:
    """Plain progress lines (module docstring); markup-free, control characters escaped."""

    def __init__(self, stream=None, interval: float = LINE_INTERVAL_S) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = float(interval)
        self.tasks: list[_Task] = []

    # the rich.Progress surface used in the package
    def start(self) -> None:
        pass

    def stop(self) -> None:
        for t in self.tasks:
            if not t.done and t.total is not None and t.completed >= t.total:
                self._line(t)
                t.done = True

    def __enter__(self) -> "LineProgress":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def add_task(self, description: str, total: Optional[float] = None, **_: Any) -> int:
        t = _Task(_plain(description), total)
        self.tasks.append(t)
        self._line(t, started=True)
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: Optional[float] = None, completed: Optional[float] = None,
               total: Optional[float] = None, description: Optional[str] = None, **_: Any) -> None:
        t = self.tasks[task_id]
        if total is not None:
            t.total = total
        if description is not None:
            t.description = _plain(description)
        if completed is not None:
            t.completed = float(completed)
        if advance:
            t.completed += float(advance)
        now = time.monotonic()
        finished = t.total is not None and t.completed >= t.total
        short = t.total is not None and t.total <= STEP_LINES and bool(advance)
        if t.done:
            return
        if finished or short or now - t.last_line >= self.interval:
            self._line(t)
            t.done = finished

    def _line(self, t: _Task, started: bool = False) -> None:
        from ._format import safe_text

        t.last_line = time.monotonic()
        elapsed = t.last_line - t.started
        if started:
            size = f" ({int(t.total):,} item{'s' * (int(t.total) != 1)})" if t.total is not None else ""
            text = f"{t.description}: started{size}"
        elif t.total:
            text = (f"{t.description}: {int(t.completed):,}/{int(t.total):,} ({t.completed / t.total:.0%}) "
                    f"{_clock(elapsed)}")
        else:
            text = f"{t.description}: {int(t.completed):,} {_clock(elapsed)}"
        try:
            self.stream.write(safe_text(text) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must not end an audit
            pass


def _plain(text: str) -> str:
    """Rich markup tags the package writes in descriptions (``[bold]...[/]``) removed, ``rich.markup.escape``'s
    backslashes undone (descriptions are written for a rich bar first)."""
    import re

    text = re.sub(r"(?<!\\)\[/?(bold|dim|italic|red|green|yellow|cyan)?\]", "", str(text))
    return text.replace("\\[", "[")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
