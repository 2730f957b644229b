"""Large arrays reach workers without a copy, and SharedArray is written into by workers."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import numpy
import psutil
import pytest
from clusters import CLUSTERS
from conftest import PROCESS_BACKENDS
from test_wire import parfor_files, shared_memory_held

from parfor import ParforError, SharedArray, pmap
from parfor_core import gil_enabled, load_result

#: Backends whose workers are processes on this machine, fed through parfor's shared memory.
MACHINE_BACKENDS = [name for name in PROCESS_BACKENDS if name not in CLUSTERS]


def _mapped_from_shared_memory(array: numpy.ndarray) -> bool:
    """Whether the array's data lies in a parfor shared-memory mapping of this process."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:parfor" in line:
                start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
                if start <= address < end:
                    return True
    return False


def inspect_argument(i: int, array: numpy.ndarray) -> tuple[float, bool, bool]:
    return float(array.sum()) + i, array.flags.owndata, _mapped_from_shared_memory(array)


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_a_large_array_argument_is_mapped_not_copied(backend):
    array = numpy.arange(1 << 20, dtype=numpy.float64)  # 8 MiB
    before, held = parfor_files(), shared_memory_held()
    results = pmap(inspect_argument, range(16), (array,), backend=backend, bar=False)
    assert [total for total, _, _ in results] == [float(array.sum()) + i for i in range(16)]
    assert not any(owns for _, owns, _ in results)
    assert all(mapped for _, _, mapped in results)
    assert parfor_files() == before
    assert shared_memory_held() <= held  # released by the caller when the call ended


def overwrite(i: int, array: numpy.ndarray) -> float:
    array[:] = -1.0
    return float(array.sum())


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_what_a_worker_writes_into_an_argument_stays_in_that_worker(backend):
    array = numpy.ones(1 << 18)
    results = pmap(overwrite, range(8), (array,), backend=backend, bar=False)
    assert results == [-float(1 << 18)] * 8
    assert array.min() == array.max() == 1.0


def write_index(i: int, out: SharedArray) -> int:
    out[i] = i * 10
    return os.getpid()


def fill_row(row: SharedArray) -> float:
    row[:] = 7
    return float(row.sum())


def made_in_worker(i: int) -> SharedArray:
    made = SharedArray((2, 3), dtype=numpy.int32)
    made[...] = i
    return made


def test_a_shared_array_takes_the_shapes_numpy_takes_and_refuses_the_others():
    assert SharedArray(numpy.int64(5)).shape == (5,)
    assert SharedArray((numpy.int32(2), 3)).shape == (2, 3)
    assert SharedArray(0).shape == (0,)
    for shape in (-1, (2, -3)):  # it was an empty array
        with pytest.raises(ValueError, match="negative dimensions are not allowed"):
            SharedArray(shape)
    for shape in ("abc", 2.5):
        with pytest.raises(TypeError, match="shape is a whole number or a sequence of them"):
            SharedArray(shape)


def test_workers_write_into_a_shared_array_and_the_caller_sees_it(backend):
    out = SharedArray(40, dtype=numpy.int64)
    pids = pmap(write_index, range(40), (out,), backend=backend, bar=False)
    assert out.tolist() == [i * 10 for i in range(40)]
    if backend not in ("serial", "threads"):
        assert os.getpid() not in pids


def test_views_of_a_shared_array_sent_as_items_are_written_in_place(backend):
    matrix = SharedArray.from_array(numpy.zeros((6, 4)))
    assert pmap(fill_row, list(matrix[:, ::-1]), backend=backend, bar=False) == [28.0] * 6
    assert (matrix == 7).all()


def test_a_shared_array_made_by_a_worker_arrives_with_its_values(backend):
    made = pmap(made_in_worker, range(3), backend=backend, bar=False)
    assert all(isinstance(array, SharedArray) for array in made)
    assert [array.tolist() for array in made] == [[[i] * 3] * 2 for i in range(3)]
    made[2][0, 0] = 9  # still writable, shared memory of this process now
    assert made[2][0, 0] == 9


def test_computing_with_a_shared_array_makes_plain_arrays_and_scalars():
    shared = SharedArray((3, 4))
    shared[...] = 2.0
    assert type(shared + 1) is numpy.ndarray
    assert isinstance(shared.sum(), numpy.floating) and shared.sum() == 24.0
    assert isinstance(shared[1:, ::2], SharedArray)
    sent_back = pickle.loads(pickle.dumps(shared[1:, ::2]))
    sent_back[...] = 5.0  # a view of the same memory, not a copy
    assert shared[1:, ::2].tolist() == [[5.0, 5.0]] * 2
    assert shared[0].tolist() == [2.0] * 4
    assert type(pickle.loads(pickle.dumps(shared * 2))) is numpy.ndarray


