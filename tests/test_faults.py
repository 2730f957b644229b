"""Fault injection on the processes backend: workers really die, and nothing is lost or hung."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import FrameType

import psutil
import pytest

from parfor import ParPool, WorkerDiedError, WorkerError, gmap, pmap
from parfor_backends import processes
from parfor_backends.processes import ProcessesBackend
from parfor_core import Call, Task


def sigkill_once(i: int, marker_dir: str) -> int:
    """Item 5 kills its worker the first time it runs, as the OOM killer would."""
    marker = Path(marker_dir, "killed")
    if i == 5 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return i * 10


def always_sigkill(i: int) -> int:
    if i == 137:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def long_unless_first(i: int) -> int:
    time.sleep(0 if i == 0 else 60)
    return i


def segfault(i: int) -> int:
    if i == 3:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return i


def exit_three(i: int) -> int:
    if i == 2:
        os._exit(3)
    return i


def test_a_killed_worker_is_replaced_and_its_items_retried(tmp_path):
    assert pmap(sigkill_once, range(40), (str(tmp_path),), backend="processes",
                bar=False) == [i * 10 for i in range(40)]
    assert (tmp_path / "killed").exists()


def test_an_item_that_keeps_killing_workers_fails_naming_it():
    with pytest.raises(WorkerDiedError) as caught:
        pmap(always_sigkill, range(300), backend="processes", bar=False)
    message = str(caught.value)
    assert "input item 137" in message and "SIGKILL" in message and "out-of-memory" in message
    assert caught.value.indices == [137]
    assert any("raised by item 137 (137)" in note for note in caught.value.__notes__)
    assert caught.value.__cause__ is None  # made in the caller: no worker traceback to repeat
    assert pmap(abs, [-1, -2], backend="processes", bar=False) == [1, 2]


def test_segfault_is_named():
    with pytest.raises(WorkerDiedError, match=r"input item 3 .*SIGSEGV.*native code"):
        pmap(segfault, range(8), backend="processes", bar=False)


def test_os_exit_is_named_with_its_exit_code():
    with pytest.raises(WorkerDiedError, match=r"input item 2 .*exit code 3"):
        pmap(exit_three, range(8), backend="processes", bar=False)


def test_retries_are_configurable_and_bounded(tmp_path):
    backend = ProcessesBackend(2, retries=0)
    try:
        with pytest.raises(WorkerDiedError, match="died 1 times"):
            pmap(sigkill_once, range(10), (str(tmp_path),), backend=backend, bar=False)
    finally:
        backend.shutdown()


def test_a_parpool_task_that_keeps_killing_workers_is_named_by_its_handle():
    with ParPool(exit_three, backend="processes") as pool:
        pool["fine"] = 1
        pool["fatal"] = 2
        assert pool["fine"] == 1
        with pytest.raises(WorkerDiedError) as caught:
            pool["fatal"]
    message = str(caught.value)
    assert message.startswith("The worker running the task with handle 'fatal' died 2 times")
    assert "exit code 3" in message and "input item" not in message
    assert caught.value.__cause__ is None  # made in the caller: no worker traceback to repeat


def test_parpool_task_that_kills_fails_alone(tmp_path):
    with ParPool(sigkill_once, (str(tmp_path),), backend="processes") as pool:
        pool[5] = 5
        pool[6] = 6
        assert pool[5] == 50  # retried after the first death
        assert pool[6] == 60


def test_worker_output_is_shown_in_the_caller(tmp_path):
    script = tmp_path / "talk.py"
    script.write_text(textwrap.dedent("""
        import logging, sys
        from parfor import pmap
        from parfor_backends.processes import ProcessesBackend

        def talk(i):
            print(f"hello from item {i}")
            logging.warning("warning from item %d", i)
            return i

        if __name__ == "__main__":
            quiet = sys.argv[1] == "quiet"
            backend = ProcessesBackend(2, worker_output=not quiet)
            print(pmap(talk, range(4), backend=backend, bar=False))
    """))
    for mode in ("loud", "quiet"):
        result = subprocess.run([sys.executable, str(script), mode], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[-1] == "[0, 1, 2, 3]"
        hello = {f"hello from item {i}" for i in range(4)}
        warned = {f"WARNING:root:warning from item {i}" for i in range(4)}
        if mode == "loud":
            assert hello <= set(lines)
            assert warned <= set(result.stderr.splitlines())
        else:
            assert not hello & set(lines) and "warning from item" not in result.stderr


def says(i: int) -> int:
    print(f"item {i} says hello")
    return i


def test_a_worker_that_prints_is_not_stopped_by_a_bars_lock_held_for_ever(monkeypatch):
    # The reader of a worker's results waited for tqdm's lock to show its lines: one left held
    # (by a process forked while holding it, which ended) stopped its results, and the call
    # waited for ever. Here another thread holds it for as long as the call runs.
    from parfor_core._progress import tqdm_class

    monkeypatch.setattr(processes, "SHOW_LOCK_SECONDS", 0.2)
    lock = tqdm_class().get_lock()
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        assert pmap(says, range(6), backend=ProcessesBackend(2, worker_output=True),
                    bar=False) == list(range(6))
    finally:
        done.set()
        holder.join()


def sleepy(i: float) -> float:
    time.sleep(i)
    return i


@pytest.mark.parametrize("quick_tasks_first", [0, 20])
def test_progress_is_reported_during_a_long_task(quick_tasks_first):
    """Also after quick tasks, between which the worker's reporter is not woken."""
    backend = ProcessesBackend(1)
    reports: list[int] = []
    try:
        for _ in range(quick_tasks_first):
            backend.submit(Task(Call(sleepy), range(1), [0.0])).result(timeout=60)
        task = Task(Call(sleepy), range(10), [0.1] * 10, reports.append)
        result = backend.submit(task).result(timeout=60)
    finally:
        backend.shutdown()
    assert result.values == [0.1] * 10
    assert reports == sorted(reports) and any(0 < n < 10 for n in reports), reports


