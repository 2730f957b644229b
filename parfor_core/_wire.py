"""The task protocol for backends whose workers are other processes.

Three ways to use it. Executors that pick the worker themselves (loky's) send
``dump_task(task)`` and the worker answers ``execute_dumped(payload)``; the call rides along
with each task and is loaded once per worker. Backends that address their workers send
``share_call(call)`` to each worker once (``load_shared_call`` there) and then only
``dump_items(task, local=True)`` (``run_items`` there). On this machine big buffers (numpy
arrays' data) of a call, of items and of results travel through shared memory that the other
side maps, not copies, and that the kernel frees even if its owner is killed. Backends on a
cluster put ``dump_call(call)`` in the cluster's own store once and send ``dump_items(task)``
with a reference to it (``execute_call`` there). Either way ``load_result`` reads the answer,
and a call's function and extra arguments are serialized once per call.
"""

from __future__ import annotations

import builtins
import os
import pickle
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

from ._context import caller_context, take_over
from ._pickling import dumps, loads
from ._shared import (
    Address,
    Placement,
    Segment,
    attach,
    copy_of,
    still_shared,
)
from ._task import (
    Call,
    Failure,
    Result,
    Task,
    describe_worker,
    in_fork_of_worker,
    leave_fork,
    run_task,
)
from .errors import NotLoadedHere, ParforError, SerializationError, rebuild_exception, rebuild_group

#: Serialized calls this large go through shared memory, not with each task or to each worker.
LARGE_CALL_BYTES = 1 << 20
#: Answers whose shared memory is smaller than this are copied by the caller, not mapped: a
#: copy of so little costs about what mapping it costs, and holds no file descriptor.
COPIED_ANSWER_BYTES = 1 << 20
#: How many calls a worker keeps deserialized, for callers that interleave several calls.
CACHED_CALLS = 4

_worker_calls: OrderedDict[str, Call] = OrderedDict()
_worker_calls_lock = threading.Lock()
#: The shared memory behind cached calls: a call whose caller let it go is dropped here too.
_worker_segments: dict[str, Address] = {}
#: How often a worker holding such calls looks whether their callers let go of them, in seconds.
SWEEP_SECONDS = 0.5
_sweeper: threading.Thread | None = None


def _first_unserializable(named: list[tuple[str, object]], cause: Exception,
                          items: Sequence[int] | None = None) -> SerializationError:
    """Find which of several objects cannot be serialized, to name it in the error (and the
    input item it is, where they are the ``items`` of these indices)."""
    failing = _first_failing(named, set())
    if failing is None:
        return SerializationError("the combination of " + ", ".join(w for w, _ in named),
                                  tuple(o for _, o in named), cause)
    position, what, obj, exc = failing
    return SerializationError(what, obj, exc, item=None if items is None else items[position])


def _first_failing(named: list[tuple[str, object]], seen: set[int]
                   ) -> tuple[int, str, object, Exception] | None:
    """The position, name, object and error of the first of ``named`` that cannot be
    serialized; of a function, rather the variable it carries that cannot be, if one is
    the cause (a notebook's global generator, say)."""
    for position, (what, obj) in enumerate(named):
        function = isinstance(obj, types.FunctionType)
        if function and id(obj) in seen:  # looked into already: a function that calls itself
            continue
        try:
            dumps(obj)
        except Exception as exc:
            if function:
                seen.add(id(obj))
                inner = _first_failing(_carried_by(obj), seen)
                if inner is not None:
                    return (position, *inner[1:])
            return position, what, obj, exc
    return None


def _carried_by(fun: types.FunctionType) -> list[tuple[str, object]]:
    """The variables that the function ``fun`` uses, named for an error."""
    import inspect

    try:
        variables = inspect.getclosurevars(fun)
    except (TypeError, ValueError):
        return []
    return [*((f"the variable {name!r} of the closure of {fun.__qualname__}()", value)
              for name, value in variables.nonlocals.items()),
            *((f"the global {name!r} that {fun.__qualname__}() uses", value)
              for name, value in variables.globals.items())]


