"""The seconds this process has spent in the cyclic garbage collector while someone watches.

Auto-serial leaves these out of an item's measured cost. A collection's cost grows with
everything alive in the caller, not with the item: on a free-threaded interpreter it stops
every thread at once, and wherever items run, their results are made here again. Workers
cannot share it out. Counted in, it made a loop of 1 µs items look like 5 µs ones, and sent
them to workers that ran them no faster.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any


class _GcClock:
    """Adds up the collector's running time from `gc.callbacks`, hooked in while anyone
    watches (collections run one at a time, so a start and its stop pair up)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: float | None = None  # while a collection runs
        self._watchers = 0
        self._lock = threading.Lock()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = perf_counter()
        elif self._started is not None:  # not one that began before the clock was hooked in
            self.seconds += perf_counter() - self._started
            self._started = None

    @contextmanager
    def watching(self) -> Iterator[_GcClock]:
        with self._lock:
            self._watchers += 1
            if self._watchers == 1:
                gc.callbacks.append(self._on_collection)
        try:
            yield self
        finally:
            with self._lock:
                self._watchers -= 1
                if self._watchers == 0:
                    gc.callbacks.remove(self._on_collection)


#: The one clock of this process.
gc_clock = _GcClock()