def _holds(inode: int) -> bool:
    """Whether this process holds the shared memory segment ``inode`` open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                return True
        except OSError:
            continue
    return False


def test_a_shared_array_is_freed_when_no_longer_used():
    shared = SharedArray(1000)
    inode = shared._memory.address.inode
    view = shared[10:]
    pmap(write_index, range(5), (shared,), backend="processes", bar=False)
    assert _holds(inode)
    del shared
    gc.collect()
    assert _holds(inode)  # the view keeps it
    assert view[0] == 0.0
    del view
    gc.collect()
    assert not _holds(inode)


def test_a_released_shared_array_cannot_be_sent_and_the_error_says_why():
    with SharedArray(8) as shared:
        pass
    with pytest.raises(ParforError, match="is gone: the process that made it released it"):
        pmap(write_index, range(4), (shared,), backend="processes", bar=False)
    shared[0] = 1.0  # this process keeps its own mapping
    assert shared[0] == 1.0


def test_a_shared_array_of_python_objects_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="not Python objects: dtype object"):
        SharedArray(3, dtype=object)
    with pytest.raises(TypeError, match="not Python objects"):
        SharedArray.from_array(numpy.array([{"a": 1}, None]))


def test_shared_memory_of_another_machine_is_refused_by_name():
    from parfor_core._shared import Address
    from parfor_core._shared_array import _attach_view

    elsewhere = Address("another-boot-id", "/proc/1/fd/3", 1, 8)
    with pytest.raises(ParforError, match="belongs to another machine"):
        _attach_view(elsewhere, 1, 0, (1,), numpy.dtype(float), (8,))


KILLED_CALLER = """
import os, signal, sys
import numpy
from parfor import SharedArray, pmap

def work(i, big, out, pid_file):
    out[i] = big.sum()
    if i == 0:
        with open(pid_file, "w") as file:
            file.write(str(os.getpid()))
        os.kill(os.getppid(), signal.SIGKILL)
    import time; time.sleep(60)

if __name__ == "__main__":
    out = SharedArray(4)
    pmap(work, range(4), (numpy.ones(1 << 20), out, sys.argv[1]), backend="processes",
         bar=False)
"""


def test_a_killed_caller_leaves_no_process_and_no_file(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CALLER)
    before = parfor_files()
    pid_file = tmp_path / "worker.pid"
    process = subprocess.run([sys.executable, str(script), str(pid_file)], timeout=60)
    assert process.returncode == -signal.SIGKILL
    worker = int(pid_file.read_text())
    _eventually(lambda: not psutil.pid_exists(worker), seconds=10)
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"
    assert parfor_files() == before


def test_shared_array_without_numpy_says_how_to_get_it():
    code = textwrap.dedent("""
        import sys
        sys.modules["numpy"] = None
        import parfor
        try:
            parfor.SharedArray
        except ImportError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert "SharedArray needs numpy: pip install numpy" in result.stdout


