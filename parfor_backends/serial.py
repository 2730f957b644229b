"""The serial backend: every item in the caller, one after another; the reference and debug aid."""

from __future__ import annotations

from concurrent.futures import Future

from parfor_core import Backend, Result, Task, hookimpl, run_task


class SerialBackend(Backend):
    """Runs each task at submit time, in the calling thread; errors keep their full traceback."""

    name = "serial"

    def submit(self, task: Task) -> Future[Result]:
        future: Future[Result] = Future()
        future.set_result(run_task(task))
        return future


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [SerialBackend]
