"""ParPool: add work at any time, fetch results at any time, on every backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from clusters import CLUSTERS
from conftest import BACKENDS

from parfor import ParPool, WorkerError


def product(i: int, j: int, k: int) -> int:
    return i * j * k


def power(base: int, exponent: int = 2) -> int:
    return base**exponent


def fails(i: int) -> int:
    raise ArithmeticError(f"no result for {i}")


def test_setitem_and_getitem(backend):
    with ParPool(product, (3,), {"k": 2}, backend=backend) as pool:
        for i in range(10):
            pool[i] = i
        assert [pool[i] for i in range(10)] == [0, 6, 12, 18, 24, 30, 36, 42, 48, 54]
        assert len(pool) == 0


def test_call_returns_a_handle(backend):
    with ParPool(product, (2, 5), backend=backend) as pool:
        handles = [pool(i) for i in range(5)]
        assert len(set(handles)) == 5
        assert [pool[h] for h in handles] == [0, 10, 20, 30, 40]
        assert pool("x", handle="mine") == "mine"
        assert pool["mine"] == "x" * 10


def test_add_task_with_another_function(backend):
    with ParPool(product, (1, 1), backend=backend) as pool:
        pool[0] = 4
        pool.add_task(power, (3,), {"exponent": 3}, handle="cube")
        pool.add_task(power, (5,), handle="square")
        assert pool["cube"] == 27
        assert pool["square"] == 25
        assert pool[0] == 4


def test_get_newest_returns_every_task_once(backend):
    with ParPool(power, backend=backend) as pool:
        for i in range(8):
            pool[f"h{i}"] = i
        seen = dict(pool.get_newest() for _ in range(8))
        assert seen == {f"h{i}": i * i for i in range(8)}
        assert pool.get_newest() is None


def test_exception_is_raised_when_its_result_is_fetched(backend):
    with ParPool(fails, backend=backend) as pool:
        pool["bad"] = 7
        pool["good"] = 1
        with pytest.raises(ArithmeticError, match="no result for 7") as caught:
            pool["bad"]
        assert any("handle 'bad'" in note for note in caught.value.__notes__)
        with pytest.raises(ArithmeticError):
            pool["good"]


def test_duplicate_and_unknown_handles(backend):
    with ParPool(power, backend=backend) as pool:
        pool[1] = 1
        with pytest.raises(ValueError, match="already in use"):
            pool[1] = 2
        with pytest.raises(KeyError, match="no task with handle 2"):
            pool[2]
        assert 1 in pool and 2 not in pool


def test_an_unknown_handle_is_a_key_error_and_a_value_error_as_in_the_original(backend):
    with ParPool(power, backend=backend) as pool:
        for error in (KeyError, ValueError):
            with pytest.raises(error, match="^no task with handle 'x' in this ParPool$"):
                pool["x"]
            with pytest.raises(error, match="no task with handle 'x'"):
                del pool["x"]


class Counter:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def update(self, n: int) -> None:
        self.steps.append(n)


def test_barlength_is_how_far_a_task_moves_the_bar(backend, capsys):
    counter = Counter()
    with ParPool(power, bar=counter, backend=backend) as pool:
        pool(2, handle="a", barlength=3)
        pool.add_task(power, (3,), handle="b", barlength=0)
        pool["c"] = 4
        pool.process_queue()  # the original's call to collect results: nothing to do here
        assert (pool["a"], pool["b"], pool["c"]) == (4, 9, 16)
    assert sorted(counter.steps) == [1, 3]
    with ParPool(power, bar=True, backend=backend) as pool:
        pool(5, barlength=4)
        assert pool.get_newest() == (0, 25)
    assert "4/4" in capsys.readouterr().err
    with ParPool(power, backend=backend) as pool, pytest.raises(ValueError, match="barlength"):
        pool(5, barlength=-1)


def test_an_error_of_the_bar_reaches_the_caller_and_no_result_is_lost(backend):
    called = threading.Event()

    def broken_bar(done: int) -> None:
        called.set()
        raise RuntimeError(f"the bar broke at {done}")

    def until_the_bar_was_called() -> None:  # maybe in a worker's thread, which then raised
        assert called.wait(30)
        called.clear()
        time.sleep(0.2)

    pool = ParPool(power, bar=broken_bar, backend=backend)
    pool["a"] = 2
    until_the_bar_was_called()
    with pytest.raises(RuntimeError, match="the bar broke at 1") as caught:
        pool["a"]
    assert "parfor: raised by the ParPool's bar" in caught.value.__notes__
    assert pool["a"] == 4  # the task stayed in the pool
    pool["b"] = 3
    until_the_bar_was_called()
    with pytest.raises(RuntimeError, match="the bar broke at 2"):
        pool.close()  # the pool's last operation says so too


class Unsendable:
    def __reduce__(self):
        raise TypeError("refuses to be pickled")


def test_a_task_that_cannot_be_added_is_named_by_its_handle(process_backend):
    with ParPool(power, backend=process_backend) as pool:
        with pytest.raises(TypeError) as caught:
            pool["x"] = Unsendable()
        assert "parfor: adding the ParPool task with handle 'x'" in caught.value.__notes__
        pool["y"] = 3
        assert pool["y"] == 9


def test_pool_without_function_needs_add_task(backend):
    with ParPool(backend=backend) as pool:
        with pytest.raises(TypeError, match="no function"):
            pool[0] = 1
        handle = pool.add_task(power, (4,))
        assert pool[handle] == 16


def test_closed_pool_refuses_work(backend):
    pool = ParPool(power, backend=backend)
    pool["unfetched"] = 2
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool[0] = 1
    with pytest.raises(KeyError, match="'unfetched' in this ParPool .it is closed: the tasks "
                                       "not fetched were cancelled"):
        pool["unfetched"]


def test_none_is_a_handle_like_any_other(backend):
    # It once asked for a made-up handle: the task went under 0, and pool[None] failed.
    with ParPool(power, backend=backend) as pool:
        pool[None] = 3
        assert None in pool and 0 not in pool
        made_up = pool(4)  # a handle left out is made up, as before
        assert made_up is not None
        assert (pool[None], pool[made_up]) == (9, 16)


def test_add_task_names_args_that_are_not_a_sequence(backend):
    with ParPool(power, backend=backend) as pool:
        with pytest.raises(TypeError, match=r"args must be a tuple of the positional arguments "
                                            r"for fun, got int 5; did you mean args=\(5,\)"):
            pool.add_task(power, 5)
        assert len(pool) == 0


def test_progress_callback_counts_finished_tasks(backend):
    counts = []
    with ParPool(power, bar=counts.append, backend=backend) as pool:
        for i in range(6):
            pool[i] = i
        [pool[i] for i in range(6)]
    assert sorted(counts) == [1, 2, 3, 4, 5, 6]


def die(i: int) -> int:
    os._exit(7)


def test_worker_death_is_a_worker_error_and_the_pool_goes_on(process_backend):
    with ParPool(die, backend=process_backend) as pool:
        pool["x"] = 1
        with pytest.raises(WorkerError, match="handle 'x'"):
            pool.get_newest()
        assert "x" not in pool and len(pool) == 0
        assert pool.get_newest() is None  # nothing left to wait for: no hang


def once_released(value: float, release: str) -> float:
    """``value``; a true one only once the file ``release`` exists: a task that ends when the
    test says so."""
    deadline = time.monotonic() + 60
    while value and not os.path.exists(release):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.01)
    return value


def test_get_newest_never_returns_a_stale_handle(backend, tmp_path):
    release = tmp_path / "release"
    # serial runs "a" at submit time, and a cluster may queue both tasks on one worker: there
    # "a" is released at once, and the tasks may end in either order.
    in_order = backend not in ("serial", *CLUSTERS)
    if not in_order:
        release.touch()
    with ParPool(once_released, (str(release),), backend=backend, n_processes=2) as pool:
        pool["a"] = 0
        assert pool["a"] == 0
        pool["a"] = 1.0  # the handle is reused for a task that ends only when released
        pool["b"] = 0.0
        first = pool.get_newest()
        if in_order:
            assert first == ("b", 0.0)  # the task that ended, not the one still running
            release.touch()
        # Whatever the order, "a" comes with its new task's result, never the fetched one's.
        assert {first, pool.get_newest()} == {("a", 1.0), ("b", 0.0)}


def test_one_worker_still_runs_asynchronously():
    with ParPool(power, n_processes=1) as pool:
        assert pool.backend.name != "serial"
        assert pool.backend.n_workers == 1
        pool[0] = 3
        assert pool[0] == 9


def test_get_newest_waiters_are_released_when_the_work_runs_out(backend):
    import threading

    with ParPool(time.sleep, backend=backend) as pool:
        pool["only"] = 0.2
        got = []
        waiters = [threading.Thread(target=lambda: got.append(pool.get_newest()))
                   for _ in range(3)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join(timeout=30)
        assert not any(waiter.is_alive() for waiter in waiters)
        assert sorted(got, key=repr) == sorted([("only", None), None, None], key=repr)


@pytest.mark.parametrize("backend", ["serial", "threads"])  # in-process: tasks see the pool
def test_a_task_may_add_work_to_its_own_pool(backend):
    pool = ParPool(backend=backend)
    try:
        handle = pool.add_task(lambda: pool.add_task(power, (3,), handle="inner"))
        assert pool[handle] == "inner"
        assert pool["inner"] == 9
    finally:
        pool.close()


def run_script(folder: Path, text: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``text`` as a script of its own with ``arguments``; it must end well."""
    script = folder / "script.py"
    script.write_text(text)
    done = subprocess.run([sys.executable, str(script), *arguments], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


LEFT_OPEN = """
import sys, time
from pathlib import Path
from parfor import ParPool, gmap

def slow(i, marks, quick_first):
    Path(marks, str(i)).touch()
    time.sleep(0 if i == 0 and quick_first else 1)
    return i

if __name__ == "__main__":
    backend, marks, what = sys.argv[1:]
    if what == "pool":  # two run (or as many as a cluster runs at once), the others wait
        pool = ParPool(slow, (marks, False), backend=backend, n_processes=2, bar=False)
        for i in range(10):
            pool[i] = i
        running = 2
    else:  # once the first result is read, two run, and one more waits (2 tasks per worker)
        results = gmap(slow, range(10), (marks, True), backend=backend, n_processes=2,
                       bar=False)
        next(results)
        running = 3
    while len(list(Path(marks).iterdir())) < running:
        time.sleep(0.05)
    print(*sorted(int(path.name) for path in Path(marks).iterdir()), flush=True)
"""


@pytest.mark.parametrize("what", ["pool", "gmap"])
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "serial"],
                         indirect=True)  # serial runs each task as it is added or pulled