def _serialize_call(call: Call, out_of_band: list[pickle.PickleBuffer] | None = None) -> bytes:
    """The function and extra arguments of ``call`` as bytes; SerializationError names the one
    that cannot be sent."""
    try:
        return dumps((call.fun, call.args, call.kwargs, call.unpack), out_of_band)
    except Exception as exc:
        named = [("the function", call.fun)]
        named += [(f"extra argument args[{i}]", a) for i, a in enumerate(call.args)]
        named += [(f"extra argument kwargs[{k!r}]", v) for k, v in call.kwargs.items()]
        raise _first_unserializable(named, exc) from exc


def dump_call(call: Call) -> bytes:
    """The function and extra arguments of ``call``, serialized once per call and whole, for
    workers anywhere (on a cluster, say); a worker makes the call again with
    ``load_call(call.id, data)``.

    Raises SerializationError naming the function or extra argument that cannot be sent.
    """
    if call._wire is None:
        call._wire = _serialize_call(call)
    return call._wire


def load_call(call_id: str, data: bytes | memoryview, buffers: Iterable[Any] = ()) -> Call:
    """Worker side: the Call that `dump_call` made ``data`` from."""
    fun, args, kwargs, unpack = loads(data, buffers)
    call = Call(fun, args, kwargs, unpack)
    call.id = call_id
    return call


def share_call(call: Call) -> bytes:
    """``call`` for workers on this machine, serialized once per call: a small one whole; of a
    large one, the big buffers (numpy arrays' data) and the rest are placed once in shared
    memory, which each worker maps instead of receiving a copy (``load_shared_call`` there).
    The memory goes when the call is released and the workers let go of it. The caller's
    working directory, ``sys.path`` and environment go with it (see `_context`).

    Raises SerializationError naming the function or extra argument that cannot be sent.
    """
    if call._shared is None:
        buffers: list[pickle.PickleBuffer] = []
        data = _serialize_call(call, buffers)
        if buffers or len(data) >= LARGE_CALL_BYTES:
            body, placed = None, _placed_for(call, data, list(_raw(buffers)))
        else:
            body, placed = data, None
        call._shared = pickle.dumps((body, placed, caller_context()))
    return call._shared


def _placed_for(call: Call, data: bytes, buffers: list[memoryview]) -> list[Placement]:
    """Where a call's serialized body and buffers lie in shared memory: its large arrays in
    segments of their own, kept for the next call (`_kept`), the rest in one segment that
    goes with the call."""
    from ._kept import lease  # not at import: it loads ctypes

    kept, done = lease(buffers, call.keep_shared, call.share_in_place)
    call.releasers.append(done)
    rest = [memoryview(data),
            *(part for part, place in zip(buffers, kept, strict=True) if place is None)]
    segment, spans = Segment.holding(rest, in_place=call.share_in_place)
    call.releasers.append(segment.release)
    own = iter([(segment.address, start, end) for start, end in spans])
    return [next(own), *(place or next(own) for place in kept)]


def load_shared_call(call_id: str, shared: bytes | memoryview) -> Call:
    """Worker side: the Call that `share_call` made ``shared`` from, in the caller's working
    directory, ``sys.path`` and environment. Its large buffers stay in the shared memory,
    mapped copy-on-write: what a task writes into them stays in its worker.
    """
    data, placed, context = pickle.loads(shared)
    take_over(context)
    if placed is None:
        return load_call(call_id, data)
    body, *buffers = _mapped(placed)
    return load_call(call_id, body, buffers)


class _SharedPayload(bytes):
    """Serialized bytes that refer to shared memory, and keep it alive: the memory goes with
    the last reference to them. They travel as plain bytes."""

    segment: Segment

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (bytes(self),)


#: The first byte of `_dumps_local`'s bytes when buffers went to shared memory.
_SHARED = b"S"


def _dumps_local(obj: object, in_place: bool | None = None) -> bytes:
    """``obj`` serialized for a process on this machine: its large buffers (numpy arrays'
    data) placed in shared memory, which lives as long as the returned bytes do (shared in
    place as `Segment.holding` says)."""
    buffers: list[pickle.PickleBuffer] = []
    data = dumps(obj, buffers)
    if not buffers:
        return data
    try:
        segment, spans = Segment.holding(list(_raw(buffers)), transient=True, in_place=in_place)
    except OSError:  # no shared memory to be had (descriptors or memory run out): in the bytes
        return dumps(obj)
    return _keeping(_SHARED + pickle.dumps((data, segment.address, spans)), segment)


