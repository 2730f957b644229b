"""The loky backend: a pool of loky worker processes, fed with dill-serialized tasks."""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

from parfor_core import (
    SETTINGS,
    Backend,
    InterpreterExitingError,
    Result,
    Task,
    dump_task,
    execute_dumped,
    hookimpl,
    interpreter_exiting,
    load_result,
    mark_worker_process,
    release_shared,
    stop_before_exit,
    then,
)

#: Seconds an idle loky worker waits for work before it exits (the configured default).
IDLE_TIMEOUT = SETTINGS["idle_timeout"].default
#: The longest wait a loky worker can be given (its select() counts in milliseconds, in a C
#: int): a longer idle timeout (endless, say) is none at all.
LONGEST_WAIT = (2**31 - 1) / 1000


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
        # Reentrant: a garbage collection while it is held may cancel a forgotten gmap's task.
        self._lock = threading.RLock()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("loky") is None:
            return "the loky package is not installed: pip install loky"
        return None

    @classmethod
    def auto_priority(cls) -> int | None:
        return 10

    def submit(self, task: Task) -> Future[Result]:
        if interpreter_exiting():  # loky's executors have stopped, or cannot be imported
            raise InterpreterExitingError(self.name)
        payload = dump_task(task)
        executor, future = self._submit(payload)
        stop_before_exit(self, LokyBackend.interrupt)  # loky's handler is registered by now
        future.add_done_callback(lambda _: release_shared(payload))  # its items are done with
        return then(future, load_result, functools.partial(self._cancel, executor))

    def _submit(self, payload: bytes) -> tuple[Any, Future[bytes]]:
        """The pool that took ``payload``, and its future: a new pool where the last one is
        broken (by a dead worker) or shut down (by an interrupt).

        Where the interpreter began to exit meanwhile, loky cannot be imported, or it started
        a pool and then failed to register its exit handler ("can't register atexit after
        shutdown"): that pool's thread would keep the exit waiting for ever, so it is stopped,
        and the task refused."""
        try:
            executor = self._pool()
            try:
                return executor, executor.submit(execute_dumped, payload)
            except RuntimeError:
                if interpreter_exiting():
                    raise
                executor = self._pool(replacing=executor)
                return executor, executor.submit(execute_dumped, payload)
        except RuntimeError:
            if interpreter_exiting():
                self._stop(wait=False)
                raise InterpreterExitingError(self.name) from None
            raise

    def _cancel(self, executor: Any, future: Future[Result]) -> None:
        """Cancel a task, unless its executor is stopping: loky's manager thread fails every
        waiting task at a stop with kill_workers, and one cancelled meanwhile crashes it."""
        with self._lock:
            if self._executor is executor:
                future.cancel()

    def _pool(self, replacing: Any = None) -> Any:
        with self._lock:
            if self._executor is None or self._executor is replacing:
                from loky import ProcessPoolExecutor

                timeout = self.idle_timeout if self.idle_timeout <= LONGEST_WAIT else None
                self._executor = ProcessPoolExecutor(self.n_workers, timeout=timeout,
                                                     initializer=_start_worker,
                                                     initargs=(os.getpid(),))
            return self._executor

    def _stop(self, wait: bool) -> None:
        with self._lock:  # from here on its tasks are not cancelled (see _cancel)
            executor, self._executor = self._executor, None
        if executor is not None:
            _renew_cancelled(executor)
            executor.shutdown(wait=wait, kill_workers=True)

    def interrupt(self) -> None:
        self._stop(wait=False)

    def shutdown(self) -> None:
        self._stop(wait=True)


def _renew_cancelled(executor: Any) -> None:
    """Give each cancelled task that still waits in a stopping loky executor a new future:
    loky fails every waiting task's future at a stop with kill_workers, and a cancelled one
    raises there, which crashes its manager thread with a logged traceback (loky 3.7)."""
    for work_item in list(getattr(executor, "_pending_work_items", {}).values()):
        if work_item.future.cancelled():
            work_item.future = Future()


#: Seconds between a loky worker's looks at whether its parent is still there.
PARENT_CHECK_SECONDS = 0.5


def _start_worker(parent: int) -> None:
    """In each loky worker, first: mark it as a worker, and end it when its parent is gone
    (loky's workers outlived a parent killed with SIGKILL by minutes). The parent names
    itself: a worker still starting when it died would otherwise take its new parent for it."""
    mark_worker_process(environment_is_callers=True)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name="parfor-parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # a dead parent's children pass to another process
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [LokyBackend]
