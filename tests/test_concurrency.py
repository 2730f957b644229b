"""The core under real parallelism: calls, pools, progress bars, the registry and the settings
used from many threads at once. On a free-threaded Python these threads truly run together."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import BACKENDS

from parfor import ParPool, config, pmap
from parfor_core import registry
from parfor_core._config import current

THREADS = 8


def square(x: int) -> int:
    return x * x


def together(job, n: int = THREADS) -> list:
    """Run ``job(i)`` for i in range(n) on n threads released at the same moment."""
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        return job(i)

    with ThreadPoolExecutor(n) as threads:
        return list(threads.map(run, range(n)))


def test_concurrent_calls_each_get_their_own_results(backend):
    def job(i):
        size = 300 + 37 * i
        ordered = i % 2 == 0
        got = pmap(square, range(size), backend=backend, bar=False, yield_ordered=ordered,
                   n_processes=1 + i % 3, serial=False if backend != "serial" else None)
        return got if ordered else sorted(got)

    assert together(job) == [[x * x for x in range(300 + 37 * i)] for i in range(THREADS)]


def test_progress_callbacks_of_concurrent_calls_do_not_mix(backend):
    def job(i):
        counts = []
        pmap(square, range(100 + i), backend=backend, bar=counts.append)
        return counts[-1], counts == sorted(counts)

    assert together(job) == [(100 + i, True) for i in range(THREADS)]


def test_a_parpool_per_thread(backend):
    def job(i):
        with ParPool(square, backend=backend) as pool:
            for x in range(40):
                pool[x] = x + i
            return [pool[x] for x in range(40)]

    assert together(job) == [[(x + i) ** 2 for x in range(40)] for i in range(THREADS)]


def test_one_parpool_shared_by_threads(backend):
    with ParPool(square, backend=backend) as pool:
        handles = together(lambda i: [pool(i * 1000 + x) for x in range(50)])
        assert len({h for batch in handles for h in batch}) == THREADS * 50  # no handle twice
        fetched = together(lambda i: [pool.get_newest() for _ in range(50)])
        results = sorted(result for batch in fetched for _, result in batch)
        assert results == sorted((i * 1000 + x) ** 2 for i in range(THREADS) for x in range(50))
        assert len(pool) == 0 and pool.get_newest() is None


def test_registry_leases_balance_under_concurrency():
    def job(i):
        settings = current(backend="threads", n_processes=1 + i % 3)
        for _ in range(20):
            with registry.lease(registry.select(None, serial=None, total=10,
                                                settings=settings)) as backend:
                assert backend.n_workers == 1 + i % 3
                assert pmap(square, range(5), backend=backend, bar=False) == [0, 1, 4, 9, 16]
        return True

    assert all(together(job))
    assert registry._leases == {}


def test_config_blocks_stay_in_their_thread():
    def job(i):
        with config(n_processes=i + 1, backend="threads"):
            seen = set()
            for _ in range(200):
                seen.add(current()["n_processes"])
            return seen

    assert together(job) == [{i + 1} for i in range(THREADS)]


def _worker_threads() -> int:
    """The threads backend's workers alive now; other tests' pools (Ray, Dask) start and end
    threads of their own at any time, so the process's thread count would not do."""
    return sum(t.name.startswith("parfor-worker") for t in threading.enumerate())


def test_nested_calls_do_not_multiply_threads():
    before = _worker_threads()

    def outer(i):
        return pmap(square, range(20), backend="threads", bar=False)

    pmap(outer, range(16), backend="threads", bar=False, n_processes=4)
    assert _worker_threads() - before <= 4  # the outer pool's, none per item


SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="no value")


def seen_by_the_item(i: int) -> str:
    return SEEN.get()


@pytest.mark.parametrize("backend", [name for name in BACKENDS
                                     if not registry.get_class(name).crosses_process])
def test_every_item_sees_the_callers_context_variables(backend):
    # Threads ran in their own contexts: the items the caller ran itself saw its context
    # variables (decimal.localcontext(), say), the others did not.
    token = SEEN.set("the caller's")
    try:
        for items in (range(8), range(2000)):
            assert set(pmap(seen_by_the_item, items, backend=backend, bar=False)) \
                == {"the caller's"}
    finally:
        SEEN.reset(token)


def inner_item(y: int) -> int:
    return y


def sum_in_a_thread_of_its_own(x: int, backend: str) -> int:
    """An item that hands its work to a thread of its own, which makes a call."""
    box = []
    helper = threading.Thread(target=lambda: box.append(sum(
        pmap(inner_item, range(10), backend=backend, bar=False))))
    helper.start()
    helper.join()
    return box[0] + x


@pytest.mark.timeout(60)
def test_a_call_from_a_thread_that_a_task_started_does_not_wait_for_ever(backend):
    # On threads, its tasks queued behind the tasks that waited for it: every worker thread
    # waited in a helper's join, and the helper for a worker thread.
    assert pmap(sum_in_a_thread_of_its_own, range(4), (backend,), backend=backend,
                n_processes=2, bar=False) == [45, 46, 47, 48]
