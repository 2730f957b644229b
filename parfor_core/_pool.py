"""ParPool: submit work now, with any function, and fetch each result whenever you like."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from ._arguments import (
    check_args,
    check_count,
    make_call,
    settings_for,
    settle_sharing,
    show_bar,
)
from ._dispatch import ctrl_c_of
from ._progress import Progress, ProgressBar, check_bar
from ._registry import registry
from ._task import Call, Result, Task, add_note, inside_worker
from .backend import Backend
from .errors import WorkerDiedError, WorkerError

if TYPE_CHECKING:
    from concurrent.futures import Future


class UnknownHandleError(KeyError, ValueError):
    """A ParPool holds no task under that handle: a KeyError, as a dict would raise, and a
    ValueError, as the original parfor's ParPool raised."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message, not KeyError's repr of it


#: The handle of a task that is given none: a new one is made up.
_MADE_UP: Any = object()


#: How many functions of add_task a pool keeps a call for (see `ParPool._task_call`).
CACHED_TASK_CALLS = 16


def _made_up(handle: Hashable | None) -> Hashable:
    """``handle``, or `_MADE_UP` for None, which asks for a new one (where it is optional)."""
    return _MADE_UP if handle is None else handle


class ParPool:
    """A pool to which tasks are added one by one, each under a handle to fetch its result by.

    ``pool[handle] = item`` or ``handle = pool(item)`` runs ``fun(item, *args, **kwargs)``;
    ``pool.add_task(fun, args, kwargs)`` runs any ``fun(*args, **kwargs)``. ``pool[handle]``
    waits for that result (re-raising what the task raised) and forgets it; ``get_newest()``
    gives the next finished ``(handle, result)``. Use it as a context manager: leaving the block
    cancels the work nobody fetched. ``barlength`` is how far a task moves the progress bar.
    """

    def __init__(
        self,
        fun: Callable[..., Any] | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        n_processes: int | None = None,
        bar: bool | Callable[[int], object] | ProgressBar | None = None,
        backend: str | Backend | None = None,
    ) -> None:
        self._default = make_call(fun, args, kwargs) if fun is not None else None
        check_bar(bar, {})
        # No serial fallback for one worker: a pool must accept work now and run it later.
        settings = settings_for(backend, n_processes, bar)
        selected = registry.select(backend, serial=False if backend is None else None,
                                   total=None, settings=settings)
        self._settings = settings  # where its calls were made, for all of them
        if self._default is not None:
            settle_sharing(self._default, settings)
        self._resources = ExitStack()
        self._backend = self._resources.enter_context(registry.lease(selected))
        # No bar unless asked for, by argument or configuration: a pool has no known total.
        shown = show_bar(bar, bool(settings["bar"]), nested=inside_worker())
        self._progress = Progress(shown, total=0)
        self._futures: dict[Hashable, Future[Result]] = {}
        self._finished: deque[tuple[Hashable, Future[Result]]] = deque()
        self._handles = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a task finished, was taken, or closed
        self._reserved: set[Hashable] = set()  # handles of tasks being submitted
        #: Finished tasks counted once (or being counted), not yet twice: set once the bar moved.
        self._counted: dict[Future[Result], threading.Event] = {}
        self._barlengths: dict[Future[Result], int] = {}  # not counted yet
        self._bar_error: Exception | None = None  # the bar's, for the pool's next operation
        self._task_calls: OrderedDict[Any, Call] = OrderedDict()  # see _task_call

    @property
    def backend(self) -> Backend:
        """The backend instance this pool's tasks run on."""
        return self._backend

    def __call__(self, item: Any, handle: Hashable | None = None, barlength: int = 1
                 ) -> Hashable:
        """Run the pool's function on ``item``; returns the handle (made up if not given)."""
        return self._submit(self._require_default(), item, _made_up(handle), barlength)

    def __setitem__(self, handle: Hashable, item: Any) -> None:
        """Run the pool's function on ``item`` under the given handle (None too)."""
        self._submit(self._require_default(), item, handle)

    def add_task(
        self,
        fun: Callable[..., Any] | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        handle: Hashable | None = None,
        barlength: int = 1,
    ) -> Hashable:
        """Run ``fun(*args, **kwargs)``; each left out defaults to the pool's own."""
        default = self._default
        call = self._task_call(fun if fun is not None else (default.fun if default else None),
                               kwargs)
        item = check_args(args, "the positional arguments") if args is not None else (
            default.args if default else ())
        return self._submit(call, item, _made_up(handle), barlength)

    def _task_call(self, fun: object, kwargs: Mapping[str, Any] | None) -> Call:
        """The call of ``add_task(fun, ..., kwargs)``, its positional arguments being its item.
        One per function while the pool lasts where the task brings no keyword arguments of
        its own: the function is then sent to each worker once, not with every task (a 1 MB
        global it uses made each task 45 times slower)."""
        cacheable = kwargs is None
        try:
            hash(fun)
        except TypeError:  # an unhashable callable: a call of its own each time
            cacheable = False
        if cacheable:
            with self._lock:
                call = self._task_calls.get(fun)
                if call is not None:
                    self._task_calls.move_to_end(fun)
                    return call
        default = self._default
        call = make_call(fun, (), kwargs if kwargs is not None else
                         (default.kwargs if default else {}))
        call.unpack = True
        settle_sharing(call, self._settings)
        if cacheable:
            with self._lock:
                self._task_calls[fun] = call
                if len(self._task_calls) > CACHED_TASK_CALLS:  # its tasks may still run: it
                    self._task_calls.popitem(last=False)  # is released when collected
        return call

    def process_queue(self) -> None:
        """Nothing to do: results arrive on their own. The original parfor's ParPool needed this
        call to collect them; code written for it keeps working."""

    def _require_default(self) -> Call:
        if self._default is None:
            raise TypeError("this ParPool has no function: give fun= when making it, "
                            "or use add_task(fun, args, kwargs)")
        return self._default

    def _submit(self, call: Call, item: Any, handle: Hashable, barlength: int = 1
                ) -> Hashable:
        """Run ``call`` on ``item`` under ``handle`` (`_MADE_UP`: a new one, returned)."""
        barlength = check_count("barlength", barlength, 0)
        self._raise_bar_error()
        with self._lock:  # one handle, one task, also when several threads add work
            if self._closed:
                raise RuntimeError("this ParPool is closed")
            if handle is _MADE_UP:
                handle = next(h for h in self._handles
                              if h not in self._futures and h not in self._reserved)
            elif handle in self._futures or handle in self._reserved:
                raise ValueError(f"handle {handle!r} is already in use in this ParPool")
            self._reserved.add(handle)
        try:  # not under the lock: a serial backend runs the task right here, and it may add work
            future = self._backend.submit(Task(call, (0,), (item,)))
        except Exception as exc:  # its item is the pool's only "input item 0": say which task
            add_note(exc, f"parfor: adding the ParPool task with handle {handle!r}")
            raise
        finally:
            with self._lock:
                self._reserved.discard(handle)
        with self._lock:
            closed = self._closed  # by another thread while the task was sent
            if not closed:
                self._futures[handle] = future
                self._barlengths[future] = barlength
        if closed:  # it goes as the pool's other tasks went
            future.cancel()
            raise RuntimeError("this ParPool is closed")
        self._progress.add_total(barlength)
        future.add_done_callback(lambda done, h=handle: self._on_done(h, done))
        return handle

    def _on_done(self, handle: Hashable, future: Future[Result]) -> None:
        with self._changed:
            self._finished.append((handle, future))
            self._changed.notify_all()
        self._count(future)

    def _count(self, future: Future[Result]) -> None:
        """Advance the progress bar for a finished task, once: from its done-callback, or, if
        the caller fetched it before that callback ran (it runs in the worker's thread), now.
        The second of the two waits until the first has moved the bar: a fetched result's
        step is always shown."""
        with self._lock:
            moved = self._counted.pop(future, None)
            if moved is not None:  # counted (or being counted) elsewhere
                second = True
            else:
                second, moved = False, threading.Event()
                self._counted[future] = moved
                barlength = self._barlengths.pop(future, 1)
        if second:
            moved.wait()
            return
        try:
            self._progress.update(barlength)
        except Exception as exc:  # a callback's, maybe in a worker's thread: no result is lost
            add_note(exc, "parfor: raised by the ParPool's bar")
            with self._lock:
                self._bar_error = self._bar_error or exc
        finally:
            moved.set()

    def _raise_bar_error(self) -> None:
        """Raise what the bar raised since the last operation, so that it is not lost."""
        with self._lock:
            error, self._bar_error = self._bar_error, None
        if error is not None:
            raise error

    def __getitem__(self, handle: Hashable) -> Any:
        """Wait for the result of ``handle``, forget the task, and return (or raise) it."""
        self._raise_bar_error()
        future = self._future_of(handle)
        from concurrent.futures import wait

        wait([future])  # interrupted here, the task stays in the pool
        self._forget(handle, future)
        return self._outcome(handle, future)

    def _outcome(self, handle: Hashable, future: Future[Result]) -> Any:
        """The value of a finished task, or its exception raised."""
        self._count(future)
        what = f"the task with handle {handle!r}"
        try:
            result = future.result()
        except Exception as exc:
            raise WorkerError.running(self._backend.name, what, exc) from exc
        failure = result.failure
        if failure is not None:
            if isinstance(failure.exception, WorkerDiedError):  # not "input item 0": which task
                failure.exception = failure.exception.naming(what)
            failure.reraise(f"{what} ({failure.item_repr})")
        return result.values[0]

    def __contains__(self, handle: Hashable) -> bool:
        """Whether a task with this handle is in the pool and not yet fetched."""
        return handle in self._futures

    def __len__(self) -> int:
        """The number of tasks not yet fetched."""
        return len(self._futures)

    def __delitem__(self, handle: Hashable) -> None:
        """Forget a task, cancelling it if it has not started (`processes` also stops a running
        one, should other work need its worker)."""
        future = self._future_of(handle)
        self._forget(handle, future)
        future.cancel()

    def _future_of(self, handle: Hashable) -> Future[Result]:
        future = self._futures.get(handle)
        if future is None:
            closed = " (it is closed: the tasks not fetched were cancelled)" if self._closed else ""
            raise UnknownHandleError(f"no task with handle {handle!r} in this ParPool{closed}")
        return future

    def _forget(self, handle: Hashable, future: Future[Result]) -> None:
        with self._changed:
            if self._futures.get(handle) is not future:
                raise UnknownHandleError(f"no task with handle {handle!r} in this ParPool "
                                         "(any more)")
            del self._futures[handle]
            self._changed.notify_all()  # get_newest() waiting elsewhere looks again

    def get_newest(self) -> tuple[Hashable, Any] | None:
        """Wait for any unfetched task to finish; return its ``(handle, result)``.

        None when the pool holds no tasks (or is closed), also while waiting: another thread
        may take the last one.
        """
        self._raise_bar_error()
        with self._changed:
            while (taken := self._take_finished()) is None:
                if not self._futures or self._closed:
                    return None
                self._changed.wait()
        return taken[0], self._outcome(*taken)

    def _take_finished(self) -> tuple[Hashable, Future[Result]] | None:
        """Take the first finished task not fetched yet (nor a reused handle's); lock held."""
        while self._finished:
            handle, future = self._finished.popleft()
            if self._futures.get(handle) is future:
                del self._futures[handle]
                self._changed.notify_all()
                return handle, future
        return None

    def close(self) -> None:
        """Cancel the tasks that have not started, and release the pool's resources; then
        raise what the bar raised, if it did since the last operation."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures.values())
            self._futures.clear()
            self._changed.notify_all()
        for future in futures:
            future.cancel()
        for call in [self._default, *self._task_calls.values()]:  # add_task's other calls
            if call is not None:  # are released when collected
                call.cancelled = True
                call.release()
        self._task_calls.clear()
        self._progress.close()
        self._resources.close()
        self._raise_bar_error()

    def __enter__(self) -> ParPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 *rest: object) -> None:
        if error is not None and ctrl_c_of(error) is not None and self._futures:
            from ._ctrl_c import interrupt_held  # not at import: it loads signal and enum

            interrupt_held(self._backend)  # Ctrl-C in the block: its running tasks stop too
        self.close()

    def __getstate__(self) -> None:
        raise TypeError("a ParPool cannot be pickled or sent to a worker")

