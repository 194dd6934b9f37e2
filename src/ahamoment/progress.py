"""Rich progress bars shared by every stage.

On a terminal the bar is live. When output goes to a file or a CI log, rich shows nothing until
the end, so the bar also prints one plain line every ``every`` seconds there.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Progress(Progress):
    """A Progress that also logs plain lines when its console is not a terminal."""

    def __init__(self, *columns, every: float = 30.0, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._every = every
        self._last_line = time.monotonic()

    def update(self, task_id: TaskID, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if self.console.is_terminal:
            return
        now = time.monotonic()
        task = self._tasks[task_id]
        if now - self._last_line >= self._every or task.finished:
            self._last_line = now
            total = f"/{task.total:.0f}" if task.total is not None else ""
            info = task.fields.get("info", "")
            self.console.print(
                f"{task.description}: {task.completed:.0f}{total} "
                f"({task.elapsed or 0:.0f} s) {info}".rstrip(),
                highlight=False,
            )


def progress_bar(console: Console | None = None, every: float = 30.0) -> Progress:
    """A bar with a free-form ``info`` field for live figures (loss, reward, accuracy)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        every=every,
    )
