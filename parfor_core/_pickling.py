"""Bytes from objects and back, for whatever crosses to a worker process and back.

cloudpickle first: it is the C pickler for plain data, and carries by value what a worker cannot
import by name: lambdas, closures, and functions and classes of the caller's ``__main__``. Its
class tracker keeps such a class one class: sent twice (with the function, with the items), it
is one class in the worker, and sent back it is the caller's own class again, so ``isinstance``
holds on both sides. What cloudpickle refuses goes through dill, which carries more kinds of
objects (locks, for one).
"""

from __future__ import annotations

import pickle
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
    import cloudpickle

    taken: list[pickle.PickleBuffer] = []

    def take(buffer: pickle.PickleBuffer) -> bool:
        if out_of_band is None or memoryview(buffer).nbytes < OUT_OF_BAND_BYTES:
            return True  # in-band
        taken.append(buffer)
        return False

    try:
        data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=take)
    except Exception:
        import dill

        return _DILL + dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    if out_of_band is not None:
        out_of_band.extend(taken)
    return _CLOUDPICKLE + data


def loads(data: bytes | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """The object ``dumps`` made these bytes from (and the buffers it left out, in order)."""
    body = memoryview(data)[1:]
    if data[:1] == _CLOUDPICKLE:
        return pickle.loads(body, buffers=buffers)
    import dill

    return dill.loads(body)
