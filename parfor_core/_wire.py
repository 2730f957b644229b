"""The task protocol for backends whose workers are other processes.

The parent turns a Task into bytes with ``dump_task``; the worker runs ``execute_dumped`` on them
and answers bytes that ``load_result`` turns back into a Result. A call's function and extra
arguments are serialized once per call; large ones travel through a private file that each worker
reads once, so a big argument is not copied per task.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import weakref
from collections import OrderedDict
from typing import Any

from ._pickling import dumps, loads
from ._task import Call, Failure, Result, Task, run_task
from .errors import ParforError, SerializationError, rebuild_exception

#: Serialized calls above this size are written to a file instead of riding along with each task.
LARGE_CALL_BYTES = 1 << 20
#: How many calls a worker keeps deserialized, for callers that interleave several calls.
CACHED_CALLS = 4

_worker_calls: OrderedDict[str, tuple[Any, ...]] = OrderedDict()


def _first_unserializable(named: list[tuple[str, object]], cause: Exception) -> SerializationError:
    """Find which of several objects cannot be serialized, to name it in the error."""
    for what, obj in named:
        try:
            dumps(obj)
        except Exception as exc:
            return SerializationError(what, obj, exc)
    return SerializationError("the combination of " + ", ".join(w for w, _ in named),
                              tuple(o for _, o in named), cause)


def _call_wire(call: Call) -> tuple[str, bytes | None, str | None]:
    """(id, inline bytes or None, file path or None) of a call, made once per call."""
    if call._wire is None:
        state = (call.fun, call.args, call.kwargs, call.unpack)
        try:
            data = dumps(state)
        except Exception as exc:
            named = [("the function", call.fun)]
            named += [(f"extra argument args[{i}]", a) for i, a in enumerate(call.args)]
            named += [(f"extra argument kwargs[{k!r}]", v) for k, v in call.kwargs.items()]
            raise _first_unserializable(named, exc) from exc
        if len(data) < LARGE_CALL_BYTES:
            call._wire = (call.id, data, None)
        else:
            call._wire = (call.id, None, _write_private_file(data))
            call.releasers.append(weakref.finalize(call, _remove_quietly, call._wire[2]))
    return call._wire


def _write_private_file(data: bytes) -> str:
    """Write to a file only this user can read, in memory-backed /dev/shm where there is one."""
    shm = "/dev/shm"
    directory = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="parfor-call-", dir=directory)  # mode 0600
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def dump_task(task: Task) -> bytes:
    """The bytes a worker process needs to run ``task``; raises SerializationError naming what."""
    wire = _call_wire(task.call)
    try:
        items = dumps(list(task.items))
    except Exception as exc:
        pairs = zip(task.indices, task.items, strict=True)
        named = [(f"input item {index}", item) for index, item in pairs]
        raise _first_unserializable(named, exc) from exc
    return pickle.dumps((wire, list(task.indices), items), protocol=pickle.HIGHEST_PROTOCOL)


def _worker_call(wire: tuple[str, bytes | None, str | None]) -> Call:
    call_id, data, path = wire
    call = _worker_calls.get(call_id)
    if call is None:
        if data is None:
            with open(path, "rb") as file:
                data = file.read()
        fun, args, kwargs, unpack = loads(data)
        call = _worker_calls[call_id] = Call(fun, args, kwargs, unpack)
        while len(_worker_calls) > CACHED_CALLS:
            _worker_calls.popitem(last=False)
    else:
        _worker_calls.move_to_end(call_id)
    return call


def execute_dumped(payload: bytes) -> bytes:
    """Worker side: run a dumped task and answer the dumped Result.

    Call ``parfor_core.mark_worker_process`` once in each worker process (an executor's
    initializer), so that nested calls there run serially.
    """
    wire, indices, items = pickle.loads(payload)
    items = loads(items)
    result = run_task(Task(_worker_call(wire), indices, items))
    if result.failure is not None:
        _make_portable(result.failure)
    try:
        return dumps(result, to_caller=True)
    except Exception as exc:
        return dumps(_sendable(result, indices, items, exc), to_caller=True)


class _Rebuilt:
    """Sends an exception as class, args and attributes: many exception classes cannot be
    unpickled the usual way (an ``__init__`` with required arguments)."""

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def __reduce__(self) -> tuple[object, ...]:
        exc = self.exception
        return rebuild_exception, (type(exc), exc.args, getattr(exc, "__dict__", {}))


def _make_portable(failure: Failure) -> None:
    """Make sure the caller can rebuild the exception, of its own type where at all possible."""
    original = failure.exception
    for candidate in (original, _Rebuilt(original)):
        try:
            loads(dumps(candidate, to_caller=True))
        except Exception as exc:
            problem = exc
        else:
            failure.exception = candidate  # type: ignore[assignment]
            return
    failure.exception = ParforError(
        f"{type(original).__module__}.{type(original).__qualname__}: {original} (the "
        f"original exception cannot be sent back from the worker: "
        f"{type(problem).__name__}: {problem})"
    )


def _sendable(result: Result, indices: list[int], items: list[Any], cause: Exception) -> Result:
    """Replace what cannot be sent back to the parent by a Failure that names it."""
    for position, value in enumerate(result.values):
        try:
            dumps(value, to_caller=True)
        except Exception as exc:
            error = SerializationError(f"the result of input item {indices[position]}", value, exc)
            failure = Failure.capture(indices[position], items[position], error)
            return Result(result.values[:position], result.elapsed, failure)
    error = ParforError(
        f"The results of input items {indices[0]} to {indices[-1]} cannot be sent back from "
        f"the worker together (too large or too deeply nested?): {type(cause).__name__}: {cause}"
    )
    return Result([], result.elapsed, Failure.capture(indices[0], items[0], error))


def load_result(data: bytes) -> Result:
    """Parent side: the Result a worker sent."""
    return loads(data)
