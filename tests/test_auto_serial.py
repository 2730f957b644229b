"""Auto-serial: a call whose backend parfor chooses starts in the caller and stays there while
the measured cost per item says workers cannot pay; slow items go to workers. A serial call
runs in the same loop, all of it."""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time

import psutil
import pytest

from parfor import config, gmap, pmap
from parfor_core import _probe, gil_enabled, registry


def where(x: int) -> tuple[int, tuple[int, int]]:
    """The item, and the process and thread that ran it (workers are threads where the GIL is
    disabled, processes elsewhere)."""
    return x, (os.getpid(), threading.get_ident())


def slow_where(x: int) -> tuple[int, tuple[int, int]]:
    time.sleep(0.002)
    return where(x)


def here() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


class Boom(ValueError):
    pass


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise Boom(f"item {x}")
    if bad > 100:
        time.sleep(0.002)  # slow enough that the items after the first few go to workers
    return x


def test_quick_items_of_a_long_input_run_in_the_caller():
    results = pmap(where, range(20_000), bar=False)
    assert [x for x, _ in results] == list(range(20_000))
    assert {at for _, at in results} == {here()}


def test_slow_items_go_to_workers_after_a_few_here():
    pmap(abs, range(4), serial=False, bar=False)  # the workers have started
    results = pmap(slow_where, range(300), bar=False, yield_index=True)
    assert [index for index, _ in results] == list(range(300))
    assert [x for _, (x, _) in results] == list(range(300))
    places = [at for _, (_, at) in results]
    n_here = places.count(here())
    assert 1 <= n_here <= 10  # at most ~5 ms of 2 ms items measured here
    assert places[:n_here] == [here()] * n_here  # the first items, then workers
    assert here() not in places[n_here:]


def growing_where(x: int) -> tuple[int, tuple[int, int]]:
    """An item whose cost grows with it, 20 x microseconds of the clock whatever the machine's
    speed: sizes in increasing order."""
    deadline = time.perf_counter() + x * 20e-6
    while time.perf_counter() < deadline:
        pass
    return where(x)


def test_items_that_cost_more_along_the_input_go_to_workers():
    # The first items are quick: the call judged the whole input by them (the quickest chunk,
    # or the rest as one chunk from the first five items), and ran all of it here, 0.9 s.
    pmap(abs, range(4), serial=False, bar=False)  # the workers have started: none to help
    values = pmap(growing_where, range(300), bar=False)
    assert [value for value, _ in values] == list(range(300))
    elsewhere = [value for value, ran in values if ran != here()]
    assert len(elsewhere) >= 100  # about two thirds of them


def test_an_endless_generator_of_quick_items_runs_here_reading_little_ahead():
    read = itertools.count()
    taken = list(itertools.islice(gmap(where, (next(read) for _ in itertools.count()),
                                       bar=False), 50_000))
    assert [x for x, _ in taken] == list(range(50_000))
    assert {at for _, at in taken} == {here()}
    assert next(read) <= 50_000 + _probe.MAX_CHUNK  # read ahead by at most one chunk


@pytest.fixture
def slow_collector():
    """A cyclic garbage collector that takes 1 ms every 100 allocations, as in a process with
    a large heap (each collection scans all of it), or with a slow collection callback."""
    def slow_stop(phase: str, info: dict) -> None:
        if phase == "stop":
            time.sleep(0.001)
    thresholds = gc.get_threshold()
    gc.set_threshold(100)
    gc.callbacks.append(slow_stop)
    yield
    gc.callbacks.remove(slow_stop)
    gc.set_threshold(*thresholds)


def test_the_collectors_time_is_not_counted_as_work_that_workers_could_take(slow_collector):
    # It stays with the caller, who makes the results, wherever the items run: without this,
    # quick items went to workers, which ran them no faster.
    results = pmap(where, range(20_000), bar=False)
    assert [x for x, _ in results] == list(range(20_000))
    assert {at for _, at in results} == {here()}


def sleep_10_ms(x: int) -> int:
    time.sleep(0.01)
    return x


def nested_steps(x: int) -> list[int]:
    """The progress steps of a call made inside a worker (which runs serially)."""
    steps: list[int] = []
    assert pmap(sleep_10_ms, range(40), bar=steps.append) == list(range(40))
    return steps


@pytest.mark.parametrize("how", ["serial=True", "backend='serial'", "nested"])
def test_a_serial_call_of_slow_items_moves_its_bar_every_few_items(how):
    # It runs in the caller's loop, in chunks that grow fourfold for quick items but last at
    # most ~50 ms, as the last chunk's items took: 10 ms items go five at a time at most.
    if how == "nested":
        [steps] = pmap(nested_steps, [0], backend="processes", bar=False)
    else:
        steps = []
        options = {"serial": True} if how == "serial=True" else {"backend": "serial"}
        assert pmap(sleep_10_ms, range(40), bar=steps.append, **options) == list(range(40))
    assert steps[-1] == 40
    assert max(b - a for a, b in itertools.pairwise([0, *steps])) <= 5


def test_a_serial_gmap_reads_its_input_a_chunk_ahead_at_most():
    read = itertools.count()
    results = gmap(sleep_10_ms, (next(read) for _ in itertools.count()), serial=True, bar=False)
    taken = list(itertools.islice(results, 30))
    results.close()
    assert taken == list(range(30))
    assert next(read) <= 30 + 5  # a chunk of 10 ms items lasts 50 ms at most


