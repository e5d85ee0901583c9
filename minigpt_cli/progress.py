"""Progress of long work: library code reports it through a callback, the CLI draws it (no torch, no printing).

A library function that can take more than about a second takes `progress: ProgressCallback | None`
and reports through a Task:

    with progress_task(progress, "encoding data", total=len(text), unit="chars") as task:
        for chunk in chunks:
            ...
            task.advance(len(chunk))

A Task passes on at most a few updates a second (always the first and the last), so a tight loop
pays next to nothing for reporting, and the callback sees a plain Progress value it can draw as it likes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Progress:
    task: str  # what is being done, for people: "encoding data", "final evaluation"
    done: float  # units done so far
    total: Optional[float]  # units in all; None when not known
    unit: str = ""  # what is counted: "chars", "windows", "steps"
    finished: bool = False
    elapsed: float = 0.0  # seconds since the task began


ProgressCallback = Callable[[Progress], None]


class Task:
    """One piece of work being reported; the callback may be None (nothing is reported)."""

    # Seconds between updates passed on: often enough for a smooth bar, rarely enough to cost nothing.
    INTERVAL = 0.2

    def __init__(self, callback: Optional[ProgressCallback], task: str, total: Optional[float] = None,
                 unit: str = "", clock: Callable[[], float] = time.monotonic):
        self.callback = callback
        self.task = task
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.clock = clock
        self.began = clock()
        self.last = -float("inf")
        self.finished = False
        self._send()

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self.callback is not None and self.clock() - self.last >= self.INTERVAL:
            self._send()

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._send()

    def _send(self) -> None:
        if self.callback is None:
            return
        self.last = self.clock()
        self.callback(Progress(self.task, self.done, self.total, self.unit, self.finished, self.last - self.began))

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()  # also on an exception, so that a drawn bar is closed


def progress_task(callback: Optional[ProgressCallback], task: str, total: Optional[float] = None,
                  unit: str = "") -> Task:
    return Task(callback, task, total, unit)


# The task name of the evaluation at the end of training (the CLI closes the training bar for it).
FINAL_EVAL_TASK = "final evaluation"
