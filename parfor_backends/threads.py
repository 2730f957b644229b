"""The threads backend: a reusable thread pool in this process, nothing serialized.

Chosen automatically where the GIL is disabled (free-threaded Python); elsewhere it suits
I/O-bound work, and is used when named.
"""

from __future__ import annotations

from concurrent.futures import Future

from parfor_core import Backend, Result, Task, gil_enabled, hookimpl, run_task, stop_before_exit


class ThreadsBackend(Backend):
    """Tasks run on a pool of ``n_workers`` threads, started on first need and reused."""

    name = "threads"

    def __init__(self, n_workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor  # not at import: only when used

        super().__init__(n_workers)
        self._executor = ThreadPoolExecutor(n_workers, thread_name_prefix="parfor-worker")
        self._exiting = False
        stop_before_exit(self, ThreadsBackend._exit)

    @classmethod
    def auto_priority(cls) -> int | None:
        return None if gil_enabled() else 100

    def submit(self, task: Task) -> Future[Result]:
        return self._executor.submit(self._run, task)

    def _run(self, task: Task) -> Result:
        if self._exiting:
            raise RuntimeError("the interpreter is exiting, and this task had not started")
        return run_task(task)

    def _exit(self) -> None:
        """At exit, the tasks still waiting fail at once rather than run: the executor's exit
        handler runs them all first. (Cancelling them would leave a thread that waits for them,
        one the interpreter joins after, waiting for ever.)"""
        self._exiting = True

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [ThreadsBackend]
