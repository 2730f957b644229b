"""Bytes from objects and back, for whatever crosses to a worker process and back.

cloudpickle first: it is the C pickler for plain data, and carries by value what a worker cannot
import by name: lambdas, closures, and functions and classes of the caller's ``__main__``. Its
class tracker keeps such a class one class: sent twice (with the function, with the items), it
is one class in the worker, and sent back it is the caller's own class again, so ``isinstance``
holds on both sides. A lock crosses as a new one, not held: a copy of one excludes nothing in
another process anyway, and one held where it was copied would be held for ever. What
cloudpickle refuses goes through dill, which carries more kinds of objects; but not a file open
for writing, which dill would reopen in each worker, each then writing over the others' lines:
one open for appending is opened again for appending, and any other is refused.
"""

from __future__ import annotations

import enum
import functools
import io
import os
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Iterable
from typing import Any

_CLOUDPICKLE, _DILL = b"C", b"D"


class Refused(pickle.PicklingError):
    """An object that neither cloudpickle nor dill should carry: dill could, but wrongly."""


#: Buffers this large or larger are left out of the bytes when the caller can place them.
OUT_OF_BAND_BYTES = 1 << 16


def dumps(obj: object, out_of_band: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Serialize ``obj`` for another process; raises what dill raises when neither can (what
    cloudpickle raised, where dill only recursed without end).

    Given a list ``out_of_band``, large buffers (a numpy array's data, say) are left out of the
    bytes and appended to it instead (pickle protocol 5), for ``loads(data, buffers)`` to use
    wherever the caller put them.
    """
    taken: list[pickle.PickleBuffer] = []

    def take(buffer: pickle.PickleBuffer) -> bool:
        if out_of_band is None or memoryview(buffer).nbytes < OUT_OF_BAND_BYTES:
            return True  # in-band
        taken.append(buffer)
        return False

    try:
        with io.BytesIO() as file:
            _pickler_class()(file, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=take).dump(obj)
            data = file.getvalue()
    except Refused:
        raise
    except Exception as refused:
        import dill

        try:
            return _DILL + dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
        except RecursionError:  # dill's own, on functions that call each other, where
            raise refused  # noqa: B904  # cloudpickle's error says what cannot be sent

    if out_of_band is not None:
        out_of_band.extend(taken)
    return _CLOUDPICKLE + data


@functools.cache
def _pickler_class() -> type[pickle.Pickler]:
    """cloudpickle's pickler, with locks sent as new ones (see the module's docstring), and
    singledispatch and cached functions carried by value where need be."""
    from collections import ChainMap

    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc, valid-type]
        def _function_reduce(self, obj: types.FunctionType) -> Any:
            # A singledispatch function by value (one of the caller's script): its default and
            # registered functions, not its cache, which holds weak references.
            if obj.__code__ is _DISPATCHER_CODE and \
                    not cloudpickle.cloudpickle._should_pickle_by_reference(obj):
                return _dispatching, (obj.__wrapped__, dict(obj.registry))  # type: ignore[attr-defined]
            return super()._function_reduce(obj)

        def reducer_override(self, obj: Any,
                             base: Any = cloudpickle.Pickler.reducer_override) -> Any:
            # A class with __slots__, by value: made with them. cloudpickle makes it without,
            # and sets __slots__ as a plain attribute: its instances there have a __dict__, and
            # one sent back cannot be loaded into the caller's class ("no attribute __dict__").
            # Empty slots are left as they were: a NamedTuple refuses them in its namespace.
            # (``base`` is bound once: this runs for every object that is not of a plain type.)
            if isinstance(obj, type) and obj.__dict__.get("__slots__") and \
                    not issubclass(obj, enum.Enum) and \
                    not cloudpickle.cloudpickle._should_pickle_by_reference(obj):
                reduction = cloudpickle.cloudpickle._dynamic_class_reduce(obj)
                reduction[1][3]["__slots__"] = obj.__slots__  # the made class's namespace
                return reduction
            return base(self, obj)

        dispatch_table = ChainMap({type(threading.Lock()): _new_lock,
                                   type(threading.RLock()): _new_reentrant_lock,
                                   types.CodeType: _code_keeping_its_file,
                                   functools._lru_cache_wrapper: _cache_by_value_if_need_be,
                                   **dict.fromkeys(_FILES, _file_as_it_can_cross)},
                                  cloudpickle.Pickler.dispatch_table)

    return Pickler


def _code_keeping_its_file(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    """cloudpickle's reduction of a function's code, with its file name kept: cloudpickle
    writes ``<dynamic-code>`` instead, and a worker's traceback of a function of the caller's
    script then names no file and shows no line of it."""
    from cloudpickle.cloudpickle import _code_reduce

    constructor, arguments = _code_reduce(code)
    return constructor, tuple(code.co_filename if isinstance(argument, str)
                              and argument == "<dynamic-code>" else argument
                              for argument in arguments)


#: The files that `_file_as_it_can_cross` looks at: text, buffered binary and raw.
_FILES = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom, io.FileIO)


def _file_as_it_can_cross(file: Any) -> str | tuple[Any, tuple[Any, ...]]:
    """A file as it can cross: a standard stream (or its bytes) as the worker's own; a file
    open for appending (or the null device) opened again for appending, each line written at
    once; a text file open for reading as a copy of its text (cloudpickle's way). Any other
    file open for writing is refused: a copy would lose the writes, and dill's reopening of it
    in each worker would write each worker's lines over the others'."""
    import sys

    from cloudpickle.cloudpickle import _file_reduce

    for name in ("stdout", "stderr"):
        for stream in (getattr(sys, name), getattr(sys, f"__{name}__")):
            if file is stream:
                return getattr, (sys, name)
            if file is getattr(stream, "buffer", None):
                return _buffer_of, (name,)
    if file.closed or not file.writable():
        if not isinstance(file, io.TextIOWrapper):
            raise pickle.PicklingError("a binary file: for dill, which opens it again")
        return _file_reduce(file)  # type: ignore[no-any-return]
    if isinstance(file.name, str) and (file.mode in ("a", "ab") or file.name == os.devnull):
        return _appending, (os.path.abspath(file.name), "b" in file.mode,
                            getattr(file, "encoding", None), getattr(file, "errors", None))
    raise Refused(f"the file {file.name!r} is open for writing ({file.mode!r}): a copy of it in "
                  "another process would write over its lines. Open it for appending (mode "
                  "'a'), open it in the function, or return what to write and write it here")


def _buffer_of(name: str) -> Any:
    import sys

    return getattr(sys, name).buffer


def _appending(path: str, binary: bool, encoding: str | None, errors: str | None) -> Any:
    """A file opened again for appending, whose writes (text: each line) reach it at once, so
    that the caller finds all of them there when the call is over.

    Its descriptor closes when the file is let go, with the call that brought it: quietly, as
    a file the worker's user never opened must not warn that it was left open."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    if binary:
        file = open(descriptor, "ab", buffering=0, closefd=False)
        file.name = path
    else:
        file = open(descriptor, "a", buffering=1, encoding=encoding, errors=errors,
                    closefd=False)
        file.buffer.raw.name = path
    weakref.finalize(file, os.close, descriptor)
    return file


def _cache_by_value_if_need_be(wrapper: Any) -> str | tuple[Any, tuple[Any, ...]]:
    """An ``lru_cache`` (or ``cache``) function by its name where a worker can import it; else,
    a function of the caller's script say, its function by value in a new cache (pickle would
    look for ``__main__.fib`` in the worker, whose ``__main__`` is not the script)."""
    from cloudpickle.cloudpickle import _is_registered_pickle_by_value, _lookup_module_and_qualname

    found = _lookup_module_and_qualname(wrapper)
    if found is not None and not _is_registered_pickle_by_value(found[0]):
        return wrapper.__reduce__()  # type: ignore[no-any-return]
    parameters = wrapper.cache_parameters()
    return _cached, (wrapper.__wrapped__, parameters["maxsize"], parameters["typed"])


def _cached(fun: Any, maxsize: int | None, typed: bool) -> Any:
    return functools.lru_cache(maxsize=maxsize, typed=typed)(fun)


#: The code of every function that ``functools.singledispatch`` makes (not of one that another
#: decorator wrapped around it, which has its attributes too).
_DISPATCHER_CODE = functools.singledispatch(repr).__code__  # type: ignore[attr-defined]


def _dispatching(default: Any, registry: dict[type, Any]) -> Any:
    """A singledispatch function again (`_pickler_class`), with what was registered for
    ``object`` too, in place of its first default."""
    dispatcher = functools.singledispatch(default)
    for cls, fun in registry.items():
        dispatcher.register(cls, fun)
    return dispatcher


def _new_lock(lock: object) -> tuple[Any, tuple[()]]:
    return threading.Lock, ()


def _new_reentrant_lock(lock: object) -> tuple[Any, tuple[()]]:
    return threading.RLock, ()


def loads(data: bytes | memoryview, buffers: Iterable[Any] = (), answer: bool = False) -> Any:
    """The object ``dumps`` made these bytes from (and the buffers it left out, in order).

    An ``answer`` (a worker's, loaded by the caller) is loaded as the caller has things now:
    its classes that come back (a ``__main__`` class's instance as a result) keep their state
    here, which cloudpickle would set to that of the sender's copy, undoing what the caller
    changed since (``Settings.limit = 50``); and what it names in a module that is still being
    imported is taken from the module as it stands, as the import may be the caller's, waiting
    for this answer (a pmap at a module's top level), where Python would wait for it to end.
    """
    body = memoryview(data)[1:]
    if data[:1] == _CLOUDPICKLE:
        if answer and (_carries_classes(body) or _imports_under_way()):
            return _Answer(io.BytesIO(body), buffers=buffers).load()
        return pickle.loads(body, buffers=buffers)
    import dill

    if answer and _imports_under_way():
        return _dill_answer_class()(io.BytesIO(body)).load()
    return dill.loads(body)


def _imports_under_way() -> bool:
    """Whether some thread is importing a module now (on most loads, none is)."""
    import importlib._bootstrap

    return bool(getattr(importlib._bootstrap, "_module_locks", True))


class _NotWaitingOnImports:
    """An unpickler that takes what it names in a module still being imported from the module
    as it stands, rather than wait for its import to end (`loads` of an answer)."""

    def find_class(self, module: str, name: str) -> Any:
        loaded = sys.modules.get(module)
        if getattr(getattr(loaded, "__spec__", None), "_initializing", False):
            found: Any = loaded
            try:
                for part in name.split("."):
                    found = getattr(found, part)
                return found
            except AttributeError:  # not there yet: wait, as Python does
                pass
        return super().find_class(module, name)  # type: ignore[misc]


@functools.cache
def _dill_answer_class() -> type:
    import dill

    return type("_DillAnswer", (_NotWaitingOnImports, dill.Unpickler), {})


#: In the bytes of anything that carries a class by value (see `_Answer`).
_CLASS_STATE = b"_class_setstate"
#: cloudpickle's makers of classes carried by value, and where their tracking id is in their
#: arguments: by that id, a class that exists here already is found instead of made.
_CLASS_MAKERS = {"_make_skeleton_class": 4, "_make_skeleton_enum": 5}


def _carries_classes(body: memoryview) -> bool:
    whole = body.obj
    return _CLASS_STATE in (whole if isinstance(whole, (bytes, bytearray)) else body.tobytes())


class _Answer(_NotWaitingOnImports, pickle.Unpickler):
    """Loads an answer (see `loads`): classes carried by value, but leaving the state of those
    that exist here as it is."""

    def __init__(self, file: io.BytesIO, buffers: Iterable[Any]) -> None:
        super().__init__(file, buffers=buffers)
        self._found: list[type] = []  # the classes that existed here: their state stays

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module == "cloudpickle.cloudpickle":
            if name in _CLASS_MAKERS:
                return functools.partial(self._make, found, _CLASS_MAKERS[name])
            if name == "_class_setstate":
                return functools.partial(self._set_state, found)
        return found

    def _make(self, make: Any, id_at: int, *arguments: Any) -> type:
        from cloudpickle.cloudpickle import _DYNAMIC_CLASS_TRACKER_BY_ID

        existing = _DYNAMIC_CLASS_TRACKER_BY_ID.get(arguments[id_at])
        made: type = make(*arguments)
        if made is existing:
            self._found.append(made)
        return made

    def _set_state(self, set_state: Any, cls: type, state: Any) -> type:
        if any(cls is found for found in self._found):
            return cls
        return set_state(cls, state)  # type: ignore[no-any-return]
