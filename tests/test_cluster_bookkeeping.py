"""The cluster backends' bookkeeping (parfor_backends/_cluster.py) under conditions that a real
cluster gives only by chance: many items of one worker dying at once while every send fails,
callers giving up on items in quarantine, an interrupt inside a send.

The engine here is a ClusterBackend of threads in this process. Its remote tasks run the real
worker side (`execute_call`) at once, each on a thread of its own, and an item that calls
`kill_its_worker()` takes every task running at that moment down with it, as a Dask worker does
with the tasks it holds. The component under test is the bookkeeping, which is the same code
that the dask and ray backends run; tests/test_cluster.py runs those on real clusters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from typing import Any

import pytest

from parfor import WorkerDiedError, pmap
from parfor_backends._cluster import ClusterBackend
from parfor_backends._retrying import Job, settle
from parfor_core import Call, Result, Task, execute_call

pytestmark = pytest.mark.timeout(60)

#: The killer's run time, and everyone else's: all are out when it kills.
KILLER_SECONDS, OTHERS_SECONDS = 0.2, 1.0


_worker = threading.local()  # each remote task runs on a thread of its own


def kill_its_worker() -> None:
    """Called by an item: its worker goes down when the item returns, with every task running
    there. (Whatever an item raises, even a BaseException, is its error, not a death.)"""
    _worker.dying = True


class WorkerLost(Exception):
    """A remote task's outcome when its worker went down."""


class ThreadCluster(ClusterBackend):
    """A cluster engine of threads in this process, which can refuse or interrupt sends."""

    name = "thread-cluster"
    module = "concurrent.futures"
    extra = "none"

    def __init__(self, retries: int = 1) -> None:
        self.refuse_sends: BaseException | None = None  # raised by every send while set
        self.interrupt_next_send = False
        self.deaths = 0
        self._live: set[Future[bytes]] = set()
        self._live_lock = threading.Lock()
        self._threads = ThreadPoolExecutor(256, thread_name_prefix="thread-cluster")
        super().__init__(4, retries=retries)

    def _connect(self) -> int:
        return self.n_workers

    def _disconnect(self, kill: bool) -> None:
        pass

    def _ship(self, data: bytes) -> Any:
        return data

    def _start_remote(self, call_id: str, shipped: Any, items: bytes) -> Any:
        if self.interrupt_next_send:
            self.interrupt_next_send = False
            raise KeyboardInterrupt
        if self.refuse_sends is not None:
            raise self.refuse_sends
        remote: Future[bytes] = Future()
        remote.set_running_or_notify_cancel()
        with self._live_lock:
            self._live.add(remote)
        self._threads.submit(self._run, remote, call_id, shipped, items)
        return remote

    def _run(self, remote: Future[bytes], call_id: str, shipped: bytes, items: bytes) -> None:
        answer = execute_call(call_id, lambda: shipped, items)
        if getattr(_worker, "dying", False):
            _worker.dying = False
            with self._live_lock:
                victims, self._live = self._live, set()
                self.deaths += 1
            for victim in victims:
                victim.set_exception(WorkerLost("a thread-cluster worker went down"))
            return
        with self._live_lock:
            if remote not in self._live:  # its worker went down meanwhile
                return
            self._live.discard(remote)
        remote.set_result(answer)

    def _when_done(self, remote: Any, callback: Callable[[], object]) -> None:
        remote.add_done_callback(lambda _: callback())

    def _outcome(self, remote: Any) -> bytes:
        return remote.result()

    def _cancel(self, remotes: list[Any], hard: bool) -> None:
        pass  # like Dask: a running task is not stopped

    def _lost_worker(self, error: BaseException) -> tuple[str, bool] | None:
        return (str(error), False) if isinstance(error, WorkerLost) else None

    def shutdown(self) -> None:
        super().shutdown()
        self._threads.shutdown(wait=True)


def killer_zero(x: int) -> int:
    """Item 0 kills its worker once `KILL` is set; the others take long enough to be out
    when it does."""
    KILL.wait(10)
    if x == 0:
        time.sleep(KILLER_SECONDS)
        kill_its_worker()
        return x
    time.sleep(OTHERS_SECONDS)
    return x