def _loads_local(data: bytes | memoryview, answer: bool = False) -> Any:
    """The object `dumps` or `_dumps_local` made ``data`` from; shared buffers are mapped
    copy-on-write, so what this process writes into them stays its own. A worker's ``answer``,
    loaded by the caller, may be kept long, with many others: its classes are loaded as
    `loads` says for answers, and its shared buffers are copied unless they are
    large (each mapping holds a file descriptor)."""
    if data[:1] != _SHARED:
        return loads(data, answer=answer)
    body, address, spans = pickle.loads(memoryview(data)[1:])
    parts = _mapped([(address, start, end) for start, end in spans],
                    copy_below=COPIED_ANSWER_BYTES if answer else 0)
    return loads(body, parts, answer=answer)


def _keeping(data: bytes, segment: Segment | None) -> bytes:
    """``data``, keeping ``segment`` alive for as long as it lives."""
    if segment is None:
        return data
    payload = _SharedPayload(data)
    payload.segment = segment
    return payload


def release_shared(data: bytes) -> None:
    """Let go now of the shared memory that bytes from `dump_items` or `dump_task` hold, once
    the task's result is back. Dropping the bytes does it too, but on free-threaded Python bytes
    dropped by another thread than the one that made them may wait for a garbage collection."""
    segment = getattr(data, "segment", None)
    if segment is not None:
        segment.release()


def _raw(buffers: list[pickle.PickleBuffer]) -> Iterator[memoryview]:
    return (buffer.raw() for buffer in buffers)


def _mapped(placed: list[Placement], copy_below: int = 0) -> list[memoryview]:
    """The parts another process placed in shared memory, mapped here copy-on-write (each
    segment once); or copied, from segments smaller than ``copy_below`` bytes."""
    segments: dict[Address, memoryview] = {}
    parts = []
    for address, start, end in placed:
        if address not in segments:
            segments[address] = memoryview(copy_of(address) if address.size < copy_below
                                           else attach(address, shared=False))
        parts.append(segments[address][start:end])
    return parts


def dump_items(task: Task, local: bool = False) -> bytes:
    """The items of ``task`` with their input indices, for `run_items` in a worker.

    ``local``: the worker is on this machine. Large buffers among the items (numpy arrays'
    data) then go through shared memory that the worker maps instead of receiving a copy; it
    lives as long as the returned bytes, which the caller keeps until the task's result is back
    (and then passes to `release_shared`).
    """
    try:
        items = (_dumps_local(list(task.items), task.call.share_in_place) if local
                 else dumps(list(task.items)))
    except Exception as exc:
        pairs = zip(task.indices, task.items, strict=True)
        named = [(f"input item {index}", item) for index, item in pairs]
        raise _first_unserializable(named, exc, task.indices) from exc
    payload = pickle.dumps((task.indices, items), protocol=pickle.HIGHEST_PROTOCOL)
    return _keeping(payload, getattr(items, "segment", None))


def run_items(call: Call, data: bytes, values: list[Any] | None = None,
              local: bool = False) -> bytes:
    """Worker side: run the items `dump_items` made ``data`` from; answer the dumped Result.

    ``values``, if given, is the list the values are appended to as they come (a backend may
    watch its length to report progress during a long task). ``local``: the caller is on this
    machine; large buffers among the values then go through shared memory, which lives as long
    as the answer: keep it until the caller has read it with `load_result`.
    """
    indices, items = pickle.loads(data)
    try:
        items = _loads_local(items)
    except BaseException as exc:  # a __setstate__'s SystemExit too: the item's, not the worker's
        return unloadable(data, "the items", exc)
    result = run_task(Task(call, indices, items), values)
    if in_fork_of_worker():  # the task forked, and this is the fork, back from the task (or
        failure = result.failure  # raising, sys.exit included): it answers nothing, and ends
        leave_fork(None if failure is None else failure.exception)
    if result.failure is not None:
        _make_portable(result.failure)
    try:
        return _dumps_local(result) if local else dumps(result)
    except BaseException as exc:  # a __reduce__'s SystemExit too: that result's, not the worker's
        return dumps(_sendable(result, indices, items, exc))


