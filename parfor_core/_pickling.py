"""Bytes from objects and back, for whatever crosses to a worker process and back.

cloudpickle first: it is the C pickler for plain data, and carries by value what a worker cannot
import by name: lambdas, closures, and functions and classes of the caller's ``__main__``. Its
class tracker keeps such a class one class: sent twice (with the function, with the items), it
is one class in the worker, and sent back it is the caller's own class again, so ``isinstance``
holds on both sides. A lock crosses as a new one, not held: a copy of one excludes nothing in
another process anyway, and one held where it was copied would be held for ever. What
cloudpickle refuses goes through dill, which carries more kinds of objects.
"""

from __future__ import annotations

import functools
import io
import pickle
import threading
from collections.abc import Iterable
from typing import Any

_CLOUDPICKLE, _DILL = b"C", b"D"


#: Buffers this large or larger are left out of the bytes when the caller can place them.
OUT_OF_BAND_BYTES = 1 << 16


def dumps(obj: object, out_of_band: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Serialize ``obj`` for another process; raises what dill raises when neither can.

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
    except Exception:
        import dill

        return _DILL + dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    if out_of_band is not None:
        out_of_band.extend(taken)
    return _CLOUDPICKLE + data


@functools.cache
def _pickler_class() -> type[pickle.Pickler]:
    """cloudpickle's pickler, with locks sent as new ones (see the module's docstring)."""
    from collections import ChainMap

    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc, valid-type]
        dispatch_table = ChainMap({type(threading.Lock()): _new_lock,
                                   type(threading.RLock()): _new_reentrant_lock},
                                  cloudpickle.Pickler.dispatch_table)

    return Pickler


def _new_lock(lock: object) -> tuple[Any, tuple[()]]:
    return threading.Lock, ()


def _new_reentrant_lock(lock: object) -> tuple[Any, tuple[()]]:
    return threading.RLock, ()


def loads(data: bytes | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """The object ``dumps`` made these bytes from (and the buffers it left out, in order)."""
    body = memoryview(data)[1:]
    if data[:1] == _CLOUDPICKLE:
        return pickle.loads(body, buffers=buffers)
    import dill

    return dill.loads(body)
