"""A large numpy argument is shared in place where shared memory gets huge pages: the caller's
array itself becomes the shared memory the workers map, so that its data exists once."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time

import numpy
import pytest
from test_shared_memory import MACHINE_BACKENDS, inspect_argument

from parfor import gmap, pmap
from parfor_core import _in_place, _shared

MIB = 2**20


@pytest.fixture
def huge_pages(monkeypatch):
    """Shared memory counts as getting huge pages: in-place sharing happens here too (with
    4 KiB pages, on a machine whose setting is ``never``; only speed depends on page size)."""
    monkeypatch.setattr(_shared, "huge_pages_on_request", lambda: True)


def _mappings(array: numpy.ndarray) -> list[dict[str, str]]:
    """The mappings of this process over ``array``'s memory: name and smaps fields of each."""
    address = array.__array_interface__["data"][0]
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                current = None
                if high > address and low < address + array.nbytes:
                    current = {"name": fields[5] if len(fields) > 5 else "",
                               "inode": fields[4]}
                    found.append(current)
            elif current is not None:
                current[fields[0].rstrip(":")] = fields[1]
    return found


def _shared_in_place(array: numpy.ndarray) -> bool:
    """Whether all of the array's memory is a parfor segment, with no private page left."""
    mappings = _mappings(array)
    return all(m["name"] == "/memfd:parfor" and m["Anonymous"] == "0" for m in mappings)


def _block_bytes() -> int:
    """Large enough that glibc always maps it for itself: below 32 MiB, a block can come from
    the heap (after a block as large was freed), and is then copied as usual."""
    return max(40 * MIB, _shared.IN_PLACE_BYTES)


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_a_large_argument_becomes_the_shared_memory_itself(huge_pages, backend):
    array = numpy.random.default_rng(1).random(_block_bytes() // 8)
    expected = array.copy()
    results = pmap(inspect_argument, range(8), (array,), backend=backend, bar=False)
    assert [total for total, _, _ in results] == [float(expected.sum()) + i for i in range(8)]
    assert all(mapped for _, _, mapped in results)  # the workers map it, as always
    assert _shared_in_place(array)  # ... and the caller's array is that memory, not a copy
    assert numpy.array_equal(array, expected)
    assert array.flags.writeable and array.flags.owndata


def total(i: int, array: numpy.ndarray) -> float:
    return float(array.sum())


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_what_the_caller_writes_afterwards_is_its_own_and_reaches_the_next_call(huge_pages,
                                                                                 backend):
    array = numpy.ones(_block_bytes() // 8)
    pmap(total, range(4), (array,), backend=backend, bar=False)
    array[::1000] = 3.0
    assert float(array.sum()) == array.size + 2 * len(array[::1000])
    assert pmap(total, range(4), (array,), backend=backend, bar=False) == [
        float(array.sum())] * 4
    assert _shared_in_place(array)  # shared again, with what the caller wrote


def slow_total(i: int, array: numpy.ndarray) -> float:
    time.sleep(0.05)
    return float(array.sum())


def test_a_lazy_call_keeps_its_argument_as_sent_while_the_caller_writes_it(huge_pages):
    array = numpy.ones(_block_bytes() // 8)
    sent = float(array.sum())
    results = []
    for value in gmap(slow_total, range(12), (array,), backend="processes", bar=False):
        results.append(value)
        array[:] = 0.0  # after the first result; the tasks after it still see the ones
    assert results == [sent] * 12
    assert float(array.sum()) == 0.0


def first_of_each(i: int, low: numpy.ndarray, high: numpy.ndarray) -> tuple[float, float]:
    return float(low[0]), float(high[-1])


def test_views_into_one_large_array_share_its_memory_once(huge_pages):
    array = numpy.arange(_block_bytes() // 8, dtype=numpy.float64)
    half = array.size // 2
    results = pmap(first_of_each, range(4), (array[1:half], array[half:-1]),
                   backend="processes", bar=False)
    assert results == [(1.0, float(array.size - 2))] * 4
    assert _shared_in_place(array)
    assert len({m["inode"] for m in _mappings(array)}) == 1


def test_memory_numpy_did_not_allocate_is_copied_as_usual(huge_pages, tmp_path):
    borrowed = numpy.frombuffer(bytearray(_block_bytes()), dtype=numpy.uint8)
    on_disk = numpy.memmap(tmp_path / "data", dtype=numpy.uint8, mode="w+",
                           shape=_block_bytes())
    on_disk[::4096] = 1
    for array in (borrowed, on_disk):
        before = _mappings(array)
        assert pmap(total, range(2), (array,), backend="processes", bar=False) == [
            float(array.sum())] * 2
        assert _mappings(array) == before
    assert _in_place.find_block(memoryview(on_disk)) is None


def test_arrays_below_the_threshold_are_copied_as_usual(huge_pages):
    array = numpy.ones((_shared.IN_PLACE_BYTES - 4096) // 8)
    before = _mappings(array)
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _mappings(array) == before


def test_without_huge_pages_in_shared_memory_the_array_is_left_alone(monkeypatch):
    """With 4 KiB pages, the caller's own reads of the array would be slower from then on."""
    monkeypatch.setattr(_shared, "huge_pages_on_request", lambda: False)
    array = numpy.ones(_block_bytes() // 8)
    before = _mappings(array)
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _mappings(array) == before


def test_an_array_shared_in_place_lets_its_memory_go_with_it(huge_pages):
    array = numpy.ones(_block_bytes() // 8)
    pmap(total, range(4), (array,), backend="processes", bar=False)
    inode = _mappings(array)[0]["inode"]
    del array
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if line.split()[4] == inode]


def test_an_array_shared_in_place_can_still_grow_in_place():
    """glibc grows such an array by remapping it over the file, past the data (ndarray.resize):
    the file reaches far enough that this reads zeros, not a bus error."""
    code = textwrap.dedent(f"""
        import numpy
        from parfor import pmap
        from parfor_core import _shared
        _shared.huge_pages_on_request = lambda: True
        def total(i, array):
            return float(array.sum())
        if __name__ == "__main__":
            array = numpy.arange({_block_bytes() // 8}, dtype=numpy.float64)
            pmap(total, range(2), (array,), backend="processes", bar=False)
            size = array.size
            array.resize(4 * size, refcheck=False)
            array[-1] = 5.0
            assert array[size - 1] == size - 1 and array[size:-1].sum() == 0, "contents"
            print("grown", array.size)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"grown {4 * (_block_bytes() // 8)}" in done.stdout


def test_where_the_file_cannot_reach_that_far_the_array_is_copied_as_usual():
    """A limit on file sizes (``ulimit -f``) refuses the room kept past the data."""
    code = textwrap.dedent(f"""
        import resource
        import numpy
        from parfor import pmap
        from parfor_core import _shared
        _shared.huge_pages_on_request = lambda: True
        def total(i, array):
            return float(array.sum())
        if __name__ == "__main__":
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
            array = numpy.ones({_block_bytes() // 8})
            assert pmap(total, range(2), (array,), backend="processes", bar=False) == [
                float(array.size)] * 2, "results"
            with open("/proc/self/maps") as maps:
                print("in place" if "memfd:parfor" in maps.read() else "copied")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "copied"
