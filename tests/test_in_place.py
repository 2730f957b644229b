"""A large numpy argument is shared in place: the caller's array itself becomes the shared
memory the workers map, so that its data exists once."""

from __future__ import annotations

import ctypes
import gc
import mmap
import subprocess
import sys
import textwrap
import time

import numpy
import pytest
from test_shared_memory import MACHINE_BACKENDS, inspect_argument

import parfor
from parfor import gmap, pmap
from parfor_core import _in_place, _kept, _shared

MIB = 2**20
PAGE = mmap.PAGESIZE


pytestmark = pytest.mark.skipif(
    _in_place._libc() is None,
    reason="in-place sharing needs Linux on x86-64 or ARM64 with glibc's malloc")


@pytest.fixture(autouse=True)
def no_kept_segments():
    """Each test starts with no segment kept from another (whose array may have had the same
    address and contents)."""
    _kept.release_all()
    yield
    _kept.release_all()


@pytest.fixture(params=[False, True], ids=["pwrite", "through a mapping"])
def written_either_way(request, monkeypatch):
    """Both ways a segment is written: with pwrite (shared memory in 4 KiB pages, as on our
    machines), and through a mapping asked for huge pages (where the system grants them; here,
    whose setting is ``never``, still in 4 KiB pages)."""
    monkeypatch.setattr(_shared, "huge_pages_on_request", lambda: request.param)


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
                               "inode": fields[4], "range": (low, high)}
                    found.append(current)
            elif current is not None:
                current[fields[0].rstrip(":")] = fields[1]
    return found


def _layout(array: numpy.ndarray) -> list[tuple[str, str, tuple[int, int]]]:
    """What the array's memory is: each mapping's name, file (inode) and range over it (a
    neighbour that merges with a mapping changes only what lies outside)."""
    address = array.__array_interface__["data"][0]
    return [(m["name"], m["inode"], (max(m["range"][0], address),
                                     min(m["range"][1], address + array.nbytes)))
            for m in _mappings(array)]


def _bytes_in_place(array: numpy.ndarray) -> int:
    """How many bytes of the array's memory are a parfor segment; raises if such a mapping
    holds private pages too (the caller's own copy)."""
    address = array.__array_interface__["data"][0]
    mapped = 0
    for mapping in _mappings(array):
        if mapping["name"] == "/memfd:parfor":
            assert mapping["Anonymous"] == "0", mapping
            low, high = mapping["range"]
            mapped += min(high, address + array.nbytes) - max(low, address)
    return mapped


def _shared_in_place(array: numpy.ndarray) -> bool:
    """Whether the array's memory is a segment but for its first and last partial pages."""
    return _bytes_in_place(array) >= array.nbytes - 2 * PAGE