#: While it is clear, the items wait: a test sends all it needs out before the killer kills,
#: however slow the machine.
KILL = threading.Event()


@pytest.fixture
def cluster():
    KILL.set()
    engine = ThreadCluster()
    yield engine
    KILL.set()
    engine.shutdown()


def submit_each(engine: ThreadCluster, call: Call, items: range) -> list[Future[Result]]:
    return [engine.submit(Task(call, (i,), (i,))) for i in items]


def wait_for_deaths(engine: ThreadCluster, deaths: int) -> None:
    deadline = time.monotonic() + 10
    while engine.deaths < deaths:
        assert time.monotonic() < deadline, "the killer never ran"
        time.sleep(0.01)


def in_time(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fun(*args, **kwargs)``, which must end within 15 s: a call that a job left marked as
    out, or held back in quarantine, would wait for ever."""
    caller = ThreadPoolExecutor(1)
    try:
        return caller.submit(fun, *args, **kwargs).result(timeout=15)
    finally:
        caller.shutdown(wait=False)  # the fixture's shutdown ends a call that hangs


def works_promptly(engine: ThreadCluster) -> None:
    """A new call on the engine finishes, however the earlier ones ended."""
    assert in_time(pmap, abs, [-1, -2, -3], backend=engine, bar=False) == [1, 2, 3]


def test_every_item_of_a_dead_worker_settles_when_every_send_fails(cluster):
    """150 items die together and wait to run again alone, one by one; every send of theirs
    fails. Each caller gets the send's error (sending them by recursion went 150 deep, lost
    futures and left jobs queued for good)."""
    KILL.clear()
    futures = submit_each(cluster, Call(killer_zero), range(150))
    cluster.refuse_sends = ConnectionError("this engine takes no more tasks")
    KILL.set()
    _, not_done = wait(futures, timeout=20)
    assert not not_done, f"{len(not_done)} of 150 items never settled"
    errors = {type(future.exception()).__name__ for future in futures}
    assert errors == {"ConnectionError"}, errors
    cluster.refuse_sends = None
    works_promptly(cluster)


def test_items_in_quarantine_that_their_callers_gave_up_hold_nothing_back(cluster):
    """Four items die together, and their callers give up on them (a closed gmap does) while
    they wait to run again alone: a new task runs at once."""
    futures = submit_each(cluster, Call(killer_zero), range(4))
    wait_for_deaths(cluster, 1)
    for future in futures:
        future.cancel()
    works_promptly(cluster)
    assert cluster.deaths <= 2  # the killer ran again at most once (alone) before it was dropped


def test_an_interrupt_inside_a_send_leaves_no_task_marked_as_out(cluster):
    """A Ctrl-C that lands while a task is sent reaches the caller; the task counts as out no
    longer, so a later death still lets its suspect run alone, and fail naming it."""
    cluster.interrupt_next_send = True
    with pytest.raises(KeyboardInterrupt):
        cluster.submit(Task(Call(abs), (0,), (-1,)))
    with pytest.raises(WorkerDiedError, match=r"input item 0 died 2 times"):
        in_time(pmap, killer_zero, range(3), backend=cluster, bar=False)
    works_promptly(cluster)


@pytest.mark.parametrize("deaths", [0, 1])  # a retry of a chunk's item; a suspect's next run
def test_a_retry_whose_caller_an_interrupt_failed_meanwhile_leaves_nothing_out(cluster, deaths):
    """An interrupt may fail a job's future while the engine's callback thread starts that
    job's retry. Started after, it must not count as out: seen on Dask, a later item that
    killed its worker waited for ever to run again alone."""
    job = Job.of(Task(Call(abs), (0,), (-1,)))
    job.deaths = deaths
    settle(job.future, CancelledError("the thread-cluster backend was interrupted"))
    cluster._start(job)  # as _finished starts a retry
    with pytest.raises(WorkerDiedError, match=r"input item 0 died 2 times"):
        in_time(pmap, killer_zero, range(3), backend=cluster, bar=False)
    works_promptly(cluster)
