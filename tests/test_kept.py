"""A large array's shared memory is kept for a short while after its call: the same array sent
again, unchanged, reuses it instead of being copied again; changed, it is sent anew."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy
import pytest
from test_shared_memory import MACHINE_BACKENDS

from parfor import gmap, pmap
from parfor_core import _kept
from parfor_core._shared import still_shared

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")

#: Large enough to be kept.
SIZE = _kept.KEPT_BYTES // 8 + 1024


@pytest.fixture(autouse=True)
def no_kept_segments():
    _kept.release_all()
    yield
    _kept.release_all()


def _segment_of(array: numpy.ndarray) -> str:
    """The inode of the parfor segment this process maps the array's data from."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= address < high and "memfd:parfor" in line:
                return fields[4]
    raise AssertionError("the array is not in shared memory")


def total_and_segment(i: int, array: numpy.ndarray, offset: float = 0.0) -> tuple[float, str]:
    return float(array.sum()) + offset, _segment_of(array)


def _kept_addresses() -> list:
    return [kept.segment.address for kept in _kept._kept.values()]


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_an_unchanged_array_is_sent_again_in_the_same_memory(backend):
    array = numpy.random.default_rng(2).random(SIZE)
    first = pmap(total_and_segment, range(4), (array,), backend=backend, bar=False)
    second = pmap(total_and_segment, range(4), (array,), backend=backend, bar=False)
    assert {total for total, _ in first + second} == {float(array.sum())}
    assert len({segment for _, segment in first + second}) == 1


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
@pytest.mark.parametrize("where", [0, SIZE // 2, SIZE - 1])
def test_a_changed_array_is_sent_anew(backend, where):
    array = numpy.ones(SIZE)
    first = pmap(total_and_segment, range(4), (array,), backend=backend, bar=False)
    array[where] = 3.0
    second = pmap(total_and_segment, range(4), (array,), backend=backend, bar=False)
    assert {total for total, _ in first} == {float(SIZE)}
    assert {total for total, _ in second} == {float(SIZE) + 2.0}
    assert {segment for _, segment in first}.isdisjoint(segment for _, segment in second)


def test_the_other_arguments_may_change():
    array = numpy.ones(SIZE)
    results = [pmap(total_and_segment, range(2), (array, offset), backend="processes",
                    bar=False) for offset in (1.0, 2.0)]
    assert [{total for total, _ in each} for each in results] == [{SIZE + 1.0}, {SIZE + 2.0}]
    assert len({segment for each in results for _, segment in each}) == 1


def test_a_kept_segment_goes_at_the_next_call_without_its_array():
    first, second = numpy.ones(SIZE), numpy.zeros(SIZE) + 2.0
    pmap(total_and_segment, range(2), (first,), backend="processes", bar=False)
    [address] = _kept_addresses()
    pmap(total_and_segment, range(2), (second,), backend="processes", bar=False)
    assert not still_shared(address)
    [other] = _kept_addresses()
    assert other != address and still_shared(other)


def test_a_kept_segment_goes_after_a_while(monkeypatch):
    monkeypatch.setenv("PARFOR_KEEP_SHARED", "0.2")
    pmap(total_and_segment, range(2), (numpy.ones(SIZE),), backend="processes", bar=False)
    [address] = _kept_addresses()
    deadline = time.monotonic() + 10
    while still_shared(address) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not still_shared(address) and not _kept_addresses()


def slow_total(i: int, array: numpy.ndarray) -> float:
    time.sleep(0.05)
    return float(array.sum())


def test_a_segment_in_use_stays_until_its_call_ends():
    """A call that does not send a kept array drops its segment only once no call uses it."""
    first, second = numpy.ones(SIZE), numpy.zeros(SIZE) + 2.0
    running = gmap(slow_total, range(16), (first,), backend="processes", bar=False)
    results = [next(running)]
    [address] = _kept_addresses()
    assert pmap(slow_total, range(2), (second,), backend="processes", bar=False) == [
        float(second.sum())] * 2
    assert still_shared(address)  # no longer kept for later calls, but still in use
    results += list(running)
    assert results == [float(SIZE)] * 16
    assert not still_shared(address)


def test_arrays_below_the_threshold_are_not_kept():
    array = numpy.ones(SIZE - 2048)
    pmap(total_and_segment, range(2), (array,), backend="processes", bar=False)
    assert not _kept_addresses()


def _in_a_process(main: str) -> str:
    """What a fresh interpreter prints that first sends a kept array to `processes` workers,
    then runs ``main``."""
    code = textwrap.dedent("""
        import os
        import numpy
        from parfor import pmap
        from parfor_core import _kept, registry
        from parfor_core._shared import still_shared
        def total(i, array):
            return float(array.sum())
        if __name__ == "__main__":
            pmap(total, range(2), (numpy.ones(%d),), backend="processes", bar=False)
            [kept] = _kept._kept.values()
    """) % SIZE + textwrap.indent(textwrap.dedent(main), "    ")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_shutting_parfor_down_lets_kept_memory_go():
    assert _in_a_process("""
        assert still_shared(kept.segment.address)
        registry.shutdown()
        print(still_shared(kept.segment.address))
    """) == "False\n"


@pytest.mark.parametrize("where", [0, 2**20 - 1, 2**20, 3 * 2**20 + 5, 4 * 2**20 + 6])
def test_a_comparison_in_several_threads_finds_a_difference_anywhere(monkeypatch, where):
    monkeypatch.setattr(_kept, "COMPARING_THREADS", 4)
    monkeypatch.setattr(_kept, "COMPARED_PER_THREAD", 2**20)
    first = numpy.zeros(4 * 2**20 + 7, dtype=numpy.uint8)  # pieces of 1 MiB + 2 bytes
    second = first.copy()
    assert _kept._same(first.ctypes.data, second.ctypes.data, first.size)
    second[where] = 1
    assert not _kept._same(first.ctypes.data, second.ctypes.data, first.size)


def _wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_call_still_running_does_not_keep_other_segments_from_going(monkeypatch):
    monkeypatch.setenv("PARFOR_KEEP_SHARED", "0.2")
    first, second = numpy.ones(SIZE), numpy.zeros(SIZE) + 2.0
    running = gmap(slow_total, range(8), (first,), backend="processes", bar=False)
    next(running)
    pmap(total_and_segment, range(2), (first, second), backend="processes", bar=False)
    [address] = [kept.segment.address for kept in _kept._kept.values()
                 if kept.key[0] == second.__array_interface__["data"][0]]
    assert _wait_until(lambda: not still_shared(address))
    assert list(running) == [float(SIZE)] * 7


def test_a_call_that_fails_while_copying_leaves_no_segment_in_use(monkeypatch):
    first, second = numpy.ones(SIZE), numpy.zeros(SIZE) + 2.0
    pmap(total_and_segment, range(2), (first,), backend="processes", bar=False)
    holding = _kept.Segment.holding

    def no_memory_for_the_second(parts, **options):
        if parts[0].nbytes == second.nbytes and parts[0].obj is second:
            raise MemoryError("no memory for the second array")
        return holding(parts, **options)

    monkeypatch.setattr(_kept.Segment, "holding", no_memory_for_the_second)
    with pytest.raises(MemoryError):
        pmap(total_and_segment, range(2), (first, second), backend="processes", bar=False)
    assert [kept.users for kept in _kept._kept.values()] == [0]
    monkeypatch.setenv("PARFOR_KEEP_SHARED", "0.2")
    pmap(total_and_segment, range(2), (first,), backend="processes", bar=False)
    assert _wait_until(lambda: not _kept._kept)


def test_a_changed_array_lets_its_old_segment_go_before_it_is_copied_again(monkeypatch):
    array = numpy.ones(SIZE)
    pmap(total_and_segment, range(2), (array,), backend="processes", bar=False)
    [old] = _kept_addresses()
    holding = _kept.Segment.holding
    seen = []
    monkeypatch.setattr(_kept.Segment, "holding",
                        lambda parts, **options: (seen.append(still_shared(old)),
                                                  holding(parts, **options))[1])
    array[-1] = 0.0
    pmap(total_and_segment, range(2), (array,), backend="processes", bar=False)
    assert seen and not any(seen)  # the new copy, and the call's own segment


def test_a_call_that_ends_while_this_thread_holds_the_lock_does_not_wait_for_it():
    """As when a garbage collection closes an abandoned gmap while this thread is in `_kept`:
    waiting for the lock would deadlock."""
    array = numpy.ones(SIZE)
    running = gmap(slow_total, range(8), (array,), backend="processes", bar=False)
    next(running)
    [kept] = _kept._kept.values()
    closed = threading.Event()

    def close_while_locked() -> None:
        with _kept._locked():
            running.close()
            closed.set()

    thread = threading.Thread(target=close_while_locked, daemon=True)
    thread.start()
    thread.join(30)
    assert closed.is_set() and not thread.is_alive()
    assert kept.users == 0 and still_shared(kept.segment.address)  # kept for the next call


def segments_of_both(i: int, first: numpy.ndarray, second: numpy.ndarray) -> tuple[str, str]:
    return _segment_of(first), _segment_of(second)


def test_the_setting_at_0_keeps_nothing(monkeypatch):
    """Each large array still gets a segment of its own, for that call only."""
    monkeypatch.setenv("PARFOR_KEEP_SHARED", "0")
    first, second = numpy.ones(SIZE), numpy.full(SIZE, 2.0)
    results = pmap(segments_of_both, range(2), (first, second), backend="processes", bar=False)
    assert len(set(results)) == 1 and len(set(results[0])) == 2
    assert not _kept_addresses()
    again = pmap(segments_of_both, range(2), (first, second), backend="processes", bar=False)
    assert set(results[0]).isdisjoint(again[0])


def test_a_forked_child_keeps_nothing_of_its_parent():
    """In a process of its own: forking this one, which runs threads, could deadlock."""
    printed = _in_a_process("""
        with _kept._lock:  # held by the parent's thread at the fork
            child = os.fork()
        if child == 0:
            free = _kept._lock.acquire(timeout=5)
            print("child", len(_kept._kept), free, flush=True)
            os._exit(0)
        os.waitpid(child, 0)
        print("parent", len(_kept._kept))
    """)
    assert printed.split("\n")[:2] == ["child 0 True", "parent 1"]
