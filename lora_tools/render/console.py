"""Where the command line prints: stdout's console (sized for tables) and the progress bar on
stderr. Rich is imported on first use, so that `lora-tools --help` never pays for it."""

from __future__ import annotations

from typing import Any


def stdout_console() -> Any:
    """stdout's console: the terminal's width, else COLUMNS, else 200 columns (a pipe or a
    file: every column fits; tables never take more width than they need)."""
    import os

    from rich.console import Console

    console = Console(soft_wrap=False)
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "").strip()
        width = int(columns) if columns.isdigit() and int(columns) > 0 else 200
        console = Console(soft_wrap=False, width=max(width, 20))
    return console



class RichProgress:
    """A progress bar on stderr (tensors, bytes, throughput); stdout stays clean."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]} tensors"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._task: Any = None
        self._tensors = 0
        self._started = False

    def start(self, total_tensors: int, total_bytes: int, label: str = "merging") -> None:
        if not self._bar.console.is_terminal:  # a log file gets the summary line, not a bar
            return
        self._started = True
        self._bar.start()
        self._task = self._bar.add_task(label, total=total_bytes, tensors=f"0/{total_tensors}")
        self._total_tensors = total_tensors

    def advance(self, tensors: int, nbytes: int) -> None:
        if not self._started:
            return
        self._tensors += tensors
        self._bar.update(self._task, advance=nbytes, tensors=f"{self._tensors}/{self._total_tensors}")

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._bar.stop()
