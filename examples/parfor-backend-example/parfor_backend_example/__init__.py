"""An example parfor backend: tasks run on the standard library's process pool.

It shows the three parts every backend plugin has: a Backend subclass, the
``parfor_register_backends`` hook that returns it, and the ``parfor`` entry point (in
pyproject.toml) that makes parfor find this module.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from parfor_core import (
    Backend,
    Result,
    Task,
    dump_task,
    execute_dumped,
    hookimpl,
    load_result,
    mark_worker_process,
    then,
)


class StdlibProcessesBackend(Backend):
    """Runs each task in a ``concurrent.futures.ProcessPoolExecutor`` worker.

    Options come from parfor's configuration: ``[tool.parfor.backends.example]`` in a
    pyproject.toml, or ``parfor.config(backends={"example": {...}})``.
    """

    name = "example"
    crosses_process = True  # items, function and results are serialized

    def __init__(self, n_workers: int, *, start_method: str = "spawn") -> None:
        super().__init__(n_workers)
        self.start_method = start_method
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        # mark_worker_process in each worker: nested calls made there then run serially.
        return ProcessPoolExecutor(self.n_workers,
                                   mp_context=multiprocessing.get_context(self.start_method),
                                   initializer=mark_worker_process)

    @classmethod
    def auto_priority(cls) -> int | None:
        # Only when named, unless the user asks otherwise: a plugin should not take over
        # every plain pmap just by being installed.
        priority = os.environ.get("PARFOR_EXAMPLE_PRIORITY")
        return int(priority) if priority else None

    def submit(self, task: Task) -> Future[Result]:
        # dump_task raises SerializationError, naming what cannot be sent, in the caller.
        payload = dump_task(task)
        try:
            future = self._executor.submit(execute_dumped, payload)
        except BrokenProcessPool:  # a worker died in an earlier call: start a fresh pool
            self._executor = self._new_executor()
            future = self._executor.submit(execute_dumped, payload)
        return then(future, load_result)

    def interrupt(self) -> None:
        # Ctrl-C: drop what has not started and give the next call a fresh pool. (Tasks
        # already running finish in the old one: the standard library cannot stop them.)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [StdlibProcessesBackend]
