"""Bytes from objects and back: the C pickler, with dill for what only dill can carry.

Plain pickle is fast but refers to functions and classes by name, and a worker process has
neither the caller's ``__main__`` nor its local functions and lambdas. Those alone travel by
value, serialized with dill; everything else goes through the C pickler. On the way back,
``__main__`` classes and functions travel by name again, so the caller gets instances of its own
classes (``isinstance`` keeps working). Whatever the C pickler refuses goes through dill whole.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
import types
from typing import Any

_PICKLE, _DILL = b"P", b"D"

# In a worker: the caller's __main__ functions and classes, as they arrived by value.
_arrived_from_main: dict[str, Any] = {}


def dumps(obj: object, *, to_caller: bool = False) -> bytes:
    """Serialize ``obj`` for a worker, or for the caller when ``to_caller`` is set."""
    buffer = io.BytesIO()
    buffer.write(_PICKLE)
    try:
        _Pickler(buffer, to_caller).dump(obj)
    except Exception:
        import dill

        return _DILL + dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """The object ``dumps`` made these bytes from."""
    body = memoryview(data)[1:]
    if data[:1] == _PICKLE:
        return pickle.loads(body)
    import dill

    return dill.loads(body)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, to_caller: bool) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.to_caller = to_caller

    def reducer_override(self, obj: object) -> Any:
        if not isinstance(obj, (types.FunctionType, type)):
            return NotImplemented
        qualname = getattr(obj, "__qualname__", "")
        local = "<locals>" in qualname or "<lambda>" in qualname
        from_main = getattr(obj, "__module__", None) == "__main__"
        if not (from_main or local):
            return NotImplemented
        if self.to_caller and _arrived_from_main.get(qualname) is obj:
            return _from_main, (qualname,)  # the caller's own object: back by name
        import dill

        data = dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
        named = from_main and not local and _main_attribute(qualname) is obj
        return _by_value, (data, qualname if named else None)


def _by_value(data: bytes, main_name: str | None) -> Any:
    import dill

    obj = dill.loads(data)
    if main_name is not None:
        _remember_main(obj)
    return obj


def _remember_main(obj: Any, seen: set[int] | None = None) -> None:
    """Note a ``__main__`` object of the caller that arrived by value (the latest under its
    name), and those its globals brought along, so that the worker can send them back by name."""
    seen = set() if seen is None else seen
    if getattr(obj, "__module__", None) != "__main__" or id(obj) in seen:
        return
    seen.add(id(obj))
    _arrived_from_main[obj.__qualname__] = obj
    for name, value in getattr(obj, "__globals__", {}).items():
        if isinstance(value, (types.FunctionType, type)) and value.__qualname__ == name:
            _remember_main(value, seen)


def _main_attribute(qualname: str) -> Any:
    try:
        return functools.reduce(getattr, qualname.split("."), sys.modules["__main__"])
    except AttributeError:
        return None


def _from_main(qualname: str) -> Any:
    """The caller's own ``__main__`` object of that name (in a worker: the copy it received)."""
    found = _main_attribute(qualname)
    if found is None:
        found = _arrived_from_main.get(qualname)
    if found is None:
        raise AttributeError(f"__main__ has no attribute {qualname!r}")
    return found