def _segment_inode(i: int, array: numpy.ndarray) -> int:
    """The inode of the shared memory that the argument's data lies in, in this worker."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if "memfd:parfor" in line and start <= address < end:
                return int(fields[4])
    raise AssertionError("the argument is not in shared memory")


def _workers_mapping(inode: int) -> list[int]:
    mapping = []
    for child in psutil.Process().children(recursive=True):
        try:
            with open(f"/proc/{child.pid}/maps") as maps:
                if any(line.split()[4] == str(inode) for line in maps if "memfd:parfor" in line):
                    mapping.append(child.pid)
        except OSError:
            continue
    return mapping


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_workers_let_go_of_a_calls_shared_memory_once_it_is_over(backend):
    inodes = set(pmap(_segment_inode, range(8), (numpy.ones(1 << 20),), backend=backend,
                      bar=False))
    assert len(inodes) == 1
    pmap(abs, range(8), backend=backend, bar=False)  # any later call, on the same workers
    assert _eventually(lambda: _workers_mapping(*inodes) == [])


def inspect_item(item: numpy.ndarray) -> tuple[float, bool, bool]:
    return float(item.sum()), item.flags.owndata, _mapped_from_shared_memory(item)


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_large_items_are_mapped_not_copied_and_let_go_after_their_task(backend):
    items = [numpy.full(1 << 17, float(i)) for i in range(8)]  # 1 MiB each
    held = shared_memory_held()
    results = pmap(inspect_item, items, backend=backend, bar=False)
    assert [total for total, _, _ in results] == [i * float(1 << 17) for i in range(8)]
    assert not any(owns for _, owns, _ in results)
    assert all(mapped for _, _, mapped in results)
    assert _eventually(lambda: shared_memory_held() <= held)  # each as its task's result came


def _eventually(condition: Callable[[], bool], seconds: float = 5) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (what another thread or process does
    right after the caller got its results)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def negate_in_place(item: numpy.ndarray) -> float:
    item *= -1
    return float(item.sum())


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_what_a_worker_writes_into_an_item_stays_in_that_worker(backend):
    items = [numpy.ones(1 << 17) for _ in range(4)]
    assert pmap(negate_in_place, items, backend=backend, bar=False) == [-float(1 << 17)] * 4
    assert all(item.min() == item.max() == 1.0 for item in items)


def make_large(i: int) -> tuple[int, numpy.ndarray]:
    return os.getpid(), numpy.full(1 << 17, float(i))


def _held_by(pids: set[int]) -> int:
    """How many shared memory segments these processes hold open."""
    return sum(len(shared_memory_held(pid)) for pid in pids)


def _mapped_here(inodes: set[int]) -> set[int]:
    """Which of these shared memory segments this process maps."""
    with open("/proc/self/maps") as maps:
        fields = [line.split() for line in maps if "memfd:parfor" in line]
    return {int(f[4]) for f in fields} & inodes


def test_large_results_come_back_through_shared_memory_that_workers_let_go():
    pids, results = zip(*pmap(make_large, range(8), backend="processes", bar=False),
                        strict=True)
    assert [float(r[0]) for r in results] == [float(i) for i in range(8)]
    assert all(_mapped_from_shared_memory(r) for r in results)
    results[3][:] = -1.0  # the caller's own copy-on-write pages
    assert results[3].sum() == -float(1 << 17) and results[4][0] == 4.0
    assert _eventually(lambda: _held_by(set(pids)) == 0)  # once told the results were read
    inodes = {_segment_inode(0, r) for r in results}
    assert _mapped_here(inodes) == inodes  # the results alone keep their memory
    del results
    gc.collect()
    if not gil_enabled():  # free-threaded: an object made by one thread (a worker's reader
        # thread, here) and dropped by another is freed when the first one next runs
        pmap(abs, range(8), backend="processes", bar=False)
    assert _mapped_here(inodes) == set()


def large_if_odd(i: int) -> tuple[int, numpy.ndarray | int]:
    return os.getpid(), numpy.full(1 << 17, float(i)) if i % 2 else i


def test_a_worker_lets_go_of_large_results_among_small_ones():
    """Only answers in shared memory are acknowledged: the worker keeps those, in order, and
    drops each when the caller says it has read it (small answers need no word)."""
    pids, results = zip(*pmap(large_if_odd, range(9), backend="processes", bar=False,
                              n_processes=1), strict=True)
    assert [r if isinstance(r, int) else float(r[0]) for r in results] == list(range(9))
    assert all(_mapped_from_shared_memory(r) for r in results[1::2])
    assert _eventually(lambda: _held_by(set(pids)) == 0)


def die_on_three(item: numpy.ndarray) -> float:
    if item[0] == 3:
        os._exit(1)
    return float(item[0])


def test_a_worker_dying_on_a_large_item_names_it_and_leaves_nothing_held():
    from parfor import WorkerDiedError

    held = shared_memory_held()
    items = [numpy.full(1 << 17, float(i)) for i in range(6)]
    with pytest.raises(WorkerDiedError, match="input item 3"):
        pmap(die_on_three, items, backend="processes", bar=False)
    # a task still running in the other worker keeps its items until it ends
    assert _eventually(lambda: shared_memory_held() <= held)


def test_only_large_buffers_go_through_shared_memory():
    """Small items and results stay in the bytes (a segment costs more than it saves); large
    ones go out, and the bytes travel as plain bytes (the memory stays with the sender)."""
    from parfor_core import Call, Task, answer_holds_shared, dump_items, load_result, run_items

    call = Call(numpy.negative)
    small = dump_items(Task(call, range(2), [numpy.ones(100), numpy.ones(8000)]), local=True)
    large = dump_items(Task(call, range(1), [numpy.ones(8192)]), local=True)  # 64 KiB
    assert type(small) is bytes and hasattr(large, "segment")
    assert type(pickle.loads(pickle.dumps(large))) is bytes
    held = shared_memory_held()
    answer = run_items(call, large, local=True)
    assert shared_memory_held() - held == {os.fstat(answer.segment.fd).st_ino}
    assert answer_holds_shared(answer) and answer_holds_shared(memoryview(answer))
    assert load_result(answer).values[0].tolist() == [-1.0] * 8192
    small_answer = run_items(call, small, local=True)
    assert type(small_answer) is bytes and not answer_holds_shared(small_answer)
    assert type(run_items(call, large, local=False)) is bytes


def test_release_shared_lets_the_memory_go_while_the_bytes_live():
    """What a backend calls once a task's result is back: on free-threaded Python, dropping the
    bytes from another thread would leave the memory to a garbage collection."""
    from parfor_core import Call, Task, dump_items, release_shared
    from parfor_core._shared import still_shared

    data = dump_items(Task(Call(abs), range(1), [numpy.ones(8192)]), local=True)
    address = data.segment.address
    assert still_shared(address)
    release_shared(data)
    assert not still_shared(address)
    release_shared(data)  # again: nothing happens
    release_shared(b"plain bytes")


def test_items_travel_in_the_bytes_when_no_shared_memory_can_be_made(monkeypatch):
    from parfor_core import Call, Task, dump_items, run_items
    from parfor_core._shared import Segment

    def exhausted(parts, **options):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Segment, "holding", staticmethod(exhausted))
    data = dump_items(Task(Call(numpy.negative), range(1), [numpy.ones(8192)]), local=True)
    assert type(data) is bytes
    answer = run_items(Call(numpy.negative), data, local=True)
    assert type(answer) is bytes and load_result(answer).values[0].sum() == -8192.0


MANY_DESCRIPTORS = """
import os, resource, sys
from parfor import WorkerDiedError, pmap

