"""The Backend base class: the contract a backend plugin implements."""

from __future__ import annotations

import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ._task import Result, Task
from .errors import InterpreterExitingError

if TYPE_CHECKING:
    from concurrent.futures import Future

T = TypeVar("T")
B = TypeVar("B", bound="Backend")


class Backend(ABC):
    """Runs tasks somewhere and hands back a Future of each task's Result.

    A backend implements one method, `submit`. The worker side is already written: call
    ``parfor_core.run_task(task)`` where the work runs (in-process backends), or send
    ``parfor_core.dump_task(task)`` to a worker that calls ``parfor_core.execute_dumped`` and
    answer ``parfor_core.load_result(...)`` of what it returns (process backends). User
    exceptions travel inside the Result; a backend never raises them itself.

    The registry keeps one instance per name and reuses it across calls; a call that asks for
    another number of workers replaces it.
    """

    name: ClassVar[str]
    """The name users select the backend by (``backend="loky"``)."""
    crosses_process: ClassVar[bool] = False
    """True when items, functions and results must be serialized to reach the workers."""
    environment: ClassVar[Mapping[str, str]] = {}
    """Options an environment variable may set, e.g. ``{"address": "PARFOR_DASK_ADDRESS"}``:
    such a variable beats the configuration files and loses to ``parfor.config`` blocks."""

    def __init__(self, n_workers: int) -> None:
        self.n_workers = n_workers

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (and how to fix that), or None when it can."""
        return None

    @classmethod
    def auto_priority(cls) -> int | None:
        """How eagerly the automatic choice picks this backend here; None: only when named.

        The available backend with the highest number wins. Built-ins: threads 100 when the GIL
        is disabled, processes 20, loky 10.
        """
        return None

    @abstractmethod
    def submit(self, task: Task) -> Future[Result]:
        """Start running ``task`` and return a Future of its Result."""

    def prepare(self, n_items: int | None) -> None:  # noqa: B027 - optional
        """Start what the first tasks of a call over ``n_items`` items (None: unknown) will need,
        worker processes say, without waiting for them: called just before the progress bar
        is drawn, so that both happen at once."""

    def reclaim(self, future: Future[Result]) -> bool:
        """Take back the task of ``future`` if it waits because no worker is ready yet (they
        are starting): True promises it will never run here, and the caller runs it itself
        meanwhile. The default, False, suits every backend that cannot tell."""
        return False

    def interrupt(self) -> None:  # noqa: B027 - optional; doing nothing is a fine default
        """Stop running tasks as soon as possible (Ctrl-C); the next submit must work again."""

    def shutdown(self) -> None:  # noqa: B027 - optional; doing nothing is a fine default
        """Release the workers: no call uses this instance any more (it was replaced by one
        with another worker count), or the interpreter is exiting."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} n_workers={self.n_workers}>"


def then(future: Future[Any], convert: Callable[[Any], T],
         cancel: Callable[[Future[Any]], object] | None = None) -> Future[T]:
    """A Future of ``convert(future.result())``; cancelling it cancels ``future`` too, by
    ``cancel(future)`` if given (an executor that must not see a cancel at some moments).

    For process backends, whose executors answer bytes: ``then(fut, load_result)``.
    """
    from concurrent.futures import Future

    converted: Future[T] = Future()

    def finish(done: Future[Any]) -> None:
        if done.cancelled() or converted.cancelled():
            converted.cancel()
            return
        try:
            converted.set_result(convert(done.result()))
        except BaseException as exc:  # also worker deaths, which the caller reports
            converted.set_exception(exc)

    cancel_inner = cancel or Future.cancel
    converted.add_done_callback(lambda c: c.cancelled() and cancel_inner(future))
    future.add_done_callback(finish)
    return converted


def interpreter_exiting() -> bool:
    """Whether the interpreter has begun to exit: threading's flag, set before the exit
    handlers run. Executors stop then, so a backend whose work waits on one refuses new work
    (`InterpreterExitingError`) and fails its tasks that have not started."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False))


_stopped_at_exit: dict[tuple[type[Backend], Callable[..., object]], weakref.WeakSet[Backend]] = {}
_stopped_at_exit_lock = threading.Lock()


def stop_before_exit(backend: B, stop: Callable[[B], object]) -> None:
    """Have ``stop(backend)`` run when the interpreter exits, before the exit handlers of
    ``concurrent.futures`` and loky: those wait for every task in their executors' queues (an
    abandoned gmap's, an unclosed ParPool's), and a Ctrl-C in that wait hangs the exit.

    Call it once the executor's own handler is registered (at the import of
    ``concurrent.futures.thread``; loky's at a pool's first task): the last registered runs
    first. Each backend class and ``stop`` registers one handler; the backend is held weakly.
    Raises `InterpreterExitingError` where the interpreter is exiting already: work started
    then would wait for ever on executors that have stopped.
    """
    key = (type(backend), stop)
    with _stopped_at_exit_lock:
        instances = _stopped_at_exit.get(key)
        if instances is None:
            instances = _stopped_at_exit[key] = weakref.WeakSet()
            try:
                threading._register_atexit(  # type: ignore[attr-defined]  # as they do
                    _stop_all, instances, stop)
            except RuntimeError:  # the executors' handlers have run, or run now
                del _stopped_at_exit[key]
                raise InterpreterExitingError(backend.name) from None
        instances.add(backend)


def _stop_all(instances: weakref.WeakSet[B], stop: Callable[[B], object]) -> None:
    """Stop each backend; one that fails is reported, and the others are still stopped (as
    are the exit handlers after this one, which a failure here would skip)."""
    for backend in list(instances):
        try:
            stop(backend)
        except Exception:
            import traceback

            print(f"parfor: stopping {backend!r} at exit failed:", file=sys.stderr)
            traceback.print_exc()
