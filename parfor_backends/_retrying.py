"""Retrying the items of a task whose worker died, one at a time, to find the item that kills.

Shared by the backends that see their workers die (processes, dask, ray): the first death of a
worker running a chunk reruns the chunk's items alone; an item whose worker dies more than
``retries`` times in a row fails with a WorkerDiedError naming it, keeping the values before it.
"""

from __future__ import annotations

from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from parfor_core import Failure, Result, Task, WorkerDiedError, dump_items, release_shared

#: How often a task whose data was lost with a worker (not killed by its items) runs again.
LOST_DATA_RETRIES = 3


class Job:
    """A task on its way through a backend; after a worker death, its items one at a time."""

    __slots__ = ("task", "future", "local", "items", "done", "rest", "elapsed", "deaths",
                 "losses", "started")

    def __init__(self, task: Task, future: Future[Result], local: bool,
                 done: list[Any] | None = None, rest: list[tuple[int, Any]] | None = None,
                 elapsed: float = 0.0) -> None:
        self.task = task
        self.future = future
        self.local = local  # workers on this machine: large items go through shared memory
        self.items = dump_items(task, local)  # kept, with that memory, until the job is done
        self.done = done or []  # values of items finished before a split
        self.rest = rest or []  # items still to run, one by one
        self.elapsed = elapsed
        self.deaths = 0
        self.losses = 0
        self.started = False  # a worker has had it, or the job it was split from (kept
        # by the backends that give tasks back: see ProcessesBackend.reclaim)

    @classmethod
    def of(cls, task: Task, local: bool = False) -> Job:
        return cls(task, Future(), local)

    def finish(self, result: Result) -> Job | Result:
        """The Result for the future, or the job for the next lone item."""
        release_shared(self.items)  # its items are done with
        values = self.done + result.values
        elapsed = self.elapsed + result.elapsed
        if result.failure is None and self.rest:
            return self._next(values, elapsed)
        return Result(values, elapsed, result.failure)

    def after_death(self, worker: str, how: str, retries: int, backend: str,
                    blame: bool = True, alone: bool = True) -> Job | Result:
        """The job to run after ``worker`` died (``how`` says how, and what that suggests):
        its items alone, or this item again; or, when the item has killed workers too often,
        the Result that fails it.

        Without ``alone`` the item ran beside others that the death took too (on a cluster):
        it runs again, however often it died, so that the death that fails it is its own.

        Without ``blame`` the task's data was lost with a worker that something else ended
        (a cluster's scheduler says so): the task runs again whole, up to `LOST_DATA_RETRIES`
        times, and its items count no death.
        """
        task = self.task
        if not blame:
            self.losses += 1
            if self.losses <= LOST_DATA_RETRIES:
                return self
            subject = f"input items {task.indices[0]} to {task.indices[-1]}"
            return self._failed(worker, WorkerDiedError(
                f"The data of {subject} was lost with a worker {self.losses} times in a row: "
                f"{how}", backend=backend, indices=list(task.indices), subject=subject,
            ))
        if len(task.items) > 1:  # isolate the item that kills: one at a time from now on
            release_shared(self.items)
            self.rest = list(zip(task.indices, task.items, strict=True)) + self.rest
            return self._next(self.done, self.elapsed)
        self.deaths += 1
        if self.deaths <= retries or not alone:
            return self
        index = task.indices[0]
        subject = f"input item {index}"
        return self._failed(worker, WorkerDiedError(
            f"The worker running {subject} died {self.deaths} times in a row: {how}",
            backend=backend, indices=[index], subject=subject,
        ))

    def _failed(self, worker: str, error: WorkerDiedError) -> Result:
        """The Result that fails this job's first item with ``error``, seen in ``worker``,
        keeping the values before it."""
        release_shared(self.items)
        failure = Failure.about(self.task.indices[0], self.task.items[0], error, worker)
        return Result(self.done, self.elapsed, failure)

    def _next(self, values: list[Any], elapsed: float) -> Job:
        (index, item), *rest = self.rest
        task = Task(self.task.call, (index,), (item,))
        job = Job(task, self.future, self.local, values, rest, elapsed)
        job.started = True  # split after a worker died with the whole
        return job


def abandon(future: Future[Result], backend: str, hard: bool) -> None:
    """Fail a task that its backend stops (``hard``: Ctrl-C; else shut down). An error rather
    than a cancel: a cancel wakes no one waiting in ``concurrent.futures.wait`` (a call of
    another thread, a ParPool), who would then wait for ever."""
    why = "interrupted (Ctrl-C)" if hard else "shut down"
    settle(future, CancelledError(f"the {backend} backend was {why} before this task finished"))


def settle(future: Future[Result], outcome: Result | BaseException) -> None:
    """Hand the Result (or the error) to the caller, unless the caller has cancelled the future
    meanwhile: nobody waits for it then."""
    if future.cancelled():
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # cancelled meanwhile
        pass