def test_tasks_waiting_at_exit_do_not_run(backend, what, tmp_path):
    # An unclosed ParPool, or a gmap left half read, at the end of a script: the interpreter
    # exits without running the tasks that have not started (threads ran them all first).
    marks = tmp_path / "marks"
    marks.mkdir()
    done = run_script(tmp_path, LEFT_OPEN, backend, str(marks), what)
    if backend in CLUSTERS:  # what it would start after the caller left, it has by now
        time.sleep(1.5)
    ran = sorted(int(path.name) for path in marks.iterdir())
    started = [int(item) for item in done.stdout.split()]
    if backend == "ray":  # Ray cannot cancel the tasks it holds (2 per worker) without risk
        assert set(started) <= set(ran) <= set(range(4)), ran
    else:
        assert ran == started  # none of those that waited


CALL_OF_ANOTHER_THREAD_AT_EXIT = """
import sys, threading, time
from parfor import pmap

def slow(i):
    time.sleep(0.5)
    return i

def work(backend):
    try:
        pmap(slow, range(4), backend=backend, n_processes=2, bar=False)
    except Exception as error:  # its tasks that had not started may fail: the program ends
        print(type(error).__name__, flush=True)
    print("the thread ended", flush=True)

if __name__ == "__main__":
    threading.Thread(target=work, args=(sys.argv[1],)).start()  # joined at exit
    time.sleep(0.2)
"""