def test_warm_calls_start_no_thread(monkeypatch):
    """A thread per call (an idle timer, say) costs a short call a tenth of its time."""
    backend = ProcessesBackend(2)
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        if _from_parfor(sys._getframe(1)):  # not Ray's or Dask's background threads
            started.append(thread)
        start(thread)

    try:
        assert pmap(abs, range(-4, 4), backend=backend, bar=False) == [4, 3, 2, 1, 0, 1, 2, 3]
        monkeypatch.setattr(threading.Thread, "start", counted)
        for _ in range(10):
            assert pmap(abs, [-1, -2, -3, -4], backend=backend, bar=False) == [1, 2, 3, 4]
    finally:
        backend.shutdown()
    assert started == []


def _from_parfor(frame: FrameType | None) -> bool:
    """Whether parfor's code is on this stack."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(("parfor.", "parfor_")):
            return True
        frame = frame.f_back
    return False


def touch(path: str) -> str:
    Path(path).touch()
    return path


def test_a_cancelled_task_waiting_for_a_busy_worker_never_runs(tmp_path):
    """A task goes to a worker only once the worker is free: until then it can be cancelled
    (a task already in a busy worker's pipe could not be)."""
    backend = ProcessesBackend(1)
    marker = tmp_path / "ran"
    try:
        first = backend.submit(Task(Call(sleepy), range(1), [0.3]))
        second = backend.submit(Task(Call(touch), range(1), [str(marker)]))
        assert second.cancel()
        assert first.result(timeout=60).values == [0.3]
        assert pmap(abs, [-1], backend=backend, bar=False, serial=False) == [1]  # after it
    finally:
        backend.shutdown()
    assert not marker.exists()


def test_a_task_waits_for_the_first_free_worker(tmp_path):
    """Not queued behind a long task while another worker frees up."""
    backend = ProcessesBackend(2)
    try:
        futures = [backend.submit(Task(Call(sleepy_pid), range(1), [seconds]))
                   for seconds in (1.0, 0.05, 0.05)]
        (long, _), (short, _), (last, _) = (f.result(timeout=60).values[0] for f in futures)
    finally:
        backend.shutdown()
    assert last == short != long


def sleepy_pid(seconds: float) -> tuple[int, float]:
    time.sleep(seconds)
    return os.getpid(), seconds


def large_then_exit(i: int) -> object:
    if i == 1:
        os._exit(3)
    import numpy

    return numpy.full(1 << 17, 7.0)


def test_a_large_result_survives_its_worker_dying_on_the_next_task():
    """The worker lets go of a result's shared memory only once the caller has read it."""
    backend = ProcessesBackend(1, retries=0)
    try:
        first = backend.submit(Task(Call(large_then_exit), range(1), [0]))
        second = backend.submit(Task(Call(large_then_exit), range(1), [1]))
        assert first.result(timeout=60).values[0].sum() == 7.0 * (1 << 17)
        assert isinstance(second.result(timeout=60).failure.exception, WorkerDiedError)
    finally:
        backend.shutdown()


def test_an_idle_stop_that_comes_after_the_pool_was_armed_again_keeps_the_workers():
    backend = ProcessesBackend(1)
    try:
        assert pmap(abs, [-1, -2], backend=backend, bar=False, serial=False) == [1, 2]
        workers = list(backend._workers)
        assert backend._idle.armed  # idle anew, as after any call
        backend._stop_if_idle()  # a watch that fired for an older deadline
        assert backend._workers == workers
        backend._idle.disarm()
        backend._stop_if_idle()  # the deadline it fired for is the last one
        assert backend._workers == []
    finally:
        backend.shutdown()


def test_the_idle_timeout_can_be_changed_on_a_backend():
    backend = ProcessesBackend(1, idle_timeout=30)
    backend.idle_timeout = 0.3
    assert backend.idle_timeout == 0.3
    assert pmap(abs, [-1, -2], backend=backend, bar=False, serial=False) == [1, 2]
    worker = psutil.Process(backend._workers[0].pid)
    worker.wait(timeout=10)  # it exits, idle for 0.3 s
    backend.shutdown()


def test_idle_workers_exit_after_the_timeout():
    backend = ProcessesBackend(2, idle_timeout=2)  # ample time to look at them on a busy machine
    assert pmap(abs, range(-4, 4), backend=backend, bar=False, serial=False) == [
        4, 3, 2, 1, 0, 1, 2, 3]
    workers = [psutil.Process(worker.pid) for worker in backend._workers]
    assert workers and all(worker.ppid() == os.getpid() for worker in workers)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == []
    assert pmap(abs, [-1, -2], backend=backend, bar=False) == [1, 2]  # restarts on demand
    backend.shutdown()


def test_a_shutdown_waits_for_the_threads_that_read_the_workers(monkeypatch):
    # At exit, a reader thread still running while the interpreter was torn down could crash
    # it (a segmentation fault after a script's last line, seen once on free-threaded 3.13).
    backend = ProcessesBackend(2)
    assert pmap(abs, range(-4, 4), backend=backend, bar=False, serial=False) == [
        4, 3, 2, 1, 0, 1, 2, 3]
    readers = [worker._reader for worker in backend._workers]
    seen_dying = []

    def died_slowly(worker):  # what a reader does last, slowed down
        time.sleep(0.2)
        seen_dying.append(worker.pid)

    monkeypatch.setattr(backend, "_died", died_slowly)
    backend.shutdown()
    assert len(readers) == 2 and not any(reader.is_alive() for reader in readers)
    assert len(seen_dying) == 2


def test_prepared_workers_start_at_once_and_exit_if_no_task_comes():
    backend = ProcessesBackend(3, idle_timeout=0.5)
    backend.prepare(2)  # a call over 2 items needs no third worker
    pids = {worker.pid for worker in backend._workers}
    assert len(pids) == 2 and pids <= {child.pid for child in psutil.Process().children()}
    _, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids], timeout=10)
    assert alive == []
    assert pmap(abs, [-1, -2, -3], backend=backend, bar=False) == [1, 2, 3]
    backend.shutdown()


