"""What the cluster backends (dask, ray) share: each call shipped to the cluster once, chunks run
as remote tasks, the items of a task whose worker was lost rerun alone, cancelling on demand.

A subclass connects to its engine and says how to ship bytes, run a remote task, wait for one,
read its outcome, cancel some, and which errors mean that a worker was lost.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
import weakref
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any, ClassVar

from parfor_backends._quarantine import Quarantine
from parfor_backends._retrying import Job, abandon, settle
from parfor_core import (
    SETTINGS,
    Backend,
    Call,
    InterpreterExitingError,
    Result,
    Task,
    available_cpus,
    dump_call,
    interpreter_exiting,
    load_result,
    stop_before_exit,
)

#: How often an item whose worker was lost is run again, alone, before it fails.
RETRIES = SETTINGS["retries"].default
#: Seconds to wait for a scheduler to answer, or for a cluster to have a worker.
CONNECT_TIMEOUT = 30.0
#: How often a task is sent when the connection to the cluster breaks on the way: an engine may
#: drop one connection and keep the next (Dask closes the client's when a worker it scatters to
#: has just died).
SEND_ATTEMPTS = 3
#: In `ClusterBackend._running`, for a job whose remote task is on its way.
_SENDING = object()


class ClusterBackend(Backend):
    """A backend that runs each chunk as one task on a cluster engine.

    ``address`` names a running cluster; without one the backend starts a local one with
    ``n_workers`` worker processes (default: one per CPU), and stops it at shutdown. With an
    address the number of workers is the cluster's.
    """

    crosses_process = True
    module: ClassVar[str]
    """The package the engine needs; the backend is unavailable without it."""
    extra: ClassVar[str]
    """The parfor extra that installs it: ``pip install "parfor[EXTRA]"``."""

    def __init__(self, n_workers: int | None = None, *, address: str | None = None,
                 retries: int = RETRIES,
                 worker_output: bool = SETTINGS["worker_output"].default) -> None:
        super().__init__(n_workers or available_cpus())
        self.address = address.strip() if address and address.strip() else None
        self.retries = retries
        self.worker_output = worker_output
        self._lock = threading.Lock()
        self._shipped: dict[str, Any] = {}  # call id -> the engine's handle of the call
        self._running: dict[Future[Result], Any] = {}  # the caller's future -> its remote task
        self._quarantine = Quarantine()  # jobs that wait after a worker death
        self._draining = False  # a thread is sending the jobs that leave the quarantine
        self._connected = False
        # The call during which the connection broke, its error, and until when: that call's
        # next tasks fail with it (a pmap waits once, not once per task); a task of another
        # call, or a later one (a ParPool's), closes that connection and makes a new one.
        self._lost: tuple[str, ConnectionError, float] | None = None
        self._connections = 0  # connections made: an error of an older one drops no newer one
        self._connect_once()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec(cls.module) is None:
            return (f"the {cls.module} package is not installed: "
                    f'pip install "parfor[{cls.extra}]"')
        return None

    # -- what a subclass provides ----------------------------------------------------------------

    @abstractmethod
    def _connect(self) -> int:
        """Connect to ``self.address``, or start a local cluster of ``self.n_workers``
        workers; return how many tasks the cluster runs at once."""

    @abstractmethod
    def _disconnect(self, kill: bool) -> None:
        """Close the connection, and stop a local cluster (at once when ``kill``)."""

    @abstractmethod
    def _ship(self, data: bytes) -> Any:
        """Put ``data`` (a serialized call) on the cluster once; a handle tasks refer to."""

    @abstractmethod
    def _start_remote(self, call_id: str, shipped: Any, items: bytes) -> Any:
        """Start a remote task answering ``execute_call(call_id, <shipped data>, items)``."""

    @abstractmethod
    def _when_done(self, remote: Any, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (in any thread) once the remote task has finished or failed."""

    @abstractmethod
    def _outcome(self, remote: Any) -> bytes:
        """The finished remote task's answer; raises the engine's error when it failed."""

    @abstractmethod
    def _cancel(self, remotes: list[Any], hard: bool) -> None:
        """Cancel remote tasks: those not started never run; running ones are stopped where
        the engine can (``hard``: Ctrl-C, also by killing their workers)."""

    def _lost_connection(self, error: BaseException, sending: bool) -> str | None:
        """When ``error``, raised sending a task (``sending``) or as a task's outcome, means
        that the connection to the cluster broke: to what ("the Dask scheduler at ...");
        None for other errors, and by default."""
        return None

    @abstractmethod
    def _lost_worker(self, error: BaseException) -> tuple[str, bool] | None:
        """When ``error`` means that the task's worker was lost: how, and whether it was data
        lost with a worker, the call's shipment perhaps among it (then the call is shipped
        again, and the task runs again whole, its items not blamed); None for other errors."""

    # -- the Backend contract ---------------------------------------------------------------------

    def submit(self, task: Task) -> Future[Result]:
        lost = self._connect_once(task.call.id)
        job = Job.of(task)
        job.future.add_done_callback(self._forget)
        if lost is None:
            self._start(job)
        else:
            settle(job.future, lost)
        return job.future

    def interrupt(self) -> None:
        """Cancel every task this backend has on the cluster, stopping running ones where the
        engine can. Calls of other threads on this instance get a WorkerError, never a hang."""
        self._cancel_all(hard=True)

    def shutdown(self) -> None:
        self._cancel_all(hard=False)
        with self._lock:
            connected, self._connected = self._connected, False
            lost, self._lost = self._lost is not None, None
            self._shipped.clear()
        if connected or lost:  # not under the lock: disconnecting fails what is still out,
            self._disconnect(kill=lost)  # whose callbacks take the lock, maybe in this thread

    # -- running jobs -------------------------------------------------------------------------

    def _connect_once(self, call_id: str | None = None) -> ConnectionError | None:
        """Connect unless connected; None, or the error of a connection that broke during
        the call ``call_id``. Refused while the interpreter exits: the engine's client stops
        working then, and its imports fail."""
        if interpreter_exiting():
            raise InterpreterExitingError(self.name)
        with self._lock:
            lost = self._lost
            if lost is not None and lost[0] == call_id and time.monotonic() < lost[2]:
                return lost[1]
            self._lost = None
        if lost is not None:  # a local cluster whose scheduler is gone is stopped too
            self._disconnect(kill=True)
        with self._lock:
            if not self._connected:
                self.n_workers = max(1, self._connect())
                self._connected = True
                self._connections += 1
        # After the engine's imports: at exit, its clients stop before their tasks would.
        stop_before_exit(self, ClusterBackend._fail_at_exit)
        return None

    def _fail_at_exit(self) -> None:
        """At exit, fail the tasks still out: a call another thread makes then ends with an
        error, where it waited for ever (the engine's client stops working then)."""
        self._cancel_all(hard=False)

    def _cancel_all(self, hard: bool) -> None:
        """Stop every task of this backend (``hard``: Ctrl-C); their callers get an error."""
        with self._lock:
            running = list(self._running.items())
            self._running.clear()
            waiting = self._quarantine.clear()
        remotes = [remote for _, remote in running if remote is not _SENDING]
        if remotes:
            self._cancel(remotes, hard)
        for future in [future for future, _ in running] + [job.future for job in waiting]:
            abandon(future, self.name, hard)

    def _start(self, job: Job) -> None:
        """Send the job now, unless it must wait in quarantine. An error sending it, other than
        a lost connection, is raised: to submit's caller, or to _finished."""
        try:
            with self._lock:
                self._drop(job.future)  # its last remote task, if any, is over
                # Done already: cancelled, or failed by an interrupt that raced this retry; its
                # _forget has run, and a mark made now would stay for good (the backend busy).
                now = not job.future.done() and self._quarantine.admit(job)
                if now:
                    self._running[job.future] = _SENDING
            if now:
                self._send_job(job)
        except BaseException:
            self._release(job.future)  # not out: it holds no other job back
            raise
        self._drain()

    def _release(self, future: Future[Result]) -> Any:
        """The future's remote task (returned) is no longer ours to wait for: send the jobs
        that waited for it."""
        with self._lock:
            remote = self._drop(future)
        self._drain()
        return remote

    def _drop(self, future: Future[Result]) -> Any:
        """Under the lock: the future's remote task (returned) is no longer out."""
        self._quarantine.forget(future)
        return self._running.pop(future, None)

    def _drain(self) -> None:
        """Send the jobs that may leave the quarantine now: one thread at a time, in a loop
        (sending one may end it, and free the next: by recursion, that would go as deep as
        the quarantine). A thread that finds another draining leaves it to that one, which
        looks again before it stops."""
        with self._lock:
            if self._draining:
                return
            self._draining = True
        unsent: deque[Job] = deque()
        try:
            while True:
                with self._lock:
                    unsent.extend(self._quarantine.ready(busy=bool(self._running)))
                    for job in unsent:
                        self._running[job.future] = _SENDING
                    if not unsent:
                        self._draining = False
                        return
                while unsent:
                    try:
                        self._send_job(unsent[0])
                    except Exception as error:  # nobody else would see it
                        settle(unsent[0].future, error)
                    unsent.popleft()
        except BaseException:  # Ctrl-C in a caller's thread that was sending: the jobs it
            with self._lock:   # had not sent fail, and the next of the quarantine goes
                self._draining = False
                for job in unsent:
                    self._drop(job.future)
            for job in unsent:
                abandon(job.future, self.name, hard=True)
            raise

    def _send_job(self, job: Job) -> None:
        """Start the job's remote task (it is marked on its way in _running), and _finished
        when that is done. A lost connection fails the job; other errors are raised, and the
        caller (_start or _drain) unmarks it."""
        if job.future.done():  # since it was marked: _forget has dropped it
            return
        connection = self._connections
        try:
            remote = self._send(job, connection)
        except ConnectionError as error:
            settle(job.future, error)
            return
        try:
            with self._lock:
                current = self._connected and connection == self._connections
                sent = current and self._running.get(job.future) is _SENDING
                if sent:
                    self._running[job.future] = remote
                elif not current:
                    self._drop(job.future)
            if not sent:  # cancelled, or interrupted, or the connection it went by was closed
                self._cancel([remote], hard=False)
                if not current:
                    settle(job.future, ConnectionError(
                        f"The connection to the {self.name} cluster was closed while a task "
                        f"was sent (another call lost it, or was interrupted); the next call "
                        f"connects again."))
                return
            self._when_done(remote, partial(self._finished, job, remote, connection))
        except BaseException:
            self._cancel([remote], hard=False)
            raise

    def _send(self, job: Job, connection: int) -> Any:
        """Start the job's remote task (shipping its call first, once); a connection that
        breaks on the way is tried `SEND_ATTEMPTS` times, then raises ConnectionError."""
        call = job.task.call
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                return self._start_remote(call.id, self._shipment(call), job.items)
            except Exception as error:
                to = self._lost_connection(error, sending=True)
                if to is None:
                    raise
                if attempt == SEND_ATTEMPTS:
                    raise self._connection_error(to, error, f"{attempt} tries to send a task",
                                                 job, connection) from error
                time.sleep(0.1 * attempt)

    def _connection_error(self, to: str, error: BaseException, doing: str, job: Job,
                          connection: int) -> ConnectionError:
        """The error of connection number ``connection`` (``to`` what), which broke during
        the job's call: dropped, so that the next call connects again."""
        lost = ConnectionError(f"Lost the connection to {to} ({doing}): "
                               f"{type(error).__name__}: {error}. The next call connects again.")
        with self._lock:
            if self._connected and connection == self._connections:
                self._connected = False
                self._lost = (job.task.call.id, lost, time.monotonic() + CONNECT_TIMEOUT)
                self._shipped.clear()
        return lost

    def _finished(self, job: Job, remote: Any, connection: int) -> None:
        """Runs in the engine's callback thread, which drops exceptions: every error, also one
        starting a retry, goes to the caller's future."""
        with self._lock:
            if self._running.get(job.future) is not remote:
                return  # cancelled, or interrupted: nobody waits for it
            alone = self._quarantine.ran_alone(job.future)
        try:
            outcome: Job | Result
            try:
                outcome = job.finish(load_result(self._outcome(remote)))
            except Exception as error:
                if job.future.cancelled():  # by the caller, since the look above: nobody waits
                    error.__traceback__ = None  # the engine keeps it (Dask's cancel), and its
                    return                      # frames would keep the job's call alive
                to = self._lost_connection(error, sending=False)
                if to is not None:
                    raise self._connection_error(to, error, "waiting for a task", job,
                                                 connection) from error
                lost = self._lost_worker(error)
                if lost is None:
                    raise
                how, shipment_lost = lost
                if shipment_lost:  # data lost with a worker: not the items' doing
                    self._unship(job.task.call.id)
                outcome = job.after_death(f"a {self.name} worker", how, self.retries, self.name,
                                          blame=not shipment_lost, alone=alone)
            if isinstance(outcome, Job):
                self._start(outcome)
            else:
                settle(job.future, outcome)
        except BaseException as error:
            settle(job.future, error)

    def _forget(self, future: Future[Result]) -> None:
        """The caller's future is done: its remote task is cancelled if the caller gave up
        on it, and jobs that waited for it to end are sent."""
        remote = self._release(future)
        if remote not in (None, _SENDING) and future.cancelled():
            self._cancel([remote], hard=False)

    def _shipment(self, call: Call) -> Any:
        """The call's handle on the cluster: shipped with the call's first task, dropped when
        the call is released or garbage (a ParPool's calls are never released)."""
        with self._lock:
            shipped = self._shipped.get(call.id)
        if shipped is None:
            shipped = self._ship(dump_call(call))
            with self._lock:
                shipped = self._shipped.setdefault(call.id, shipped)
            call.releasers.append(weakref.finalize(call, self._unship, call.id))
        return shipped

    def _unship(self, call_id: str) -> None:
        """Without the lock: a garbage collection runs this finalizer in whatever thread it
        starts in, maybe one that holds the lock (seen: a test hung). One dict operation needs
        no lock of ours, with or without the GIL."""
        self._shipped.pop(call_id, None)


def local_python_path() -> str:
    """This interpreter's import path as PYTHONPATH, for the workers of a local cluster: they
    then import what the caller can (its script's folder, its own modules)."""
    return os.pathsep.join([entry for entry in sys.path if entry] +
                           [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
