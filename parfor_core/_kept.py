"""Large arrays' shared memory, kept for a short while after the call that sent them: a call
that sends the same array again, unchanged, reuses it. That costs a comparison of the array
with the memory (a third of a copy's time) instead of a copy, and no second copy in memory.

Each large array of a call gets a segment of its own, so that any of them can be kept (or
shared in place) whatever else the call sends. A kept segment goes when a call sends large
data without its array, or some seconds (the setting ``keep_shared``, 5 by default) after its
last call ends, whichever comes first: it
holds as much memory as its array (unless it is the array's own, shared in place), even after
the array is gone. (A weak reference to the array would tell when it goes, but numpy refuses to
resize an array that has one.)
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from ._config import current
from ._idle import IdleWatch
from ._in_place import buffer_address, owning_array
from ._shared import IN_PLACE_BYTES, Placement, Segment

#: Arrays this large get a segment of their own, which is kept after the call.
KEPT_BYTES = IN_PLACE_BYTES
#: An array is compared with its kept segment by up to this many threads, each comparing at
#: least `COMPARED_PER_THREAD` bytes (200 MB: 30 ms with one thread, 18 ms with two, here).
COMPARING_THREADS = min(4, os.cpu_count() or 1)
COMPARED_PER_THREAD = 32 * 2**20


class _Kept:
    """A segment that holds one array's data, as it was when sent."""

    def __init__(self, segment: Segment, start: int, key: tuple[int, int]) -> None:
        self.segment = segment
        self.start = start  # where the data lies in it
        self.key = key  # the memory it was copied from: address and size
        self.users = 0  # calls running with it
        self._view: mmap.mmap | None = None

    @property
    def placement(self) -> Placement:
        return self.segment.address, self.start, self.start + self.key[1]

    def holds_now(self, address: int) -> bool:
        """Whether the memory at ``address`` holds what was copied from there."""
        if self._view is None:
            self._view = mmap.mmap(self.segment.fd, self.segment.address.size,
                                   access=mmap.ACCESS_READ)
        with memoryview(self._view) as view:
            return _same(buffer_address(view) + self.start, address, self.key[1])

    def release(self) -> None:
        self.segment.release()
        self._view = None


_lock = threading.Lock()
#: The kept segments, by where the memory they hold was copied from.
_kept: dict[tuple[int, int], _Kept] = {}
#: Uses that ended, not yet counted: a call may end in a garbage collection (of an abandoned
#: gmap) that starts while this very thread holds `_lock`, so ending never waits for it.
_ended: deque[_Kept] = deque()
_watch: IdleWatch | None = None
#: How long a kept segment waits after its last call for another call to send its array: the
#: setting ``keep_shared`` of the latest call.
_keep_seconds = 0.0


@contextmanager
def _locked() -> Iterator[None]:
    """Hold `_lock`; count the uses that ended meanwhile before letting go, and after (a use
    that ended while the lock was held elsewhere is counted by whoever held it)."""
    with _lock:
        yield
        _count_ended()
    if _ended:
        _settle()


def lease(parts: list[memoryview], keep_seconds: float | None = None,
          in_place: bool | None = None) -> tuple[list[Placement | None], Callable[[], None]]:
    """Where kept segments hold a call's buffers (None for each that is not kept: small, or
    not a numpy array's memory; the caller places those), and what to call when the call is
    over. Kept segments of earlier calls that this call does not use go now. They are kept
    ``keep_seconds`` after (None: as the ``keep_shared`` setting says now); a new one shares
    its array in place as `Segment.holding` says with ``in_place``."""
    global _keep_seconds
    _keep_seconds = current()["keep_shared"] if keep_seconds is None else keep_seconds
    used: list[_Kept] = []
    placements: list[Placement | None] = []
    try:
        for part in parts:
            kept = (_kept_for(part, _keep_seconds > 0, in_place) if part.nbytes >= KEPT_BYTES
                    else None)
            placements.append(None if kept is None else kept.placement)
            if kept is not None:
                used.append(kept)
    except BaseException:  # a failed copy, Ctrl-C: the segments so far are not in use
        _done(used)
        raise
    with _locked():
        for kept in list(_kept.values()):
            if kept not in used:
                _drop(kept)
    return placements, partial(_done, used)