def test_a_call_of_another_thread_running_at_exit_ends(backend, tmp_path):
    # On threads, its waiting tasks were cancelled at exit, which wakes no one waiting for
    # them: the thread waited for ever, and the interpreter for the thread.
    done = run_script(tmp_path, CALL_OF_ANOTHER_THREAD_AT_EXIT, backend)
    assert done.stdout.splitlines()[-1] == "the thread ended", done.stdout


CALL_STARTED_AT_EXIT = """
import sys, threading, time
from parfor import pmap

def slow(i):
    time.sleep(0.1)
    return i * i

def work(backend):
    time.sleep(0.5)  # the main thread has ended: the interpreter exits meanwhile
    try:
        print(pmap(slow, range(4), backend=backend or None, n_processes=2, bar=False))
    except Exception as error:
        print(f"{type(error).__name__}: {error}")

if __name__ == "__main__":
    threading.Thread(target=work, args=(sys.argv[1],)).start()  # joined at exit
"""


@pytest.mark.parametrize("backend", ["", *BACKENDS], indirect=True)
def test_a_call_started_while_the_interpreter_exits_runs_or_says_why(backend, tmp_path):
    # A thread that the main one left behind calls pmap after the executors' exit handlers
    # ran: threads and loky failed with "can't register atexit after shutdown", from an
    # import of concurrent.futures. The automatic choice runs such a call serially.
    done = run_script(tmp_path, CALL_STARTED_AT_EXIT, backend)
    refused = (f"InterpreterExitingError: The interpreter is exiting: the {backend} backend "
               f"can start no new work")
    answers = ["[0, 1, 4, 9]"] if backend == "" else ["[0, 1, 4, 9]", refused]
    assert done.stdout.splitlines()[-1] in answers, done.stdout + done.stderr


