"""Backend discovery and choice: plugins registered at run time and through entry points."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from parfor import BackendUnavailableError, PluginError, UnknownBackendError, pmap
from parfor_core import Backend, Result, Task, gil_enabled, hookimpl, registry, run_task
from parfor_core._config import current
from parfor_core._registry import PluginWarning, Registry


class RecordingBackend(Backend):
    """Runs each task on a new thread and remembers the tasks it got."""

    name = "recording"
    seen: list[Task] = []

    def submit(self, task: Task) -> Future[Result]:
        future: Future[Result] = Future()
        self.seen.append(task)
        threading.Thread(target=lambda: future.set_result(run_task(task))).start()
        return future


class EagerBackend(RecordingBackend):
    @classmethod
    def auto_priority(cls) -> int | None:
        return 1000


class MissingBackend(RecordingBackend):
    name = "missing"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "it needs the imaginary package: pip install imaginary"


class Plugin:
    def __init__(self, *classes: type[Backend]) -> None:
        self.classes = list(classes)

    @hookimpl
    def parfor_register_backends(self) -> list[type[Backend]]:
        return self.classes


@pytest.fixture
def register():
    """Register plugins for one test; unregister them after it, whatever happens."""
    plugins = []

    def add(*classes: type[Backend]) -> None:
        plugin = Plugin(*classes)
        registry.plugin_manager.register(plugin)
        plugins.append(plugin)

    yield add
    for plugin in plugins:
        registry.plugin_manager.unregister(plugin)
    registry.shutdown()


def test_builtin_backends_come_from_our_entry_points():
    infos = {info.name: info for info in registry.infos()}
    assert {"serial", "threads", "loky"} <= set(infos)
    assert all(infos[name].source.startswith("parfor ") for name in ("serial", "threads", "loky"))


def test_a_plugin_backend_is_selectable_by_name(register):
    RecordingBackend.seen = []
    register(RecordingBackend)
    assert "recording" in registry.names()
    assert pmap(abs, range(-5, 5), backend="recording", bar=False) == [5, 4, 3, 2, 1, 0, 1, 2,
                                                                        3, 4]
    assert sum(len(task.items) for task in RecordingBackend.seen) == 10
    assert "registered at run time" in registry.source(RecordingBackend)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownBackendError) as caught:
        pmap(abs, range(3), backend="lokky")
    assert caught.value.name == "lokky"
    assert {"loky", "serial", "threads"} <= set(caught.value.known)
    assert "No backend named 'lokky' (from backend=). Known: " in str(caught.value)


def test_unavailable_backend_says_why(register):
    register(MissingBackend)
    with pytest.raises(BackendUnavailableError, match="pip install imaginary"):
        pmap(abs, range(3), backend="missing")
    info = next(i for i in registry.infos() if i.name == "missing")
    assert "imaginary" in info.unavailable_reason


def test_two_backends_with_one_name_is_an_error_naming_both(register):
    class Impostor(RecordingBackend):
        pass

    register(RecordingBackend)
    register(Impostor)
    with pytest.raises(PluginError, match="'recording'") as caught:
        pmap(abs, range(3), backend="recording")
    assert "RecordingBackend" in str(caught.value) and "Impostor" in str(caught.value)
    assert pmap(abs, range(3), backend="serial", bar=False) == [0, 1, 2]  # others still work


def test_automatic_choice_follows_the_gil():
    expected = "processes" if gil_enabled() else "threads"
    choice = registry.auto()
    assert choice.name == expected
    assert ("enabled" if gil_enabled() else "disabled") in choice.reason


def test_automatic_choice_takes_the_highest_priority(register):
    register(EagerBackend)
    assert registry.auto().name == "recording"
    EagerBackend.seen = []
    pmap(abs, range(10), bar=False)
    assert EagerBackend.seen


class SlowToStartBackend(RecordingBackend):
    """Made only once the test says so, as a cluster backend is made once it has connected."""

    name = "slow-to-start"
    made = 0
    entered = threading.Event()
    go_on = threading.Event()

    def __init__(self, n_workers: int | None = None) -> None:
        type(self).made += 1
        self.entered.set()
        assert self.go_on.wait(30)
        super().__init__(n_workers)


def test_a_backend_being_made_holds_up_no_call_on_another_and_is_made_once(register):
    register(SlowToStartBackend)
    with ThreadPoolExecutor(3) as threads:
        try:
            first = threads.submit(pmap, abs, [-1, -2], backend="slow-to-start", bar=False)
            assert SlowToStartBackend.entered.wait(10)
            second = threads.submit(pmap, abs, [-3, -4], backend="slow-to-start", bar=False)
            other = threads.submit(pmap, abs, [-5, -6], backend="threads", bar=False)
            assert other.result(timeout=10) == [5, 6]  # not held up by the connect
            _wait_until_threads_are_in(Registry._acquire, 2)  # the second call waits there
            assert not first.done() and not second.done()
        finally:
            SlowToStartBackend.go_on.set()
        assert first.result(timeout=10) == [1, 2] and second.result(timeout=10) == [3, 4]
    assert SlowToStartBackend.made == 1  # the second call waited for the first's instance


def _wait_until_threads_are_in(function: Callable[..., Any], count: int) -> None:
    """Until ``count`` threads are running ``function`` (or something it called)."""
    deadline = time.monotonic() + 10
    while sum(any(frame.f_code is function.__code__ for frame, _ in traceback.walk_stack(top))
              for top in sys._current_frames().values()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} threads in {function.__name__}"
        time.sleep(0.01)


class FailsToStartOnceBackend(RecordingBackend):
    """Its first making fails, as a connect to a cluster that is not up yet does."""

    name = "fails-to-start-once"
    failed = False

    def __init__(self, n_workers: int | None = None) -> None:
        if not FailsToStartOnceBackend.failed:
            FailsToStartOnceBackend.failed = True
            raise ConnectionError("the cluster is not up yet")
        super().__init__(n_workers)


def test_a_backend_that_failed_to_start_is_made_again_by_the_next_call(register):
    register(FailsToStartOnceBackend)
    with pytest.raises(ConnectionError, match="not up yet"):
        pmap(abs, [-1, -2], backend="fails-to-start-once", bar=False)
    assert pmap(abs, [-1, -2], backend="fails-to-start-once", bar=False) == [1, 2]


def where(i: int) -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def test_tiny_inputs_and_one_worker_run_in_the_caller():
    here = (os.getpid(), threading.get_ident())
    assert pmap(where, [0], bar=False) == [here]
    assert pmap(where, range(5), n_processes=1, bar=False) == [here] * 5
    assert pmap(where, range(5), serial=True, bar=False) == [here] * 5


def test_serial_false_parallelizes_even_one_item():
    assert pmap(where, [0], serial=False, bar=False) != [(os.getpid(), threading.get_ident())]


def test_a_broken_installed_plugin_warns_and_the_others_work(tmp_path, monkeypatch):
    # A real installed distribution (a .dist-info on sys.path) whose entry point fails.
    info = tmp_path / "broken_parfor_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-parfor-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[parfor]\nbroken = no_such_module_for_parfor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = Registry()
    with pytest.warns(PluginWarning, match="'broken'.*broken-parfor-plugin 0.1.*"
                                           "no_such_module_for_parfor"):
        names = fresh.names()
    assert {"loky", "serial", "threads"} <= set(names)
    assert "broken" not in names
    assert "no_such_module_for_parfor" not in sys.modules


class InProcessWireBackend(Backend):
    """Runs the process protocol (dump, execute, load) on threads of this very process."""

    name = "in-process-wire"
    crosses_process = True

    def __init__(self, n_workers: int) -> None:
        super().__init__(n_workers)
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(n_workers)

    def submit(self, task: Task) -> Future[Result]:
        from parfor_core import dump_task, execute_dumped, load_result, then

        return then(self._executor.submit(execute_dumped, dump_task(task)), load_result)


def test_running_the_wire_protocol_in_process_does_not_make_the_caller_a_worker():
    from parfor_core import inside_worker

    backend = InProcessWireBackend(2)
    assert pmap(lambda x: -x, range(5), backend=backend, bar=False) == [0, -1, -2, -3, -4]
    assert not inside_worker()
    settings = current(n_processes=2)
    assert registry.select(None, serial=None, total=100, settings=settings).name == (
        registry.auto().name)


class BrokenPlugin:
    @hookimpl
    def parfor_register_backends(self) -> list[type[Backend]]:
        raise RuntimeError("the plugin's own bug")


class ConfusedPlugin:
    @hookimpl
    def parfor_register_backends(self) -> list[object]:
        return ["not a class"]


@pytest.mark.parametrize("plugin", [BrokenPlugin(), ConfusedPlugin()])
def test_a_plugin_that_fails_to_register_warns_and_the_others_work(plugin):
    registry.plugin_manager.register(plugin, name="faulty")
    try:
        with pytest.warns(PluginWarning, match="skipping the backend plugin 'faulty'"):
            assert pmap(abs, [-1, -2], backend="threads", bar=False) == [1, 2]
    finally:
        registry.plugin_manager.unregister(plugin)