def test_a_task_taken_back_while_the_workers_start_never_runs_there(tmp_path):
    backend = ProcessesBackend(1)
    try:
        marker = tmp_path / "ran"
        taken = backend.submit(Task(Call(touch), range(1), [str(marker)]))
        assert backend.reclaim(taken)
        assert backend.submit(Task(Call(abs), range(1), [-3])).result(timeout=30).values == [3]
        # the worker is ready: what it was given is its own
        running = backend.submit(Task(Call(time.sleep), range(1), [0.5]))
        assert not backend.reclaim(running)
        assert running.result(timeout=30).values == [None]
        assert not marker.exists() and not taken.done()
    finally:
        backend.shutdown()


def test_a_task_whose_worker_died_is_never_given_back(monkeypatch):
    """Its items may kill whatever runs them: the caller, helping while the replacement
    starts, must not take it."""
    backend = ProcessesBackend(1, retries=1)
    try:
        assert backend.submit(Task(Call(abs), range(1), [-1])).result(timeout=30).values == [1]
        monkeypatch.setattr(processes, "WORKER_MAIN", "import time; time.sleep(60)")
        killer = backend.submit(Task(Call(exit_three), range(1), [2]))  # kills the ready worker
        deadline = time.monotonic() + 1.0  # meanwhile it waits for a replacement never ready
        while time.monotonic() < deadline:
            assert not backend.reclaim(killer)
            time.sleep(0.005)
        assert not killer.done()
    finally:
        backend.shutdown()