def answer_holds_shared(answer: bytes | memoryview) -> bool:
    """Whether an answer of `run_items` (with ``local``) placed values in shared memory: only
    such an answer need be kept until the caller has read it, on either side."""
    return answer[:1] == _SHARED


def unloadable(data: bytes, what: str, cause: BaseException) -> bytes:
    """Worker side: the dumped Result of a task (``data`` from `dump_items`) that cannot run
    because ``what`` (its items, or its call) cannot be deserialized here."""
    import traceback  # not at import: a worker that never fails never needs it

    indices, _ = pickle.loads(data)
    error = ParforError(f"{what} cannot be deserialized in worker process {os.getpid()}: "
                        f"{type(cause).__name__}: {cause}{_advice_on_loading(cause)}")
    failure = Failure(indices[0], "not deserialized", error,
                      "".join(traceback.format_exception(cause)), describe_worker())
    return dumps(Result([], 0.0, failure))


def _advice_on_loading(cause: BaseException) -> str:
    """What to do about an object that a worker cannot load, where the cause tells."""
    if isinstance(cause, ModuleNotFoundError):
        return (f". If the caller has the module {cause.name!r} but a worker cannot import "
                "it (made at run time, or loaded from a file outside sys.path), send what it "
                "defines by value with cloudpickle.register_pickle_by_value(module), or put "
                "its folder on sys.path")
    return ""


def dump_task(task: Task) -> bytes:
    """All a worker process needs to run ``task`` with `execute_dumped`, in one message.

    For executors that pick the worker themselves, on this machine; the call travels with every
    task (large ones as the address of shared memory), and each worker loads it once. Large
    buffers among the items go through shared memory too, which lives as long as the returned
    bytes: an executor keeps them (its task's argument) until the result is back. Raises
    SerializationError naming what cannot be sent.
    """
    items = dump_items(task, local=True)
    payload = pickle.dumps((task.call.id, share_call(task.call), items),
                           protocol=pickle.HIGHEST_PROTOCOL)
    return _keeping(payload, getattr(items, "segment", None))


def execute_dumped(payload: bytes) -> bytes:
    """Worker side: run a task `dump_task` made and answer the dumped Result.

    Call ``parfor_core.mark_worker_process`` once in each worker process (an executor's
    initializer), so that nested calls there run serially.
    """
    call_id, shared, items = pickle.loads(payload)
    _forget_released_calls()
    return _run_cached(call_id, partial(_load_and_watch, call_id, shared), items)


def _load_and_watch(call_id: str, shared: bytes) -> Call:
    """Load a shared call (with `_worker_calls_lock` held), and watch its shared memory."""
    global _sweeper
    call = load_shared_call(call_id, shared)
    placed = pickle.loads(shared)[1]
    if placed is not None:  # the body's segment, which goes with the call
        _worker_segments[call_id] = placed[0][0]
        if _sweeper is None:
            _sweeper = threading.Thread(target=_sweep, name="parfor-shared-memory", daemon=True)
            _sweeper.start()
    return call


def _forget_released_calls() -> None:
    """Drop cached calls whose caller has released their shared memory (the call is over), so
    that their memory is freed now, not when newer calls push them out of the cache. For
    executors that pick the worker themselves and cannot tell a worker that a call ended."""
    with _worker_calls_lock:
        for call_id, address in list(_worker_segments.items()):
            if not still_shared(address):
                del _worker_segments[call_id]
                _worker_calls.pop(call_id, None)


def _sweep() -> None:
    """A worker's watcher, while it holds shared calls: an idle worker, which runs no task
    that would look, lets go of a finished call's memory within `SWEEP_SECONDS` too."""
    global _sweeper
    while True:
        time.sleep(SWEEP_SECONDS)
        _forget_released_calls()
        with _worker_calls_lock:
            if not _worker_segments:
                _sweeper = None
                return


def execute_call(call_id: str, fetch: Callable[[], bytes], items: bytes) -> bytes:
    """Worker side: run ``items`` (from `dump_items`) of the call ``call_id``; answer the
    dumped Result.

    ``fetch()`` gives the call's bytes (from `dump_call`), and is only called when this worker
    has not loaded that call yet: for backends that ship a call once through a store of their
    own (Dask's scatter, Ray's object store).
    """
    return _run_cached(call_id, lambda: load_call(call_id, fetch()), items)