def die(i):
    os._exit(3)

if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    assert max(held) > 1024
    try:
        pmap(die, range(2), backend="processes", bar=False)
    except WorkerDiedError as exc:
        print("died:", exc)
"""


def test_a_worker_dies_and_stops_cleanly_with_descriptors_above_1023(tmp_path):
    """Waiting for a worker's exit works whatever its descriptor's number: select() refuses
    those above 1023, and the death went unreported (a hang) when it was used."""
    script = tmp_path / "many.py"
    script.write_text(MANY_DESCRIPTORS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "died: The worker running input item" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("setting", "granted"), [
    ("always within_size [advise] never deny force", True),
    ("[always] madvise never", True),
    ("always within_size advise [never] deny force", False),
    ("always within_size advise never [deny] force", False),
])
def test_huge_pages_are_asked_for_where_the_system_grants_them(tmp_path, monkeypatch, setting,
                                                               granted):
    from parfor_core import _shared

    path = tmp_path / "shmem_enabled"
    path.write_text(setting + "\n")
    monkeypatch.setattr(_shared, "SHMEM_HUGE_PAGES", str(path))
    assert _shared.huge_pages_on_request.__wrapped__() is granted
    monkeypatch.setattr(_shared, "SHMEM_HUGE_PAGES", str(tmp_path / "absent"))
    assert _shared.huge_pages_on_request.__wrapped__() is False


@pytest.mark.parametrize("through_mapping", [True, False])
def test_a_large_segment_holds_its_parts_however_it_is_written(monkeypatch, through_mapping):
    """Through a mapping asked for huge pages where the system grants them; else pwrite."""
    from parfor_core import _shared

    monkeypatch.setattr(_shared, "huge_pages_on_request", lambda: through_mapping)
    parts = [numpy.arange(300_000, dtype=numpy.float64), numpy.arange(7, dtype=numpy.int8),
             numpy.full(10, 2.5)]
    segment, spans = _shared.Segment.holding([memoryview(p).cast("B") for p in parts])
    assert segment.address.size >= _shared.HUGE_PAGE
    memory = memoryview(_shared.attach(segment.address, shared=False))
    for part, (start, end) in zip(parts, spans, strict=True):
        assert start % _shared.ALIGNMENT == 0
        assert numpy.array_equal(numpy.frombuffer(memory[start:end], dtype=part.dtype), part)
    segment.release()


def filled(i: int) -> numpy.ndarray:
    return numpy.full(20_000, i, dtype=numpy.float64)  # 160 KB: through shared memory


@pytest.mark.parametrize("backend", MACHINE_BACKENDS)
def test_results_kept_by_the_caller_hold_no_file_descriptors(backend):
    # Each result came back as a mapping of its shared memory, and each mapping holds a file
    # descriptor: a ParPool whose caller kept 1000 results ran out of them (ulimit -n 1024).
    from parfor import ParPool

    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    with ParPool(filled, backend=backend, n_processes=2, bar=False) as pool:
        for i in range(200):
            pool[i] = i
        kept = [pool[i] for i in range(200)]
    assert [int(array[0]) for array in kept] == list(range(200))
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) - before < 50