class _GoneBeforeItsSettings(subprocess.Popen):  # type: ignore[type-arg]
    """A process that has exited by the time its parent first writes to it (on a busy
    machine, a worker that fails at once can be gone that soon)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.wait(30)


@pytest.mark.parametrize("gone_before_its_settings", [False, True])
def test_workers_that_die_while_starting_fail_the_call_naming_why(monkeypatch,
                                                                  gone_before_its_settings):
    monkeypatch.setattr(processes, "WORKER_MAIN", "import os; os._exit(7)")
    if gone_before_its_settings:  # not the BrokenPipeError of writing to it
        monkeypatch.setattr(subprocess, "Popen", _GoneBeforeItsSettings)
    backend = ProcessesBackend(2, retries=1)
    try:
        with pytest.raises(WorkerDiedError, match="died 2 times in a row: exit code 7 while it "
                                                  "was starting, before it ran anything"):
            pmap(abs, range(4), backend=backend, bar=False)
    finally:
        backend.shutdown()
    assert not [child for child in psutil.Process().children()
                if "os._exit(7)" in " ".join(child.cmdline())]  # none started for ever


def mark_then_sleep(path: str) -> None:
    Path(path).touch()
    time.sleep(60)


def test_busy_workers_are_given_one_grace_period_together_when_the_pool_stops(monkeypatch,
                                                                               tmp_path):
    """Each finishes its item or is killed when the one period ends: not one period each, one
    after another (at exit, a program would wait for all of them in turn)."""
    monkeypatch.setattr(processes, "STOP_SECONDS", 1.0)
    backend = ProcessesBackend(4)
    futures = [backend.submit(Task(Call(mark_then_sleep), (i,), (str(tmp_path / str(i)),)))
               for i in range(4)]
    deadline = time.monotonic() + 30
    while len(os.listdir(tmp_path)) < 4:  # each worker runs its item
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    backend.shutdown()
    assert time.monotonic() - start < 2.5  # one period and its kills; one each would be 4 s
    assert all(future.done() for future in futures)


def test_a_new_worker_count_replaces_the_pool_and_stops_the_old_one():
    pmap(abs, range(20), backend="processes", bar=False, n_processes=3)
    before = {p.pid: p for p in psutil.Process().children()}
    pmap(abs, range(20), backend="processes", bar=False, n_processes=2)
    after = {p.pid for p in psutil.Process().children()}
    old = [p for pid, p in before.items() if pid not in after]
    _, alive = psutil.wait_procs(old, timeout=10)
    assert alive == []


@pytest.mark.parametrize("backend", ["processes", "loky"])
def test_a_program_that_left_a_gmap_of_long_items_exits_at_once(tmp_path, backend):
    """The items still running are not waited for at exit (loky's own exit handler did)."""
    script = tmp_path / "leaves.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from parfor import gmap

        def slow(i):
            time.sleep(0 if i == 0 else 60)
            return i

        if __name__ == "__main__":
            for result in gmap(slow, range(4), backend={backend!r}, bar=False):
                break
    """))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 20  # not the 60 s of the items left running


def assert_workers_end_with_their_killed_parent(script: Path, ready: str) -> None:
    """Run ``script`` until it prints ``ready``, SIGKILL it (no clean-up code runs), and check
    that its workers end. Children it forked (copies of it) are no workers; all are killed
    after the check, whatever it found."""
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               cwd=script.parent, text=True)
    descendants: list[psutil.Process] = []
    try:
        assert process.stdout.readline().strip() == ready
        parent = psutil.Process(process.pid)
        descendants = parent.children(recursive=True)
        workers = [each for each in descendants if each.cmdline() != parent.cmdline()]
        assert workers
        process.kill()
        process.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        for each in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.kill()


@pytest.mark.parametrize("backend", ["processes", "loky"])
def test_workers_still_starting_when_their_parent_is_killed_end_too(tmp_path, backend,
                                                                    monkeypatch):
    # Each worker's interpreter, as it starts, says so and then takes 1.5 s more: the parent
    # is killed once both have said so, before either has run a line of parfor's.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, time
        with open("/proc/self/cmdline", "rb") as file:
            command = file.read()
        if b"popen_loky" in command or b"_process_worker" in command:
            open(os.path.join({str(tmp_path)!r}, f"starting-{{os.getpid()}}"), "w").close()
            time.sleep(1.5)
    """))
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import glob, threading, time
        from parfor import pmap

        def say_when_both_start():
            while len(glob.glob("starting-*")) < 2:
                time.sleep(0.01)
            print("starting", flush=True)

        if __name__ == "__main__":
            threading.Thread(target=say_when_both_start, daemon=True).start()
            pmap(time.sleep, [0.2] * 100, backend={backend!r}, n_processes=2, bar=False)
    """))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    assert_workers_end_with_their_killed_parent(script, "starting")


def busy_workers(backend: ProcessesBackend, count: int) -> list[psutil.Process]:
    """Wait until ``count`` of the backend's workers run a task; those workers' processes."""
    deadline = time.monotonic() + 30
    while sum(w.job is not None for w in backend._workers) < count:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return [psutil.Process(w.pid) for w in backend._workers if w.job is not None]


@pytest.mark.parametrize("backend", ["processes", "loky"])
def test_workers_do_not_outlive_a_killed_parent(tmp_path, backend):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from parfor import pmap

        def started(n):
            if n == 1:
                print("started", flush=True)

        if __name__ == "__main__":
            pmap(time.sleep, [0.2] * 10_000, backend={backend!r}, bar=started)
    """))
    assert_workers_end_with_their_killed_parent(script, "started")