def test_a_serial_call_of_quick_items_runs_here_in_order():
    results = pmap(where, range(50_000), serial=True, bar=False, yield_index=True)
    assert [index for index, _ in results] == list(range(50_000))
    assert [x for _, (x, _) in results] == list(range(50_000))
    assert {at for _, (_, at) in results} == {here()}


@pytest.mark.parametrize("how", [{"serial": False}, {"backend": "processes"}])
def test_serial_false_or_a_named_backend_always_uses_workers(how):
    results = pmap(where, range(1_000), bar=False, **how)
    assert here() not in {at for _, at in results}


def test_short_inputs_go_to_workers_at_once_when_they_are_ready():
    pmap(abs, range(4), serial=False, bar=False)  # the workers have started
    results = pmap(where, range(_probe.MIN_ITEMS - 1), bar=False)
    assert here() not in {at for _, at in results}


def cold_pool() -> None:
    """The pooled backends are shut down: no worker process of parfor's runs (nor starts)."""
    registry.shutdown()
    assert not [child for child in psutil.Process().children()
                if "_process_worker" in " ".join(child.cmdline())]


def test_while_the_workers_start_the_caller_runs_a_short_call_of_quick_items():
    cold_pool()
    results = pmap(where, range(8), bar=False)
    assert [x for x, _ in results] == list(range(8))
    places = {at for _, at in results}
    if gil_enabled():  # processes: done here before the first one is ready
        assert places == {here()}
    else:  # threads start at once: the caller never has to help
        assert here() not in places
    cold_pool()  # the workers that were starting stop too: none is left behind


def slow_logged(x: int, log: str) -> tuple[int, tuple[int, int]]:
    with open(log, "a") as file:
        file.write(f"{x}\n")
    time.sleep(0.3)
    return where(x)


def test_while_the_workers_start_the_caller_runs_a_slow_first_item_and_no_item_twice(tmp_path):
    cold_pool()
    log = tmp_path / "runs"
    results = pmap(slow_logged, range(6), (str(log),), bar=False)
    assert [x for x, _ in results] == list(range(6))
    assert sorted(map(int, log.read_text().split())) == list(range(6))  # each item ran once
    places = [at for _, at in results]
    if gil_enabled():  # processes: the caller took the first task while they started; then
        assert places[0] == here()  # they were ready, and took every other one
        assert here() not in places[1:]
    else:  # threads start at once: the caller never has to help
        assert here() not in places


@pytest.mark.parametrize("how", [{"serial": False}, {"backend": "processes"},
                                 {"n_processes": 2}])  # a cap: the caller would make it 3
def test_a_call_that_asks_for_workers_waits_for_them_to_start(how):
    cold_pool()
    results = pmap(where, range(8), bar=False, **how)
    assert here() not in {at for _, at in results}


def test_a_configured_number_of_workers_is_a_cap_the_caller_does_not_add_to():
    cold_pool()
    with config(n_processes=2):
        results = pmap(where, range(8), bar=False)
    assert here() not in {at for _, at in results}


@pytest.mark.parametrize("bad", [3, 250])  # in the caller; on a worker after the switch
def test_errors_name_the_item_wherever_it_ran(bad):
    with pytest.raises(Boom, match=f"item {bad}") as caught:
        pmap(fail_at, range(300), (bad,), bar=False)
    note = next(n for n in caught.value.__notes__ if f"raised by item {bad} ({bad})" in n)
    assert ("'MainThread'" in note) == (bad == 3)  # here, or in a worker


class FailAt:
    """``fun(item)`` with no extra arguments (the form run by a comprehension here), failing at
    one item."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __call__(self, x: int) -> int:
        if x == self.bad:
            raise Boom(f"item {x}")
        return 2 * x


INPUTS = {"list": list, "tuple": tuple, "range": lambda r: r,
          "generator": lambda r: (x for x in r)}


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("bad", [0, 1, 4, 5, 20, 21, 2_500, 4_999, None])
def test_the_quick_loop_here_gives_every_value_or_names_the_failing_item(kind, bad):
    """Chunks run here are 1, 4 and 16 items, then the rest; a chunk larger than all before it
    runs by a comprehension, which keeps no values when it raises: the item is found anyway."""
    items = INPUTS[kind](range(5_000))
    if bad is None:
        assert pmap(FailAt(-1), items, bar=False, total=5_000) == list(range(0, 10_000, 2))
        return
    with pytest.raises(Boom, match=f"item {bad}") as caught:
        pmap(FailAt(bad), items, bar=False, total=5_000)
    note = next(n for n in caught.value.__notes__ if f"raised by item {bad} ({bad})" in n)
    assert "'MainThread'" in note


def test_gmap_yields_the_values_before_a_failing_item_run_here():
    results = gmap(FailAt(3_000), range(5_000), bar=False)
    assert list(itertools.islice(results, 3_000)) == list(range(0, 6_000, 2))
    with pytest.raises(Boom, match="item 3000"):
        next(results)


def test_the_bar_counts_every_item_also_those_run_here():
    counts = []
    pmap(where, range(5_000), bar=counts.append)
    assert counts[-1] == 5_000 and counts == sorted(counts)
