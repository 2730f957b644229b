"""The loky backend: a pool of loky worker processes, fed with dill-serialized tasks."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import Future
from typing import Any

from parfor_core import (
    SETTINGS,
    Backend,
    Result,
    Task,
    dump_task,
    execute_dumped,
    hookimpl,
    load_result,
    mark_worker_process,
    release_shared,
    then,
)

#: Seconds an idle loky worker waits for work before it exits (the configured default).
IDLE_TIMEOUT = SETTINGS["idle_timeout"].default


class LokyBackend(Backend):
    """Each task crosses to a loky worker as dill bytes; the call's function and arguments are
    serialized once per call and deserialized once per worker.

    Each instance owns its own loky executor (not loky's process-wide reusable one), so a call
    with another worker count, an interrupt, or joblib in the same process, leave the other
    pools alone.
    """

    name = "loky"
    crosses_process = True

    def __init__(self, n_workers: int, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        super().__init__(n_workers)
        self.idle_timeout = idle_timeout
        self._executor: Any = None
        self._lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("loky") is None:
            return "the loky package is not installed: pip install loky"
        return None

    @classmethod
    def auto_priority(cls) -> int | None:
        return 10

    def submit(self, task: Task) -> Future[Result]:
        payload = dump_task(task)
        executor = self._pool()
        try:
            future = executor.submit(execute_dumped, payload)
        except RuntimeError:  # broken by a dead worker, or shut down by an interrupt
            future = self._pool(replacing=executor).submit(execute_dumped, payload)
        future.add_done_callback(lambda _: release_shared(payload))  # its items are done with
        return then(future, load_result)

    def _pool(self, replacing: Any = None) -> Any:
        with self._lock:
            if self._executor is None or self._executor is replacing:
                from loky import ProcessPoolExecutor

                self._executor = ProcessPoolExecutor(self.n_workers, timeout=self.idle_timeout,
                                                     initializer=mark_worker_process)
            return self._executor

    def _stop(self, wait: bool) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, kill_workers=True)

    def interrupt(self) -> None:
        self._stop(wait=False)

    def shutdown(self) -> None:
        self._stop(wait=True)


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [LokyBackend]
