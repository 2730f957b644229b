"""The threads backend: a reusable thread pool in this process, nothing serialized.

Chosen automatically where the GIL is disabled (free-threaded Python); elsewhere it suits
I/O-bound work, and is used when named.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from contextvars import copy_context
from typing import TYPE_CHECKING

from parfor_core import (
    Backend,
    InterpreterExitingError,
    Result,
    Task,
    gil_enabled,
    hookimpl,
    interpreter_exiting,
    run_task,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor


class ThreadsBackend(Backend):
    """Tasks run on a pool of ``n_workers`` threads, started on first need and reused; one pool
    for each thread that calls."""

    name = "threads"

    def __init__(self, n_workers: int) -> None:
        if interpreter_exiting():  # importing concurrent.futures.thread then fails obscurely
            raise InterpreterExitingError(self.name)
        super().__init__(n_workers)
        self._lock = threading.Lock()
        self._executors: dict[threading.Thread, ThreadPoolExecutor] = {}

    @classmethod
    def auto_priority(cls) -> int | None:
        return None if gil_enabled() else 100

    def submit(self, task: Task) -> Future[Result]:
        """Each task runs in a copy of the submitting thread's context, as the items that the
        caller runs itself do: ``decimal.localcontext()``, other context variables."""
        if interpreter_exiting():
            raise InterpreterExitingError(self.name)
        return self._executor().submit(copy_context().run, self._run, task)

    def _executor(self) -> ThreadPoolExecutor:
        """The pool of the thread that submits: the calls of two threads never wait on each
        other's tasks. (A pmap in a thread that a task started waited for ever, behind the
        tasks that waited for it.) The pools of threads that have ended go."""
        from concurrent.futures import ThreadPoolExecutor  # not at import: only when used

        caller = threading.current_thread()
        with self._lock:
            executor = self._executors.get(caller)
            if executor is None:
                for ended in [thread for thread in self._executors if not thread.is_alive()]:
                    self._executors.pop(ended).shutdown(wait=False)
                executor = self._executors[caller] = ThreadPoolExecutor(
                    self.n_workers, thread_name_prefix="parfor-worker")
        return executor

    @staticmethod
    def _run(task: Task) -> Result:
        """Run the task, unless the interpreter is exiting: then a task still waiting fails at
        once rather than run, as the executor's exit handler would have every waiting task run
        first. (Cancelling them would leave a thread that waits for them, one the interpreter
        joins after, waiting for ever.)"""
        if interpreter_exiting():
            raise RuntimeError("the interpreter is exiting, and this task had not started")
        return run_task(task)

    def shutdown(self) -> None:
        with self._lock:
            executors, self._executors = list(self._executors.values()), {}
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [ThreadsBackend]
