"""Task and Result: what a backend runs and hands back, and how a worker runs a task."""

from __future__ import annotations

import os
import reprlib
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from operator import length_hint
from time import perf_counter
from typing import Any, NamedTuple, NoReturn

from ._context import started_from_caller

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6

_inside_worker: ContextVar[bool] = ContextVar("parfor_inside_worker", default=False)
_in_worker_process = False
_worker_pid: int | None = None  # the worker's own: a process its tasks fork has another


def inside_worker() -> bool:
    """True while running a task, or anywhere in a worker process: nested calls run serially."""
    return _in_worker_process or _inside_worker.get()


def mark_worker_process(environment_is_callers: bool = False) -> None:
    """Call once in each worker process, at its start, so that every call made there runs
    serially. ``environment_is_callers``: the process started with its caller's environment,
    nothing added, so that a variable the caller unsets later is unset here too."""
    global _in_worker_process, _worker_pid
    _in_worker_process = True
    _worker_pid = os.getpid()
    if environment_is_callers:
        started_from_caller()


def in_fork_of_worker() -> bool:
    """Whether this is a process that a task forked in a worker process: it runs on in the
    task's code, and must never answer for the worker (see `leave_fork`)."""
    return _in_worker_process and os.getpid() != _worker_pid


def leave_fork(exc: BaseException | None = None) -> NoReturn:
    """End a process that a task forked in a worker, back from the task (or raising ``exc``)
    as Python would end a program, but without the exit handlers: they are the worker's, for
    the worker's resources (its shared memory)."""
    code = 0
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    elif exc is not None:
        import traceback

        traceback.print_exception(exc)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: S110 - closed or broken: nothing left to show
            pass
    os._exit(code)


def short_repr(obj: object) -> str:
    """A repr short enough for an error message; never raises."""
    try:
        return _short.repr(obj)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        return f"<{type(obj).__qualname__} object, repr failed: {exc!r}>"


def add_note(exc: BaseException, note: str) -> None:
    """Attach a line to an exception's report without changing its type or message."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10 has no add_note; keep the note where 3.11+ would look for it
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]


class Call:
    """The function and extra arguments shared by every task of one call (or of one ParPool).

    A worker runs ``fun(item, *args, **kwargs)``, or ``fun(*item, *args, **kwargs)`` when
    ``unpack`` is set (ParPool.add_task). Serialized at most once, however many tasks it has.
    """

    __slots__ = ("fun", "args", "kwargs", "unpack", "id", "cancelled", "releasers", "_wire",
                 "_shared", "share_in_place", "keep_shared", "__weakref__")

    def __init__(
        self,
        fun: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        unpack: bool = False,
    ) -> None:
        self.fun = fun
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.unpack = unpack
        self.id = os.urandom(16).hex()
        self.cancelled = False  # set by the caller; in-process workers stop between items
        self.releasers: list[Callable[[], object]] = []  # free what serializing it made
        self._wire: bytes | None = None  # serialized by _wire on first need
        self._shared: bytes | None = None  # how share_call sends it on this machine
        #: The settings of that name where the call was made (None: as configured when its
        #: data is sent): a gmap made in a parfor.config() block may be read after it.
        self.share_in_place: bool | None = None
        self.keep_shared: float | None = None

    @property
    def plain(self) -> bool:
        """Whether it is ``fun(item)``, the commonest form, which the quickest loops serve."""
        return not (self.unpack or self.args or self.kwargs)

    def release(self) -> None:
        """Free what was made for this call (shared memory for big arguments); idempotent."""
        while self.releasers:
            self.releasers.pop()()

    def __repr__(self) -> str:
        return f"Call({short_repr(self.fun)}, id={self.id[:8]})"


class Task(NamedTuple):
    """A chunk of items of one call, each with its index in the input.

    A backend that can tell how far a running task has got may call ``report(n)`` with the
    number of its items done so far, so the progress bar moves during long tasks; it must do
    so before the task's future resolves.
    """

    call: Call
    indices: Sequence[int]
    items: Sequence[Any]
    report: Callable[[int], object] | None = None


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback, chained as ``__cause__`` of the re-raised error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class Failure:
    """The exception one item raised, with what the caller needs to say where it happened."""

    __slots__ = ("index", "item_repr", "exception", "traceback", "worker", "cause")

    def __init__(self, index: int, item_repr: str, exception: BaseException, traceback: str,
                 worker: str) -> None:
        self.index = index
        self.item_repr = item_repr
        self.exception = exception
        self.traceback = traceback
        self.worker = worker
        #: The exception's ``__cause__``, when it crossed from a worker process: an exception
        #: crosses without it.
        self.cause: BaseException | None = None

    def __repr__(self) -> str:
        exception = getattr(self, "exception", "<raised>")
        return (f"Failure(index={self.index}, item_repr={self.item_repr!r}, "
                f"exception={exception!r}, worker={self.worker!r})")

    @classmethod
    def capture(cls, index: int, item: object, exc: BaseException) -> Failure:
        """Record ``exc``, raised by ``item`` (at input position ``index``), where it happened."""
        import traceback

        return cls(index, short_repr(item), exc, "".join(traceback.format_exception(exc)),
                   describe_worker())

    @classmethod
    def about(cls, index: int, item: object, exc: BaseException, worker: str) -> Failure:
        """An error the caller's side made about an item (the worker running it died): it has
        no worker's traceback to chain."""
        return cls(index, short_repr(item), exc, "", worker)

    def reraise(self, what: str) -> None:
        """Raise the original exception in the caller, saying which item (``what``) raised it.

        A StopIteration cannot leave the generators that deliver results (Python would turn it
        into a bare RuntimeError there), nor would a serial loop's caller see it as an error:
        it comes as a RuntimeError that names the item, from the original."""
        # Raised once, and let go of: no cycle (the error, its traceback, a frame there that
        # holds this Failure) keeps the call's arguments alive until a garbage collection.
        exc = self.exception
        del self.exception
        try:
            if exc.__traceback__ is None and self.traceback:  # from a worker: its frames
                remote = RemoteTraceback(self.traceback)
                if self.cause is None:  # chained
                    exc.__cause__ = remote
                else:  # a note, beside the cause that a serial loop would give
                    exc.__cause__ = self.cause
                    add_note(exc, f"parfor: the worker's traceback:{remote}")
            where = f"{what} in {self.worker}"
            if isinstance(exc, (StopIteration, StopAsyncIteration)):
                raise RuntimeError(f"fun raised {type(exc).__name__} on {where}") from exc
            add_note(exc, f"parfor: raised by {where}")
            exc.__parfor_item_error__ = True  # type: ignore[union-attr]  # see is_item_error
            raise exc
        finally:
            del exc


