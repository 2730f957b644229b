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
from typing import Any

_CLOUDPICKLE, _DILL = b"C", b"D"


def dumps(obj: object) -> bytes:
    """Serialize ``obj`` for another process; raises what dill raises when neither can."""
    import cloudpickle

    try:
        return _CLOUDPICKLE + cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import dill

        return _DILL + dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)


def loads(data: bytes) -> Any:
    """The object ``dumps`` made these bytes from."""
    body = memoryview(data)[1:]
    if data[:1] == _CLOUDPICKLE:
        return pickle.loads(body)
    import dill

    return dill.loads(body)