def _block_bytes() -> int:
    """Large enough that glibc always maps it for itself: below 32 MiB, a block can come from
    the heap (after a block as large was freed), and is then copied as usual."""
    return max(40 * MIB, _shared.IN_PLACE_BYTES)


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_a_large_argument_becomes_the_shared_memory_itself(written_either_way, backend):
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
def test_an_array_written_between_calls_gets_its_own_memory_back_and_is_copied(backend):
    """Shared again, it would pay a page copy for each page written, after every call."""
    array = numpy.ones(_block_bytes() // 8)
    pmap(total, range(4), (array,), backend=backend, bar=False)
    assert _shared_in_place(array)
    array[::1000] = 3.0  # the pages written become the caller's own
    assert float(array.sum()) == array.size + 2 * len(array[::1000])
    assert pmap(total, range(4), (array,), backend=backend, bar=False) == [
        float(array.sum())] * 4
    assert _bytes_in_place(array) == 0  # its own memory again, all of it
    assert float(array.sum()) == array.size + 2 * len(array[::1000])
    before = _layout(array)
    array[1] = 5.0
    assert pmap(total, range(4), (array,), backend=backend, bar=False) == [
        float(array.sum())] * 4
    assert _layout(array) == before  # copied as usual


def _segments_over(array: numpy.ndarray) -> set[str]:
    return {m["inode"] for m in _mappings(array) if m["name"] == "/memfd:parfor"}


def test_an_array_only_read_between_calls_is_sent_again_in_the_same_segment():
    array = numpy.ones(_block_bytes() // 8)
    expected = [float(array.size)] * 4
    segments = []
    for _ in range(3):
        assert pmap(total, range(4), (array,), backend="processes", bar=False) == expected
        segments.append(_segments_over(array))
    assert all(len(inodes) == 1 for inodes in segments)
    assert len(set.union(*segments)) == 1
    assert _shared_in_place(array) and float(array.sum()) == array.size


def test_an_array_sent_after_its_kept_segment_went_is_shared_anew():
    array = numpy.ones(_block_bytes() // 8)
    expected = [float(array.size)] * 4
    segments = []
    for _ in range(3):  # this process maps none of the old segment's pages between
        assert pmap(total, range(4), (array,), backend="processes", bar=False) == expected
        segments.append(_segments_over(array))
        _kept.release_all()
    assert all(len(inodes) == 1 for inodes in segments)
    assert len(set.union(*segments)) == 3
    assert _shared_in_place(array) and float(array.sum()) == array.size


def slow_total(i: int, array: numpy.ndarray) -> float:
    time.sleep(0.05)
    return float(array.sum())


def test_a_lazy_call_keeps_its_argument_as_sent_while_the_caller_writes_it():
    array = numpy.ones(_block_bytes() // 8)
    sent = float(array.sum())
    results = []
    for value in gmap(slow_total, range(12), (array,), backend="processes", bar=False):
        results.append(value)
        array[:] = 0.0  # after the first result; the tasks after it still see the ones
    assert results == [sent] * 12
    assert float(array.sum()) == 0.0


def first_and_last(i: int, part: numpy.ndarray) -> tuple[float, float]:
    return float(part[0]), float(part[-1])


def test_a_view_shares_only_its_own_pages():
    array = numpy.arange(2 * _block_bytes() // 8, dtype=numpy.float64)
    half = array[: array.size // 2]
    assert pmap(first_and_last, range(4), (half,), backend="processes", bar=False) == [
        (0.0, float(half.size - 1))] * 4
    assert _shared_in_place(half)
    assert _bytes_in_place(array[array.size // 2:]) == 0  # the rest was not sent
    assert numpy.array_equal(array, numpy.arange(array.size, dtype=numpy.float64))


def row_total(row: numpy.ndarray) -> float:
    return float(row.sum())


@pytest.mark.parametrize("huge_pages", [True, False], ids=["huge pages", "4 KiB pages"])
def test_items_are_shared_in_place_only_where_shared_memory_gets_huge_pages(monkeypatch,
                                                                            huge_pages):
    """An item's copy goes with its task: in 4 KiB pages, sharing the item in place would save
    little memory, and the caller would read it in those pages from then on."""
    monkeypatch.setattr(_shared, "huge_pages_on_request", lambda: huge_pages)
    table = numpy.ones((4, _block_bytes() // 8))
    table[:, 0] = numpy.arange(4)
    before = [_layout(row) for row in table]
    assert pmap(row_total, list(table), backend="processes", bar=False) == [
        float(table.shape[1] - 1 + row) for row in range(4)]
    if huge_pages:
        assert all(_shared_in_place(row) for row in table)
    else:
        assert [_layout(row) for row in table] == before


def test_an_array_with_pages_never_touched_is_copied_as_usual():
    """Shared in place, they would take memory (in the segment) for as long as the array
    lives; copied, only while the call runs."""
    array = numpy.zeros(_block_bytes() // 8)  # no memory yet, but where written
    array[: array.size // 2] = 1.0
    before = _layout(array)
    assert pmap(total, range(2), (array,), backend="processes", bar=False) == [
        float(array.size // 2)] * 2
    assert _layout(array) == before


def test_memory_numpy_did_not_allocate_is_copied_as_usual(tmp_path):
    borrowed = numpy.frombuffer(bytearray(_block_bytes()), dtype=numpy.uint8)
    on_disk = numpy.memmap(tmp_path / "data", dtype=numpy.uint8, mode="w+",
                           shape=_block_bytes())
    on_disk[::4096] = 1
    for array in (borrowed, on_disk):
        before = _layout(array)
        assert pmap(total, range(2), (array,), backend="processes", bar=False) == [
            float(array.sum())] * 2
        assert _layout(array) == before
    assert _in_place.find_pages(memoryview(on_disk)) is None


def test_arrays_below_the_threshold_are_copied_as_usual():
    array = numpy.ones((_shared.IN_PLACE_BYTES - 4096) // 8)
    before = _layout(array)
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _layout(array) == before


def test_an_array_shared_in_place_lets_its_memory_go_with_it():
    array = numpy.ones(_block_bytes() // 8)
    pmap(total, range(4), (array,), backend="processes", bar=False)
    [inode] = {m["inode"] for m in _mappings(array) if m["name"] == "/memfd:parfor"}
    del array
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if line.split()[4] == inode]


def test_an_array_shared_in_place_can_still_grow_in_place():
    """An array shared in place is made of several mappings, so glibc grows it by copying it
    (as any block), not by remapping it over the file, past its end (a bus error)."""
    code = textwrap.dedent(f"""
        import numpy
        from parfor import pmap
        def total(i, array):
            return float(array.sum())
        if __name__ == "__main__":
            array = numpy.arange({_block_bytes() // 8}, dtype=numpy.float64)
            def in_a_segment(address):
                with open("/proc/self/maps") as maps:
                    for line in maps:
                        low, high = (int(bound, 16) for bound in line.split()[0].split("-"))
                        if low <= address < high and "memfd:parfor" in line:
                            return True
                return False
            pmap(total, range(2), (array,), backend="processes", bar=False)
            assert in_a_segment(array.__array_interface__["data"][0] + 8192), "not shared"
            size = array.size
            array.resize(4 * size, refcheck=False)
            array[-1] = 5.0
            assert array[size - 1] == size - 1 and array[size:-1].sum() == 0, "contents"
            assert not in_a_segment(array.__array_interface__["data"][0]), "not copied"
            print("grown", array.size)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"grown {4 * (_block_bytes() // 8)}" in done.stdout


def test_memory_with_a_setting_a_new_mapping_would_drop_is_copied_as_usual():
    array = numpy.ones(_block_bytes() // 8)
    address = array.__array_interface__["data"][0]
    start = -(-address // PAGE) * PAGE
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert madvise(start, 16 * PAGE, 16) == 0  # MADV_DONTDUMP: left out of core dumps
    assert _in_place.find_pages(memoryview(array).cast("B")) is None
    before = _layout(array)
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _layout(array) == before


@pytest.mark.parametrize("pages_gone", [False, True])
def test_a_piece_the_kernel_refuses_to_map_keeps_its_data(pages_gone):
    """Before Linux 6.12, a failing mmap over a range could drop its pages: they are put back."""
    libc = _in_place._libc()
    area = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.write(bytes(range(256)) * (8 * PAGE // 256))
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    copied = memoryview(bytearray(area[2 * PAGE:4 * PAGE]))
    if pages_gone:
        munmap = ctypes.CDLL(None).munmap
        munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert munmap(address + 2 * PAGE, 2 * PAGE) == 0
    assert not libc.map_over(address + 2 * PAGE, 2 * PAGE, -1, 0, copied)  # no such file
    assert area[:] == bytes(range(256)) * (8 * PAGE // 256)


def test_the_setting_turns_it_off():
    array = numpy.ones(_block_bytes() // 8)
    before = _layout(array)
    with parfor.config(share_in_place=False):
        pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _layout(array) == before
    _kept.release_all()  # else the next call sends the copy again
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _shared_in_place(array)


def test_a_lazy_call_follows_the_settings_where_it_was_made():
    # A gmap made in a block and read after it sent its array as the settings outside said.
    array = numpy.ones(_block_bytes() // 8)
    before = _layout(array)
    with parfor.config(share_in_place=False, keep_shared=0):
        results = gmap(total, range(2), (array,), backend="processes", bar=False)
    assert list(results) == [float(array.sum())] * 2
    assert _layout(array) == before
    assert not _kept._kept  # nothing kept after the call: keep_shared = 0


def both_totals(i: int, first: numpy.ndarray, second: numpy.ndarray) -> float:
    return float(first.sum() + second.sum())


def test_each_large_array_of_a_call_is_shared_in_place_in_a_segment_of_its_own():
    first, second = numpy.ones(_block_bytes() // 8), numpy.full(_block_bytes() // 8, 2.0)
    assert pmap(both_totals, range(2), (first, second), backend="processes", bar=False) == [
        float(first.size + 2 * second.size)] * 2
    assert _shared_in_place(first) and _shared_in_place(second)
    assert _segments_over(first) != _segments_over(second)


def test_an_array_below_the_threshold_goes_with_the_call_and_is_copied():
    """Only the large array has a segment of its own; the call's segment, with the small
    one in it, goes with the call."""
    array, other = numpy.ones(_block_bytes() // 8), numpy.ones(2 * MIB // 8)
    before = _layout(other)
    assert pmap(both_totals, range(2), (array, other), backend="processes", bar=False) == [
        float(array.size + other.size)] * 2
    assert _shared_in_place(array) and _layout(other) == before


def test_an_array_only_read_since_it_was_made_is_copied_as_usual():
    """Its pages are the kernel's one zero page: a segment would hold a copy of each."""
    array = numpy.zeros(_block_bytes() // 8)
    assert float(array.sum()) == 0.0
    before = _layout(array)
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _layout(array) == before


def test_an_array_a_forked_process_shares_with_its_parent_is_not_shared_in_place():
    """In a process of its own: forking this one, which runs threads, could deadlock."""
    code = textwrap.dedent(f"""
        import os
        import numpy
        from parfor_core import _in_place
        array = numpy.ones({_block_bytes() // 8})
        part = memoryview(array).cast("B")
        child = os.fork()
        if child == 0:  # the pages are still the parent's too
            print("child", "none" if _in_place.find_pages(part) is None else "found", flush=True)
            os._exit(0)
        os.waitpid(child, 0)
        print("parent", "none" if _in_place.find_pages(part) is None else "found")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["child none", "parent found"]


def test_sending_part_of_an_array_shared_in_place_before_copies_that_part():
    """Sharing it in place would leave the rest keeping the old segment, with the part's old
    pages, for as long as the array lives."""
    array = numpy.arange(2 * _block_bytes() // 8, dtype=numpy.float64)
    pmap(total, range(2), (array,), backend="processes", bar=False)
    assert _shared_in_place(array)
    before = _layout(array)
    half = array[: array.size // 2]
    assert pmap(total, range(2), (half,), backend="processes", bar=False) == [
        float(half.sum())] * 2
    assert _layout(array) == before