@pytest.mark.skipif(sys.platform != "linux", reason="SIGIO ends a process by default on Linux")
def test_workers_do_not_outlive_a_killed_parent_while_native_code_holds_their_gil(tmp_path):
    """No Python thread of the worker can run then: the kernel kills it (processes, Linux)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import ctypes, threading
        from parfor import pmap

        def stuck(n):
            print("started", flush=True)
            ctypes.PyDLL(None).sleep(60)  # a PyDLL call keeps the GIL

        if __name__ == "__main__":  # called from a thread: the workers' parent is not it
            thread = threading.Thread(target=pmap, args=(stuck, range(2)),
                                      kwargs={"backend": "processes", "bar": False})
            thread.start()
            thread.join()
    """))
    assert_workers_end_with_their_killed_parent(script, "started")


def test_workers_outlive_the_threads_that_started_them(tmp_path):
    """They die with their parent process, not with the thread that needed them: a caller's
    short-lived thread, or the reader thread of a worker that died, which starts its successor.
    (Linux's parent-death signal, say, would follow the thread.)"""
    backend = ProcessesBackend(1)
    try:
        thread = threading.Thread(target=pmap, args=(sigkill_once, range(8), (str(tmp_path),)),
                                  kwargs={"backend": backend, "bar": False})
        thread.start()
        thread.join()
        assert (tmp_path / "killed").exists()  # the worker died, and was replaced
        time.sleep(0.5)  # the threads that started the first worker and its successor ended
        (worker,) = backend._workers
        assert worker.process.poll() is None
        assert pmap(sigkill_once, range(8), (str(tmp_path),), backend=backend,
                    bar=False) == [i * 10 for i in range(8)]
        assert [w.pid for w in backend._workers] == [worker.pid]
    finally:
        backend.shutdown()


def test_long_items_left_running_by_a_closed_gmap_do_not_hold_up_the_next_call():
    backend = ProcessesBackend(2)
    try:
        results = gmap(long_unless_first, range(4), backend=backend, bar=False)
        assert next(results) == 0
        busy = busy_workers(backend, 2)  # each runs one of the 60 s items
        results.close()  # as a break, or a Ctrl-C, in the loop's body would
        start = time.monotonic()
        assert pmap(abs, range(-3, 3), backend=backend, bar=False) == [3, 2, 1, 0, 1, 2]
        assert time.monotonic() - start < 30  # not the 60 s the abandoned items take
        _, alive = psutil.wait_procs(busy, timeout=10)  # killed, not left to run on
        assert alive == []
    finally:
        backend.shutdown()


def test_quick_items_left_running_by_a_closed_gmap_finish_on_their_warm_workers(monkeypatch):
    monkeypatch.setattr(processes, "ABANDONED_SECONDS", 5.0)  # ample on a loaded machine
    backend = ProcessesBackend(2)
    try:
        results = gmap(time.sleep, [0] + [0.2] * 20, backend=backend, bar=False)
        next(results)
        busy_workers(backend, 1)
        workers = [w.pid for w in backend._workers]
        results.close()
        assert pmap(abs, range(-3, 3), backend=backend, bar=False) == [3, 2, 1, 0, 1, 2]
        assert [w.pid for w in backend._workers] == workers  # waited for, not started anew
    finally:
        backend.shutdown()


def test_a_running_parpool_task_whose_handle_is_deleted_does_not_hold_up_the_next():
    backend = ProcessesBackend(1)
    try:
        with ParPool(long_unless_first, backend=backend, bar=False) as pool:
            pool["long"] = 1
            (busy,) = busy_workers(backend, 1)
            del pool["long"]
            start = time.monotonic()
            pool["quick"] = 0
            assert pool["quick"] == 0
            assert time.monotonic() - start < 30
        _, alive = psutil.wait_procs([busy], timeout=10)
        assert alive == []
    finally:
        backend.shutdown()


