"""Progress display: a live bar on a terminal, plain log lines otherwise (CI logs, files, pipes)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_epochs: int, live: bool | None = None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total_epochs = total_epochs
        self.console = Console(file=self.stream)
        self._bar: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        self._t0 = time.perf_counter()
        if not self.live:
            return
        self._bar = Progress(
            TextColumn(f"epoch {epoch + 1}/{self.total_epochs}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, completed=done, stats="")

    def update(self, epoch: int, step: int, steps: int, loss: float, accuracy: float, samples_per_s: float) -> None:
        stats = f"loss {loss:.4f}  acc {accuracy:.4f}  {samples_per_s:,.0f} samples/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        else:
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(step, 1) * (steps - step)
            self.log(f"epoch {epoch + 1}/{self.total_epochs} step {step}/{steps}  {stats}  eta {eta:.0f}s")

    def end_epoch(self, message: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.log(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
