"""Auto-serial: an automatically placed call runs its first items in the caller, and keeps
going there for as long as the measured cost per item says that workers cannot pay. A call
that runs serially (``serial=True``, nested, tiny) runs here all along, in the same loop.

Workers cost something per item (serializing it and its result, passing both between
processes) and per call (waking, maybe starting, the pool). A loop over 100 000 quick items
is fastest in the caller; a loop over slow items is fastest on workers, after at most a few
milliseconds of items run here to find out.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from ._dispatch import Input, emit
from ._gc_clock import gc_clock
from ._task import Call, Result, Task, run_task, run_task_whole

#: Inputs known to be shorter than this go to workers at once: one slow item run here first
#: would cost a short input a noticeable share of its speedup.
MIN_ITEMS = 256
#: Work measured here before deciding, in seconds (a decision on less would be noise).
MEASURE_SECONDS = 0.005
#: Below this many seconds per item, passing items to workers costs more than they save.
ITEM_SECONDS_WORTH_A_WORKER = 5e-6
#: Below this much work left, in seconds, waking or starting workers cannot pay.
WORK_SECONDS_WORTH_WORKERS = 0.05
#: The largest chunk run here between two looks at the clock and the progress bar ...
MAX_CHUNK = 16_384
#: ... and the longest, in seconds, as the last chunk's items took: the bar keeps moving.
CHUNK_SECONDS = 0.05
#: ... unless all that is left should take less than this many seconds: then it is one chunk,
LAST_CHUNK_SECONDS = 0.02
#: ... if it is at most this many times the items measured, as the next chunk could be anyway:
#: a guess from further (the first 5 items of 300, whose cost grows along the input) kept a
#: loop of a second here.
LAST_CHUNK_REACH = 4


def worth_probing(total: int | None) -> bool:
    """Whether to start a call in the caller: unknown or long inputs."""
    return total is None or total >= MIN_ITEMS


def run_while_cheap(call: Call, items: Iterable[Any], total: int | None,
                    on_done: Callable[[int], object], into: Gathered | None = None,
                    stay: bool = False
                    ) -> Generator[tuple[Sequence[int], list[Any]], None, Input | None]:
    """Yield ``(input indices, values)`` batches run in the caller, from the start of
    ``items``, while workers cannot pay (with ``stay``: all of them); the generator returns the
    input, the items it ran read from it, for the workers to run the rest, or None when it ran
    them all.

    Given ``into`` (pmap's results), values are gathered there as they come, and each batch's
    values are ``into.values`` itself, which its caller need not copy.
    """
    sliceable = isinstance(items, (list, tuple, range))  # chunks are windows, not copies
    try:
        length = len(items) if sliceable else None  # type: ignore[arg-type]
    except OverflowError:  # a range past sys.maxsize: read as any iterable is
        sliceable, length = False, None
    source = Input(items)
    spent = 0.0
    # Seconds per item of the last chunk, and of the quicker of the last two, which decides: a
    # chunk that the system paused (a busy machine) looks slow, the one beside it shows the
    # truth; and items whose cost grows along the input (sizes in increasing order) move the
    # decision along, where the quickest chunk of all would keep them here for ever.
    last = float("inf")
    size = 1
    while True:
        chunk: Sequence[Any] = (_Window(items, source, size)  # type: ignore[arg-type]
                                if sliceable else source.take(size))
        read = source.read  # the chunk's items counted
        if not chunk:
            source.raise_held()
            return None
        task = Task(call, range(read - len(chunk), read), chunk)
        before = 0 if into is None else len(into.values)
        collected = gc_clock.seconds
        with gc_clock.watching():
            result = _run_here(task, into)
        collected = gc_clock.seconds - collected
        spent += result.elapsed
        rate = result.elapsed / len(chunk)
        # What workers could take over: the chunk's time less the garbage collector's.
        paid = max(0.0, result.elapsed - collected) / len(chunk)
        recent, last = min(paid, last), paid
        on_done(len(result.values) - before)
        yield from emit(task, result, len(result.values) - before)
        if not stay and spent >= MEASURE_SECONDS and _workers_pay(
                recent, None if total is None else total - read):
            return source
        size = min(4 * size, MAX_CHUNK,
                   max(1, int(CHUNK_SECONDS * len(chunk) / max(result.elapsed, 1e-9))))
        if (length is not None and length - read <= LAST_CHUNK_REACH * read
                and rate * (length - read) < LAST_CHUNK_SECONDS):
            size = max(size, length - read)  # the rest at once


def _run_here(task: Task, into: Gathered | None) -> Result:
    """Run ``task`` in the caller, its values gathered into ``into`` where given."""
    if into is None:
        return run_task(task)
    if len(task.items) > len(into.values):  # a list of its own, the earlier values in front
        result = run_task_whole(task)
        result.values[:0] = into.values
        into.values = result.values
        return result
    return run_task(task, into.values)


class Gathered:
    """pmap's results, gathered where they are made. A chunk run here that is larger than all
    before it is run into a list of its own, which then takes the earlier values in front
    (moving pointers) and becomes ``values``: cheaper than appending its values one by one, or
    copying them (for quick items, each costs a visible share of the work)."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: list[Any] = []


def _workers_pay(seconds_per_item: float, remaining: int | None) -> bool:
    if seconds_per_item < ITEM_SECONDS_WORTH_A_WORKER:
        return False
    return remaining is None or seconds_per_item * remaining >= WORK_SECONDS_WORTH_WORKERS


class _Window(Sequence[Any]):
    """The next ``size`` items of ``source``, an `Input` of the list, tuple or range ``items``,
    read through its one iterator: a chunk without copying the items (for a long loop of quick
    items, the copy costs a visible share of the work)."""

    def __init__(self, items: Sequence[Any], source: Input, size: int) -> None:
        self._items, self._source = items, source.source
        self._start, self._stop = source.read, min(source.read + size, len(items))
        source.read = max(self._start, self._stop)

    def __len__(self) -> int:
        return max(0, self._stop - self._start)

    def __getitem__(self, position: Any) -> Any:  # an item named in an error
        return self._items[self._start + position]

    def __iter__(self) -> Iterator[Any]:  # read once, in order, as run_task does
        if self._stop == len(self._items):  # the rest of the input: the iterator itself
            return self._source
        return islice(self._source, len(self))
