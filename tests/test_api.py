"""The behavioural suite: pmap, gmap and parfor give the same results on every backend."""

from __future__ import annotations

import itertools
import os
import threading

import pytest

from parfor import Chunks, gmap, parfor, pmap
from parfor_core._chunking import ChunkSizer
from parfor_core._dispatch import CHUNKS_PER_WORKER


def square(x: int) -> int:
    return x * x


def scaled(i: int, a: int, k: int = 1) -> int:
    return a * i**2 * k


class Countdown:
    """An iterator with __len__ that is not a sequence."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Countdown:
        return self

    def __next__(self) -> int:
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        return self.n

    def __len__(self) -> int:
        return self.n


class Letters:
    """A custom iterable without __len__."""

    def __iter__(self):
        return iter("abcdefg")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: range(0), []),
        (lambda: [5], [25]),
        (lambda: range(37), [i * i for i in range(37)]),
        (lambda: (i for i in range(23)), [i * i for i in range(23)]),
        (lambda: Countdown(9), [i * i for i in reversed(range(9))]),
        (lambda: {3: "a", 1: "b"}, [9, 1]),
    ],
    ids=["empty", "one", "range", "generator", "iterator-with-len", "dict"],
)
def test_pmap_results_are_complete_and_ordered(backend, make, expected):
    assert pmap(square, make(), backend=backend, bar=False) == expected


def test_custom_iterable(backend):
    assert pmap(str.upper, Letters(), backend=backend, bar=False) == list("ABCDEFG")


def test_args_and_kwargs_reach_fun(backend):
    result = pmap(scaled, range(10), (3,), {"k": 2}, backend=backend, bar=False)
    assert result == [6 * i**2 for i in range(10)]


def test_decorator_replaces_the_function_by_its_results(backend):
    @parfor(range(10), (3,), backend=backend, bar=False)
    def fun(i, a):
        return a * i**2

    assert fun == [0, 3, 12, 27, 48, 75, 108, 147, 192, 243]


def test_closures_and_lambdas(backend):
    offset = 7
    assert pmap(lambda x: x + offset, range(5), backend=backend, bar=False) == [7, 8, 9, 10, 11]


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("n", [1, 5, 300])
def test_yield_index_is_the_input_position(backend, ordered, n):
    items = [f"item{i}" for i in range(n)]
    pairs = pmap(str.upper, items, backend=backend, bar=False, yield_index=True,
                 yield_ordered=ordered)
    assert sorted(pairs) == [(i, f"ITEM{i}") for i in range(n)]
    if ordered:
        assert [index for index, _ in pairs] == list(range(n))


def test_unordered_gives_every_result_once(backend):
    result = pmap(square, range(200), backend=backend, bar=False, yield_ordered=False)
    assert sorted(result) == [i * i for i in range(200)]


def test_chunks_are_given_to_fun_whole(backend):
    chunks = Chunks(range(10), size=3)
    assert pmap(list, chunks, backend=backend, bar=False) == [[0, 1], [2, 3, 4], [5, 6],
                                                               [7, 8, 9]]


def test_chunks_of_several_iterables(backend):
    chunks = Chunks(range(6), "abcdef", number=2)
    joined = pmap(lambda pair: "".join(f"{n}{c}" for n, c in zip(*pair, strict=True)), chunks,
                  backend=backend, bar=False)
    assert joined == ["0a1b2c", "3d4e5f"]


def test_gmap_is_lazy_on_an_endless_generator(backend):
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    results = gmap(square, endless(), backend=backend, bar=False)
    first = list(itertools.islice(results, 50))
    results.close()
    assert first == [i * i for i in range(50)]
    read_ahead = pulled - 50
    # Never more than the window of chunks; and chunk sizes ramp up, so early on far less.
    assert read_ahead <= CHUNKS_PER_WORKER * os.cpu_count() * ChunkSizer.MAX_ITEMS
    assert read_ahead < 1000, read_ahead


@pytest.mark.parametrize("stop", ["close", "throw"])
def test_a_closed_gmap_gives_no_more_results(backend, stop):
    # Halfway through a batch of results: a closed generator yields nothing, as any would.
    results = gmap(square, range(100_000), backend=backend, bar=False)
    assert list(itertools.islice(results, 3000)) == [i * i for i in range(3000)]
    if stop == "close":
        results.close()
    else:
        with pytest.raises(LookupError):
            results.throw(LookupError("enough"))
    assert list(results) == []
    with pytest.raises(StopIteration):
        next(results)


def test_gmap_reads_nothing_before_it_is_iterated(backend):
    pulled = []
    source = (pulled.append(i) or i for i in range(10))
    results = gmap(square, source, backend=backend, bar=False)
    assert pulled == []
    assert list(results) == [i * i for i in range(10)]


def test_gmap_streams_a_long_generator_in_bounded_memory(backend):
    # Consuming 20 000 results leaves at most a window of unread results behind.
    total = 0
    for value in gmap(int, (str(i) for i in range(20_000)), backend=backend, bar=False):
        total += value
    assert total == sum(range(20_000))


def identity_and_location(i: int) -> tuple[int, int, int]:
    return i, os.getpid(), threading.get_ident()


def nested(i: int, backend: str) -> tuple[tuple[int, int, int], list[tuple[int, int, int]]]:
    inner = pmap(identity_and_location, range(4), backend=None, bar=False)
    return identity_and_location(i), inner


def test_nested_calls_run_serially_inside_the_worker(backend):
    results = pmap(nested, range(4), (backend,), backend=backend, bar=False)
    assert [outer[0] for outer, _ in results] == [0, 1, 2, 3]
    for (_, pid, thread), inner in results:
        assert [i for i, _, _ in inner] == [0, 1, 2, 3]
        assert {(p, t) for _, p, t in inner} == {(pid, thread)}


def test_nested_named_backend_runs_serially_too(backend):
    def outer(i):
        return identity_and_location(i), pmap(identity_and_location, range(3),
                                               backend=backend, bar=False)

    for (_, pid, thread), inner in pmap(outer, range(3), backend=backend, bar=False):
        assert {(p, t) for _, p, t in inner} == {(pid, thread)}


def test_results_may_be_any_object(backend):
    def make(i):
        return {"i": i, "list": list(range(i)), "none": None, "set": {i}}

    assert pmap(make, range(5), backend=backend, bar=False) == [make(i) for i in range(5)]


def test_many_small_items(backend):
    n = 20_000
    assert pmap(square, range(n), backend=backend, bar=False) == [i * i for i in range(n)]


def test_n_processes_is_honoured(backend):
    result = pmap(identity_and_location, range(20), backend=backend, bar=False, n_processes=2)
    assert [i for i, _, _ in result] == list(range(20))


def test_nested_call_on_a_backend_instance_runs_serially_not_deadlocked():
    from parfor_backends.threads import ThreadsBackend

    pool = ThreadsBackend(2)

    def outer(i):
        return identity_and_location(i), pmap(identity_and_location, range(4), backend=pool,
                                               bar=False)

    try:
        for (_, pid, thread), inner in pmap(outer, range(4), backend=pool, bar=False):
            assert {(p, t) for _, p, t in inner} == {(pid, thread)}
    finally:
        pool.shutdown()


def test_a_wrong_total_does_not_stop_chunks_from_growing():
    sizer = ChunkSizer(n_workers=2, total=10)
    for _ in range(5):
        sizer.taken(sizer.next_size())
        sizer.record(1, 1e-6)
    sizes = []
    for _ in range(20):
        size = sizer.next_size()
        sizer.taken(size)
        sizes.append(size)
    assert sizes[-1] > 1000, sizes


def test_a_call_prepares_its_backend_before_the_first_task():
    """``Backend.prepare`` comes once per call, with the number of items, before any submit:
    that is what lets the processes backend boot its workers while the bar loads."""
    from parfor_backends.threads import ThreadsBackend

    class Recording(ThreadsBackend):
        def __init__(self, n_workers: int) -> None:
            super().__init__(n_workers)
            self.events: list[tuple[str, int | None]] = []

        def prepare(self, n_items: int | None) -> None:
            self.events.append(("prepare", n_items))

        def submit(self, task):
            self.events.append(("submit", len(task.items)))
            return super().submit(task)

    backend = Recording(2)
    assert pmap(abs, range(-5, 5), backend=backend, bar=False) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert backend.events[0] == ("prepare", 10)
    assert [kind for kind, _ in backend.events[1:]] == ["submit"] * (len(backend.events) - 1)
    assert sum(n for _, n in backend.events[1:]) == 10
    backend.shutdown()


def test_gmap_has_a_generators_send_and_throw():
    results = gmap(abs, range(-5, 5), bar=False)
    assert (next(results), results.send(None), results.send("ignored")) == (5, 4, 3)
    with pytest.raises(LookupError, match="enough"):
        results.throw(LookupError("enough"))
    assert list(results) == []  # closed: the rest was cancelled


def test_a_range_longer_than_len_can_tell_is_read_lazily(backend):
    # len(range(10**20)) raises OverflowError, which reached the caller.
    results = gmap(abs, range(-2, 10**20), backend=backend, bar=False)
    assert [next(results) for _ in range(4)] == [2, 1, 0, 1]
    results.close()


class _OthersDone:
    """How many items other than the first have run (threads share it)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.enough = threading.Event()


def first_waits_for_the_others(i: int, others: _OthersDone) -> bool:
    if i == 0:  # True if the others ran while it waited
        return others.enough.wait(10)
    with others.lock:
        others.count += 1
        if others.count >= 30:
            others.enough.set()
    return True


def test_pmap_keeps_the_workers_busy_while_an_early_item_runs_long():
    # Results waiting for their turn behind item 0 counted against the work read ahead: after
    # a few chunks no worker got another one until item 0 was done.
    others = _OthersDone()
    assert all(pmap(first_waits_for_the_others, range(41), (others,), backend="threads",
                    n_processes=2, bar=False))
