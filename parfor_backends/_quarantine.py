"""Which jobs a cluster backend may send, after a worker death: an item that died runs again
with nothing else of the backend's out, one such item at a time, and other jobs wait meanwhile.

A Dask worker holds more tasks than it runs, and they all die with it: an item that only waited
beside the one that kills counts a death too. Run again beside the killer, it could reach its
last death first and be blamed in its place. Run alone, a death is its own.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future

from parfor_backends._retrying import Job
from parfor_core import Result


class Quarantine:
    """The jobs that wait, and the one suspect out alone; used under its backend's lock."""

    def __init__(self) -> None:
        self._suspects: deque[Job] = deque()  # lone items that died: one at a time, alone
        self._held: list[Job] = []  # other jobs, while suspects wait or run
        self._alone: Future[Result] | None = None  # the suspect out now

    def admit(self, job: Job) -> bool:
        """True when ``job`` may be sent now; else it waits here."""
        self._prune()
        if job.deaths:
            self._suspects.append(job)
        elif self._suspects or self._alone is not None:
            self._held.append(job)
        else:
            return True
        return False

    def ready(self, busy: bool) -> list[Job]:
        """The jobs that may leave now, given whether anything of the backend's is out
        (``busy``): the next suspect once nothing is; every held job once no suspect is left."""
        self._prune()
        if self._alone is not None or (self._suspects and busy):
            return []
        if self._suspects:
            job = self._suspects.popleft()
            self._alone = job.future
            return [job]
        ready = [job for job in self._held if not job.future.done()]
        self._held.clear()
        return ready

    def ran_alone(self, future: Future[Result]) -> bool:
        """Whether the job of ``future`` is the suspect out alone: its death is its own."""
        return future is self._alone

    def forget(self, future: Future[Result]) -> None:
        """The job of ``future`` is no longer out."""
        if future is self._alone:
            self._alone = None

    def clear(self) -> list[Job]:
        """Empty the quarantine (the backend stops): the jobs that waited."""
        waiting = [*self._suspects, *self._held]
        self._suspects.clear()
        self._held.clear()
        self._alone = None
        return waiting

    def _prune(self) -> None:
        """Drop suspects that nobody waits for (their callers gave up, or an interrupt failed
        them): they would hold other jobs back for nothing."""
        if any(job.future.done() for job in self._suspects):
            self._suspects = deque(job for job in self._suspects if not job.future.done())
