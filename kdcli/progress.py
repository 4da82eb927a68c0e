"""Rich progress bars for epochs; silent when stderr is not a terminal (CI, log files)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    """One bar per epoch of a stage, showing the last epoch's metrics when it ends."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        console = Console(stderr=True)
        self._shown = enabled and sys.stderr.isatty()
        self._bar = _RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, disable=not self._shown, transient=False,
        )

    # A hidden bar is never started: rich before 14.3 printed an empty line to stderr when a
    # disabled bar stopped, one per epoch in every log and in each error's stderr.
    def __enter__(self) -> Progress:
        if self._shown:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> int:
        return self._bar.add_task(f"{self.label} {epoch + 1}/{epochs}", total=steps, info="")

    def advance(self, task: int) -> None:
        self._bar.advance(task)

    def end_epoch(self, task: int, row: dict[str, float]) -> None:
        info = f"loss {row['train/loss']:.3f}"
        if "val/top1" in row:
            info += f"  val/top1 {row['val/top1']:.1f}"
        self._bar.update(task, info=info)