def test_work_that_waited_before_the_cancel_is_not_held_up_either():
    backend = ProcessesBackend(1)
    try:
        with ParPool(long_unless_first, backend=backend, bar=False) as pool:
            pool["long"] = 1
            busy_workers(backend, 1)
            pool["quick"] = 0  # waits for the only worker
            time.sleep(0.5)
            start = time.monotonic()
            del pool["long"]
            assert pool["quick"] == 0
            assert time.monotonic() - start < 30
    finally:
        backend.shutdown()


def test_only_as_many_abandoned_workers_are_killed_as_the_waiting_work_needs():
    backend = ProcessesBackend(2)
    try:
        results = gmap(long_unless_first, range(4), backend=backend, bar=False)
        assert next(results) == 0
        busy = busy_workers(backend, 2)
        results.close()
        assert pmap(abs, [-1], backend=backend, bar=False) == [1]  # one task: one worker
        time.sleep(1)  # past the grace, should a look kill more
        assert sorted(process.is_running() for process in busy) == [False, True]
    finally:
        backend.shutdown()


def run_forking(script: Path) -> subprocess.CompletedProcess[str]:
    """Run a script that forks, in a process group of its own, killed whole if it hangs: a
    forked child that hangs is no child of the script's by then."""
    process = subprocess.Popen([sys.executable, str(script)], cwd=script.parent, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("backend", ["processes", "threads"])  # loky: see docs/reliability.md
def test_a_forked_child_of_a_process_with_a_warm_pool_can_call_too(tmp_path, backend):
    """The child's calls get backends of their own: those of the parent are its threads' and
    pipes', which the child has no working copy of (it hung, waiting for them)."""
    script = tmp_path / "fork.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from parfor import pmap

        if __name__ == "__main__":
            print("parent", pmap(abs, range(-4, 4), backend={backend!r}, bar=False), flush=True)
            child = os.fork()
            if child == 0:
                print("child", pmap(abs, range(-2, 2), backend={backend!r}, bar=False),
                      flush=True)
                os._exit(0)
            assert os.waitpid(child, 0)[1] == 0
            print("again", pmap(abs, range(-1, 1), backend={backend!r}, bar=False), flush=True)
    """))
    done = run_forking(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["parent [4, 3, 2, 1, 0, 1, 2, 3]", "child [2, 1, 0, 1]",
                                        "again [1, 0]"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_workers_do_not_outlive_a_killed_parent_that_forked(tmp_path):
    """The forked child closes its copies of the workers' lifelines: it does not keep them."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from parfor import pmap

        if __name__ == "__main__":
            pmap(abs, range(-4, 4), backend="processes", bar=False)
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            print("forked", flush=True)
            time.sleep(60)
    """))
    assert_workers_end_with_their_killed_parent(script, "forked")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("drawn", ["a parfor bar", "only a bar of ones own"])
def test_a_forked_child_draws_bars_though_a_parent_thread_held_their_lock(tmp_path, drawn):
    script = tmp_path / "fork.py"
    script.write_text(textwrap.dedent(f"""
        import io, os, threading
        from tqdm import tqdm
        from parfor import pmap
        from parfor_core._progress import tqdm_class

        if __name__ == "__main__":
            if {drawn == "a parfor bar"}:
                pmap(abs, range(-4, 4), backend="threads", file=io.StringIO())
                lock = tqdm_class().get_lock()
            else:
                tqdm(range(3), file=io.StringIO()).close()
                lock = tqdm.get_lock()
            held, done = threading.Event(), threading.Event()

            def drawing():  # as a reader thread showing a worker's output would
                with lock:
                    held.set()
                    done.wait()

            threading.Thread(target=drawing).start()
            held.wait()
            child = os.fork()
            if child == 0:
                out = io.StringIO()
                print("child", pmap(abs, range(-2, 2), backend="threads", file=out), flush=True)
                os._exit(0)
            done.set()
            assert os.waitpid(child, 0)[1] == 0
    """))
    done = run_forking(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child [2, 1, 0, 1]"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_a_worker_starts_does_not_keep_that_worker_alive(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, threading, time
        from parfor import pmap

        class SlowPopen(subprocess.Popen):  # the fork lands while the worker starts
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                time.sleep(1)

        if __name__ == "__main__":
            subprocess.Popen = SlowPopen
            threading.Thread(target=pmap, args=(time.sleep, [60] * 2),
                             kwargs={"backend": "processes", "bar": False}).start()
            time.sleep(0.5)
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            time.sleep(3)  # every worker started and running
            print("forked", flush=True)
            time.sleep(60)
    """))
    assert_workers_end_with_their_killed_parent(script, "forked")