def quick(x: int) -> int:
    time.sleep(0.002)
    return x


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_task_added_while_another_thread_closes_the_pool_is_not_left_in_it(backend):
    # It was stored after close() had emptied the pool: it stayed, never ran (its call was
    # cancelled), and fetching it raised a bare IndexError.
    for _ in range(10):
        pool = ParPool(quick, backend=backend, n_processes=2, bar=False)
        refused = []

        def add(pool=pool, refused=refused):
            while True:
                try:
                    pool(0)
                except RuntimeError as error:
                    refused.append(str(error))
                    return

        adders = [threading.Thread(target=add) for _ in range(3)]
        for adder in adders:
            adder.start()
        time.sleep(0.01)
        pool.close()
        for adder in adders:
            adder.join(10)
        assert len(pool) == 0
        assert refused == ["this ParPool is closed"] * 3


class CountedFunction:
    """A function that counts how often it is pickled (here, in the caller)."""

    pickled = 0

    def __call__(self, i: int) -> int:
        return i + 1

    def __reduce__(self) -> tuple[object, ...]:
        CountedFunction.pickled += 1
        return CountedFunction, ()


def test_add_task_sends_a_function_once_not_with_every_task(process_backend):
    # add_task made a call of its own for every task, so its function (and what it refers
    # to: a 1 MB global made each task 45 times slower) was serialized with every task.
    CountedFunction.pickled = 0
    function = CountedFunction()
    with ParPool(backend=process_backend, n_processes=2, bar=False) as pool:
        for i in range(20):
            pool.add_task(function, (i,), handle=i)
        assert [pool[i] for i in range(20)] == list(range(1, 21))
    assert CountedFunction.pickled <= 2
