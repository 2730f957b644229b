"""The loky backend: loky's reusable pool of worker processes, fed with dill-serialized tasks."""

from __future__ import annotations

import importlib.util
from concurrent.futures import Future
from typing import Any

from parfor_core import (
    Backend,
    Result,
    Task,
    dump_task,
    execute_dumped,
    hookimpl,
    load_result,
    then,
)

#: Seconds an idle loky worker waits for work before it exits.
IDLE_TIMEOUT = 600


class LokyBackend(Backend):
    """Each task crosses to a loky worker as dill bytes; the call's function and arguments are
    serialized once per call and deserialized once per worker."""

    name = "loky"
    crosses_process = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("loky") is None:
            return "the loky package is not installed: pip install loky"
        return None

    @classmethod
    def auto_priority(cls) -> int | None:
        return 10

    def __init__(self, n_workers: int) -> None:
        super().__init__(n_workers)
        self._executor: Any = None

    def submit(self, task: Task) -> Future[Result]:
        from loky import get_reusable_executor

        payload = dump_task(task)
        # Cheap while the executor is alive; after a worker death or an interrupt it makes a
        # fresh one, so the next call works again.
        self._executor = get_reusable_executor(max_workers=self.n_workers, timeout=IDLE_TIMEOUT)
        return then(self._executor.submit(execute_dumped, payload), load_result)

    def interrupt(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, kill_workers=True)

    # No shutdown(): loky's executor is a process-wide singleton that resizes itself when asked
    # for another size, and loky stops its workers at interpreter exit.


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [LokyBackend]