def test_workers_talk_over_pipes_only():
    backend = ProcessesBackend(2)

    def listening() -> set:  # this process may hold other connections (cluster tests' clients)
        return {c.laddr for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}

    try:
        before = listening()
        assert pmap(abs, range(-3, 3), backend=backend, bar=False) == [3, 2, 1, 0, 1, 2]
        workers = [psutil.Process(worker.pid) for worker in backend._workers]
        assert workers
        for process in workers:
            assert process.net_connections(kind="inet") == []  # no socket, no listening port
        assert listening() == before
    finally:
        backend.shutdown()


def test_worker_output_works_as_files_do(tmp_path):
    # sys.stdout and sys.stderr in a worker had no buffer and no file descriptor: a subprocess
    # given them, faulthandler and bytes written to the buffer failed the item.
    script = tmp_path / "files.py"
    script.write_text(textwrap.dedent("""
        import faulthandler, subprocess, sys
        from parfor import pmap

        def write(i):
            sys.stdout.buffer.write(f"bytes from item {i} \u00e9\\n".encode())
            subprocess.run([sys.executable, "-c", f"print('a subprocess of item {i}')"],
                           stdout=sys.stdout, check=True)
            faulthandler.enable(sys.stderr)
            faulthandler.disable()
            return i

        if __name__ == "__main__":
            # One worker: two subprocesses writing at once could mix their lines.
            print(pmap(write, range(3), backend="processes", n_processes=1, bar=False))
    """))
    # -X faulthandler: a crash after the script's last line (seen once in CI, on free-threaded
    # 3.13, exit code -11 and nothing on stderr) then shows every thread's stack.
    result = subprocess.run([sys.executable, "-X", "faulthandler", str(script)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "[0, 1, 2]"
    assert {f"bytes from item {i} \u00e9" for i in range(3)} <= set(lines)
    assert {f"a subprocess of item {i}" for i in range(3)} <= set(lines)


def test_items_a_worker_cannot_load_fail_with_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "only_in_parent.py").write_text("class Shape:\n    side = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_in_parent

    item = only_in_parent.Shape()
    monkeypatch.undo()  # the module stays imported here, but new workers cannot find it
    backend = ProcessesBackend(2)
    try:
        with pytest.raises(Exception, match="items cannot be deserialized in worker process"):
            pmap(lambda shape: shape.side, [item, item], backend=backend, bar=False)
        assert pmap(abs, [-1, -2], backend=backend, bar=False) == [1, 2]  # no worker died
    finally:
        backend.shutdown()


def _refuse_to_load(caller: int, error: type[BaseException]) -> str:
    if os.getpid() == caller:
        raise error("this result cannot be read in the caller")
    return "read elsewhere"


class ReadableOnlyElsewhere:
    """A result that the worker sends well, and the caller cannot unpickle."""

    def __init__(self, caller: int, error: type[BaseException]) -> None:
        self.caller, self.error = caller, error

    def __reduce__(self) -> tuple[object, tuple[int, type[BaseException]]]:
        return _refuse_to_load, (self.caller, self.error)


def unreadable_first(i: int, caller: int, error: type[BaseException] = RuntimeError) -> object:
    return ReadableOnlyElsewhere(caller, error) if i == 0 else i


def test_a_result_the_caller_cannot_read_fails_its_task_and_the_others_still_run():
    """The worker that sent it goes on with the next task (it once sat idle, and a one-worker
    pool stalled)."""
    with ParPool(unreadable_first, (os.getpid(),), backend="processes", n_processes=1,
                 bar=False) as pool:
        for i in range(4):
            pool[i] = i
        with pytest.raises(WorkerError, match="RuntimeError: this result cannot be read in the"):
            pool[0]
        assert [pool[i] for i in range(1, 4)] == [1, 2, 3]


def test_a_result_whose_loading_raises_system_exit_ends_the_call_with_it():
    # Read in a reader thread, where the SystemExit once ended the thread: the call hung.
    with pytest.raises(SystemExit, match="cannot be read in the caller"):
        pmap(unreadable_first, range(4), (os.getpid(), SystemExit), backend="processes",
             bar=False)
    assert pmap(abs, [-1, -2], backend="processes", bar=False) == [1, 2]


def chatty(i: int) -> int:
    print(f"item {i} speaks")
    return i


class _BrokenStream(io.StringIO):
    """The caller's stdout once its reader went away (``python script.py | head -1``), or
    worse: its write raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


def print_later(i: int) -> int:
    threading.Timer(0.2, print, (f"late words of item {i}",)).start()
    return i


def test_output_that_cannot_be_shown_while_no_job_runs_fails_no_later_job(monkeypatch):
    # A task's thread that printed after the task ended: the next job failed for it.
    backend = ProcessesBackend(1)
    try:
        monkeypatch.setattr(sys, "stdout", _BrokenStream(BrokenPipeError(32, "Broken pipe")))
        assert pmap(print_later, [1], backend=backend, bar=False) == [1]
        time.sleep(0.6)  # printed, and not shown, while the worker had no job
        assert pmap(abs, [-1, -2], backend=backend, bar=False) == [1, 2]
    finally:
        backend.shutdown()


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), SystemExit("gone")])
def test_worker_output_the_caller_cannot_show_fails_the_call_instead_of_hanging(monkeypatch,
                                                                                 error):
    backend = ProcessesBackend(2)
    try:
        monkeypatch.setattr(sys, "stdout", _BrokenStream(error))
        with pytest.raises(BaseException) as caught:
            pmap(chatty, range(4), backend=backend, bar=False)
        monkeypatch.undo()
        raised = caught.value.__cause__ if isinstance(error, Exception) else caught.value
        if isinstance(error, Exception):  # a job's failure outside its function
            assert isinstance(caught.value, WorkerError)
        assert raised is error
        assert any("worker process" in note for note in error.__notes__)
        assert pmap(abs, [-1, -2], backend=backend, bar=False) == [1, 2]
    finally:
        backend.shutdown()


def fork_and_wait(i: int, child_does: str) -> tuple[int, str, int]:
    """Forks; the fork prints, then exits or returns; the worker waits for it."""
    pid = os.fork()
    if pid == 0:  # the fork: what it returns or raises must never reach the caller
        print(f"the fork of item {i} speaks")
        if child_does == "exit":
            sys.exit(5)
        return (i, "from the fork", 0)
    _, status = os.waitpid(pid, 0)
    return (i, "from the worker", os.waitstatus_to_exitcode(status))


def _nested_error_is_named() -> bool:
    try:
        pmap(int, ["1", "x"], bar=False)  # nested: serial, here
    except ValueError as error:
        return any("raised by item 1" in note for note in error.__notes__)
    return False


def fork_and_call(i: int) -> int:
    """The fork makes a nested call, which behaves there as anywhere: its error names the
    item; the fork tells the worker by its exit code."""
    pid = os.fork()
    if pid == 0:
        sys.exit(0 if _nested_error_is_named() else 7)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_calls_in_a_process_that_a_task_forks_work_as_anywhere(process_backend):
    assert pmap(fork_and_call, range(2), backend=process_backend, n_processes=1,
                bar=False) == [0, 0]


@pytest.mark.parametrize("child_does", ["exit", "return"])
def test_a_process_that_a_task_forks_ends_on_its_own_and_sends_nothing(process_backend,
                                                                        child_does):
    # The fork once went on as the worker: its sys.exit failed the next call, and its results
    # answered for the worker's (on loky, in that call; on processes, in later calls too).
    code = 5 if child_does == "exit" else 0
    assert pmap(fork_and_wait, range(3), (child_does,), backend=process_backend,
                n_processes=1, bar=False) == [(i, "from the worker", code) for i in range(3)]
    for _ in range(3):
        assert pmap(abs, range(-6, 0), backend=process_backend, n_processes=1,
                    bar=False) == [6, 5, 4, 3, 2, 1]


def test_a_worker_that_cannot_be_replaced_fails_the_waiting_work_instead_of_hanging(
        monkeypatch):
    # Starting its successor (from the reader thread of the one that died) once raised there,
    # and the call waited for ever: as after the kernel killed a worker for want of memory.
    backend = ProcessesBackend(1)
    start = processes._Worker.start.__func__
    starts = []

    def only_once(cls, pool):
        starts.append(pool)
        if len(starts) > 1:
            raise OSError(12, "Cannot allocate memory")
        return start(cls, pool)

    monkeypatch.setattr(processes._Worker, "start", classmethod(only_once))
    try:
        with pytest.raises(WorkerError, match="OSError: .Errno 12. Cannot allocate memory"
                           ) as caught:
            pmap(exit_three, range(2, 4), backend=backend, bar=False)
        assert "parfor: raised while starting a worker process" in caught.value.__cause__.__notes__
    finally:
        backend.shutdown()