def _run_cached(call_id: str, load: Callable[[], Call], items: bytes) -> bytes:
    """Run ``items`` of the call ``call_id``; ``load()`` gives the call, and is only called
    when this worker process does not hold it yet."""
    with _worker_calls_lock:  # threads of one worker (Dask's) share it, and load a call once
        call = _worker_calls.get(call_id)
        if call is not None:
            _worker_calls.move_to_end(call_id)
        else:
            try:
                call = _worker_calls[call_id] = load()
            except BaseException as exc:  # a __setstate__'s SystemExit too: not the worker's
                return unloadable(items, "the function or its extra arguments", exc)
            while len(_worker_calls) > CACHED_CALLS:
                _worker_segments.pop(_worker_calls.popitem(last=False)[0], None)
    return run_items(call, items)


class _Rebuilt:
    """Sends an exception as class, args and attributes: many exception classes cannot be
    unpickled the usual way (an ``__init__`` with required arguments). A group is sent with
    its members made portable each (``members``)."""

    def __init__(self, exception: BaseException, members: list[Any] | None = None) -> None:
        self.exception = exception
        self.members = members

    def __reduce__(self) -> tuple[object, ...]:
        exc, state = self.exception, getattr(self.exception, "__dict__", {})
        if self.members is not None:
            return rebuild_group, (type(exc), exc.message, self.members, state)  # type: ignore[attr-defined]
        return rebuild_exception, (type(exc), exc.args, state)


class _AsItself:
    """Sends an exception by its own reduction, not one that a library registered for every
    exception: Dask's workers install tblib's, which drops the fields that a builtin exception
    keeps in C (``errno``, ``SystemExit.code``)."""

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def __reduce__(self) -> str | tuple[Any, ...]:
        return self.exception.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())  # Python 3.11 on


def _make_portable(failure: Failure) -> None:
    """Make sure the caller can rebuild the exception, of its own type where at all possible,
    and the exception it was raised from (``raise ... from``), which would not cross with it."""
    cause = failure.exception.__cause__
    failure.exception = _portable(failure.exception)
    if cause is not None:
        failure.cause = _portable(cause)


def _portable(original: BaseException) -> Any:
    """``original``, or what the caller can rebuild it from (also each member of a group);
    a ParforError that describes it where nothing can be sent."""
    if isinstance(original, _GROUP):  # rebuilt first: a member may reword its arguments
        members = [_portable(member) for member in original.exceptions]
        candidates: tuple[Any, ...] = (_Rebuilt(original, members), _AsItself(original))
    else:
        candidates = (_AsItself(original), _Rebuilt(original))
        if (type(original).__init__ is not BaseException.__init__  # it may reword arguments
                and type(original).__module__ != "builtins"):  # theirs pickle with C fields
            candidates = candidates[::-1]
    for candidate in candidates:
        try:
            loads(dumps(candidate))
        except Exception as exc:
            problem = exc
        else:
            return candidate
    return ParforError(
        f"{type(original).__module__}.{type(original).__qualname__}: {original} (the "
        f"original exception cannot be sent back from the worker: "
        f"{type(problem).__name__}: {problem})"
    )


def _sendable(result: Result, indices: list[int], items: list[Any], cause: BaseException
              ) -> Result:
    """Replace what cannot be sent back to the parent by a Failure that names it."""
    for position, value in enumerate(result.values):
        try:
            dumps(value)
        except BaseException as exc:
            error = SerializationError(f"the result of input item {indices[position]}", value, exc)
            failure = Failure.capture(indices[position], items[position], error)
            return Result(result.values[:position], result.elapsed, failure)
    error = ParforError(
        f"The results of input items {indices[0]} to {indices[-1]} cannot be sent back from "
        f"the worker together (too large or too deeply nested?): {type(cause).__name__}: {cause}"
    )
    return Result([], result.elapsed, Failure.capture(indices[0], items[0], error))


def load_result(data: bytes) -> Result:
    """Parent side: the Result a worker sent; the caller's own classes in it stay as the caller
    has them now."""
    try:
        return _loads_local(data, answer=True)
    except Exception as exc:
        raise NotLoadedHere() from exc
