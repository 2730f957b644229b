"""Auto-serial: a call whose backend parfor chooses starts in the caller and stays there while
the measured cost per item says workers cannot pay; slow items go to workers."""

from __future__ import annotations

import itertools
import os
import time

import pytest

from parfor import gmap, pmap
from parfor_core import _probe


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


def slow_pid_of(x: int) -> tuple[int, int]:
    time.sleep(0.002)
    return x, os.getpid()


class Boom(ValueError):
    pass


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise Boom(f"item {x}")
    if bad > 100:
        time.sleep(0.002)  # slow enough that the items after the first few go to workers
    return x


def test_quick_items_of_a_long_input_run_in_the_caller():
    results = pmap(pid_of, range(20_000), bar=False)
    assert [x for x, _ in results] == list(range(20_000))
    assert {pid for _, pid in results} == {os.getpid()}


def test_slow_items_go_to_workers_after_a_few_here():
    results = pmap(slow_pid_of, range(300), bar=False, yield_index=True)
    assert [index for index, _ in results] == list(range(300))
    assert [x for _, (x, _) in results] == list(range(300))
    pids = [pid for _, (_, pid) in results]
    here = pids.count(os.getpid())
    assert 1 <= here <= 10  # at most ~5 ms of 2 ms items measured here
    assert pids[:here] == [os.getpid()] * here  # the first items, then workers
    assert len(set(pids[here:]) - {os.getpid()}) >= 1


def test_an_endless_generator_of_quick_items_runs_here_reading_little_ahead():
    read = itertools.count()
    taken = list(itertools.islice(gmap(pid_of, (next(read) for _ in itertools.count()),
                                       bar=False), 50_000))
    assert [x for x, _ in taken] == list(range(50_000))
    assert {pid for _, pid in taken} == {os.getpid()}
    assert next(read) <= 50_000 + _probe.MAX_CHUNK  # read ahead by at most one chunk


@pytest.mark.parametrize("how", [{"serial": False}, {"backend": "processes"}])
def test_serial_false_or_a_named_backend_always_uses_workers(how):
    results = pmap(pid_of, range(1_000), bar=False, **how)
    assert os.getpid() not in {pid for _, pid in results}


def test_short_inputs_go_to_workers_at_once():
    results = pmap(pid_of, range(_probe.MIN_ITEMS - 1), bar=False)
    assert os.getpid() not in {pid for _, pid in results}


@pytest.mark.parametrize("bad", [3, 250])  # in the caller; on a worker after the switch
def test_errors_name_the_item_wherever_it_ran(bad):
    with pytest.raises(Boom, match=f"item {bad}") as caught:
        pmap(fail_at, range(300), (bad,), bar=False)
    where = "thread" if bad == 3 else "worker process"
    assert any(f"raised by item {bad} ({bad}) in {where}" in note
               for note in caught.value.__notes__)


def test_the_bar_counts_every_item_also_those_run_here():
    counts = []
    pmap(pid_of, range(5_000), bar=counts.append)
    assert counts[-1] == 5_000 and counts == sorted(counts)