def is_item_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an item's own, raised again by `Failure.reraise`: a KeyboardInterrupt
    that ``fun`` raised is the item's error, not the user's Ctrl-C, which stops the backend."""
    return getattr(exc, "__parfor_item_error__", False)


class Result(NamedTuple):
    """What a backend's future resolves to: the values of the items of a task, in order.

    When an item raised, ``values`` holds the items before it and ``failure`` says what happened;
    the items after it were not run. ``elapsed`` is the worker's time on the task, in seconds.
    """

    values: list[Any]
    elapsed: float
    failure: Failure | None = None


def describe_worker() -> str:
    if _in_worker_process:
        return f"worker process {os.getpid()}"
    return f"thread {threading.current_thread().name!r} of process {os.getpid()}"


def run_task(task: Task, values: list[Any] | None = None) -> Result:
    """Run every item of a task where this is called; exceptions are returned, never raised.

    The values are appended to ``values`` (a new list if not given; it may hold values of
    earlier tasks) as they come.
    """
    call = task.call
    values = [] if values is None else values
    before = len(values)
    token = _inside_worker.set(True)
    start = perf_counter()
    try:
        _apply(call, task.items, values)
    except BaseException as exc:  # SystemExit too: the item's, for the caller to raise
        if _ctrl_c(exc):
            raise
        position = len(values) - before
        failure = Failure.capture(task.indices[position], task.items[position], exc)
        return Result(values, perf_counter() - start, failure)
    finally:
        _inside_worker.reset(token)
    return Result(values, perf_counter() - start)


def run_task_whole(task: Task) -> Result:
    """Run every item of a task into a list of its own, by a comprehension where it can: for a
    caller that wants no values of a task that fails (pmap raises its error instead).

    A comprehension is CPython's quickest loop (5% to 10% quicker than appending, on quick
    items), but one that raises keeps none of its values: ``values`` of a failed task is empty.
    The failing item is found from the items left, which list, tuple and range iterators tell.
    """
    call, items = task.call, task.items
    if not (_SPECIALIZING and call.plain and length_hint(iter(items), -1) == len(items)):
        return run_task(task)
    fun, source = call.fun, iter(items)
    token = _inside_worker.set(True)
    start = perf_counter()
    try:
        return Result([fun(item) for item in source], perf_counter() - start)
    except BaseException as exc:
        if _ctrl_c(exc):
            raise
        position = len(items) - length_hint(source) - 1
        failure = Failure.capture(task.indices[position], items[position], exc)
        return Result([], perf_counter() - start, failure)
    finally:
        _inside_worker.reset(token)


def _ctrl_c(exc: BaseException) -> bool:
    """Whether ``exc`` may be the user's Ctrl-C, which stops the call rather than failing an
    item: a KeyboardInterrupt in the main thread of the caller's process (Python raises it
    there only; anywhere else, ``fun`` raised it)."""
    return (isinstance(exc, KeyboardInterrupt) and not _in_worker_process
            and threading.current_thread() is threading.main_thread())


#: Whether this interpreter specialises its bytecode (3.11 on, with the GIL): there a loop of
#: ``values.append(fun(item))`` runs 3% (3.11) to 14% (3.12, 3.13) faster than
#: ``values.extend(map(fun, items))``; on 3.10 and free-threaded 3.13 it runs up to 80% slower.
_SPECIALIZING = sys.version_info >= (3, 11) and "t" not in getattr(sys, "abiflags", "")


def _apply(call: Call, items: Sequence[Any], values: list[Any]) -> None:
    """Append ``fun``'s value for each item: the hot loop, so one specialised loop per form.

    On an exception ``values`` holds the values before the failing item.
    """
    fun, args, kwargs, append = call.fun, call.args, call.kwargs, values.append
    if call.unpack:
        for item in items:
            if call.cancelled:
                return
            append(fun(*item, *args, **kwargs))
    elif args or kwargs:
        for item in items:
            if call.cancelled:
                return
            append(fun(item, *args, **kwargs))
    elif call.cancelled:
        return
    elif _SPECIALIZING:  # the commonest form: a cancel waits for the chunk's end (~50 ms)
        for item in items:
            values.append(fun(item))
    else:
        start = len(values)
        values.extend(map(fun, items))  # on a raise, extend keeps the values before it
        if len(values) - start < len(items):  # fun raised StopIteration, which ended map
            raise StopIteration  # as if silently: say so, at the item that raised it