def _kept_for(part: memoryview, keep: bool, in_place: bool | None) -> _Kept | None:
    """The kept segment holding ``part`` now (its users counting one more), made if need be
    (and kept, if ``keep``); None if ``part`` is not a numpy array's memory (whose comparison
    needs numpy)."""
    if owning_array(part.obj) is None:
        return None
    key = (buffer_address(part), part.nbytes)
    with _locked():
        kept = _kept.get(key)
        if kept is not None:
            kept.users += 1
    if kept is not None:
        try:
            same = kept.holds_now(key[0])
        except BaseException:
            _done([kept])
            raise
        if same:
            return kept
        with _locked():  # stale: it goes before the new copy is made, not after
            _drop(kept)
        _done([kept])
    segment, [(start, _)] = Segment.holding([part], in_place=in_place)
    kept = _Kept(segment, start, key)
    kept.users = 1
    if keep:
        with _locked():
            replaced = _kept.get(key)
            _kept[key] = kept
            if replaced is not None:  # sent by another thread meanwhile
                _drop(replaced)
    return kept


def _done(used: list[_Kept]) -> None:
    """A call that used these is over: each goes if it is not kept; the rest wait
    ``keep_shared`` seconds for the next call."""
    _ended.extend(used)
    _settle()


def _settle() -> None:
    """Count the uses that ended, unless another holds `_lock` (who will count them)."""
    while _ended and _lock.acquire(blocking=False):
        try:
            _count_ended()
        finally:
            _lock.release()


def _count_ended() -> None:
    """With `_lock` held: count the ended uses; wait for the next call, if any is idle."""
    global _watch
    while _ended:
        kept = _ended.popleft()
        kept.users -= 1
        if kept.users == 0 and _kept.get(kept.key) is not kept:
            kept.release()
    if any(kept.users == 0 for kept in _kept.values()):
        if _watch is None:
            _watch = IdleWatch(_keep_seconds, _drop_idle)
        _watch.timeout = _keep_seconds
        _watch.arm()


def _drop(kept: _Kept) -> None:
    """Stop keeping a segment (with `_lock` held); it goes now, or when its last call ends."""
    if _kept.get(kept.key) is kept:
        del _kept[kept.key]
    if kept.users == 0:
        kept.release()


def _drop_idle() -> None:
    """``keep_shared`` seconds after a call ended: the segments no call used since go."""
    with _locked():
        if _watch is not None and _watch.armed:
            return  # a call ended since the deadline this fired for
        for kept in list(_kept.values()):
            if kept.users == 0:
                _drop(kept)


def release_all() -> None:
    """Let every kept segment go (those in use, when their calls end)."""
    with _locked():
        for kept in list(_kept.values()):
            _drop(kept)


def _same(first: int, second: int, size: int) -> bool:
    """Whether two stretches of memory hold the same bytes, compared by several threads at
    once (memcmp releases the GIL): one core cannot read memory as fast as a few can. A piece
    whose comparison fails to run counts as different."""
    pieces = max(1, min(COMPARING_THREADS, size // COMPARED_PER_THREAD))
    starts = range(0, size, max(1, -(-size // pieces)))
    equal: list[bool] = []

    def compare(start: int) -> None:
        if not _memcmp()(first + start, second + start, min(starts.step, size - start)):
            equal.append(True)

    threads: list[threading.Thread] = []
    try:
        for start in starts[1:]:
            threads.append(threading.Thread(target=compare, args=(start,)))
            threads[-1].start()
        compare(0)
    finally:  # no thread may read the memory once this returns: the caller may unmap it
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    return len(equal) == len(starts)


def _forget_in_child() -> None:
    """A forked child keeps nothing: the segments are its parent's (their addresses name the
    parent's process), and another thread of the parent may have held the lock."""
    global _lock, _watch
    _lock = threading.Lock()
    _kept.clear()  # the child's copies of the descriptors close with their segments
    _ended.clear()
    _watch = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@functools.cache
def _memcmp() -> Callable[[int, int, int], int]:
    libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
    memcmp = libc.memcmp
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp
