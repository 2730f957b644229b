"""How many items go into each task: one at first, then as many as fill a target duration."""

from __future__ import annotations

import math


class ChunkSizer:
    """Adapts chunk sizes to measured item durations, as joblib's auto-batching does.

    Long items go one per task, so the work spreads evenly; tiny items are batched until a
    task lasts about ``TARGET_SECONDS``, so the per-task overhead stays small. Sizes at most
    double from one chunk to the next, so a lazy input is not read far ahead. With a known
    total, no chunk takes more than a quarter of a worker's share of what is left, so workers
    do not idle at the end while one finishes a big chunk.
    """

    TARGET_SECONDS = 0.05
    MAX_ITEMS = 10_000
    SMOOTHING = 0.5

    def __init__(self, n_workers: int, total: int | None) -> None:
        self.n_workers = n_workers
        self.remaining = total
        self.seconds_per_item: float | None = None
        self.last_size = 1

    def next_size(self) -> int:
        """The size of the next chunk; the caller reports what it took with `taken`."""
        if self.seconds_per_item is None:
            size = 1
        elif self.seconds_per_item <= 0:
            size = self.MAX_ITEMS
        else:
            size = int(self.TARGET_SECONDS / self.seconds_per_item)
        if self.remaining is not None:
            size = min(size, math.ceil(self.remaining / (4 * self.n_workers)))
        size = max(1, min(size, 2 * self.last_size, self.MAX_ITEMS))
        self.last_size = size
        return size

    def taken(self, n_items: int) -> None:
        """Count items handed out; a total that proves too small is forgotten, not trusted."""
        if self.remaining is not None:
            self.remaining -= n_items
            if self.remaining < 0:
                self.remaining = None

    def record(self, n_items: int, seconds: float) -> None:
        """Learn from a finished chunk: ``n_items`` ran in ``seconds`` of worker time."""
        if n_items <= 0:
            return
        measured = seconds / n_items
        if self.seconds_per_item is None:
            self.seconds_per_item = measured
        else:
            self.seconds_per_item += self.SMOOTHING * (measured - self.seconds_per_item)
