"""SharedArray: a numpy array in shared memory, which workers on this machine write into.

Sent to a worker process it travels as the address of its memory, not its data: the worker maps
the same memory, so what one writes, the caller and the other workers see. The memory is freed
when the last array (or view) using it is gone in every process, and by the kernel if the
processes are killed: nothing is ever left behind. numpy is only needed by who uses it.
"""

from __future__ import annotations

import math
import operator
import os
import weakref
from collections.abc import Sequence
from typing import Any

try:
    import numpy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("parfor's SharedArray needs numpy: pip install numpy") from exc

from ._shared import Address, Segment, attach
from ._task import inside_worker

#: Mappings of segments made by other processes, so that one segment is mapped once here.
_attached: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class _Memory:
    """The shared memory behind a SharedArray and its views: where it is, and where it lies
    in this process. Keeps the segment (in the process that made it) or the mapping alive."""

    __slots__ = ("address", "start", "end", "owner", "keep", "__weakref__")

    def __init__(self, address: Address, buffer: Any, owner: int, keep: object) -> None:
        self.address, self.owner, self.keep = address, owner, keep
        self.start = numpy.frombuffer(buffer, numpy.uint8).__array_interface__["data"][0]
        self.end = self.start + address.size

    def holds(self, array: numpy.ndarray) -> bool:
        low, high = _byte_bounds(array)
        return self.start <= low and high <= self.end


def _dimensions(shape: object) -> tuple[int, ...]:
    """``shape`` as numpy takes it (a whole number, or a sequence of them; numpy's integers
    too), checked as numpy checks it."""
    try:
        dimensions = (operator.index(shape),)  # type: ignore[arg-type]
    except TypeError:
        try:
            dimensions = tuple(operator.index(n) for n in shape)  # type: ignore[attr-defined]
        except TypeError:
            raise TypeError(f"A SharedArray's shape is a whole number or a sequence of them, "
                            f"got {shape!r}") from None
    if any(n < 0 for n in dimensions):
        raise ValueError(f"negative dimensions are not allowed, got shape {shape!r}")
    return dimensions


class SharedArray(numpy.ndarray):
    """A numpy array whose memory parfor's workers on this machine share with the caller.

    Pass it (or a view of it) to workers as an argument or item: they write into the same
    memory, and the caller sees what they wrote. ``SharedArray(shape, dtype=float)`` is filled
    with zeros; ``SharedArray.from_array(a)`` copies ``a``. Writes are not atomic: let each task
    write its own part. A worker on another machine cannot map it (a clear error says so).
    """

    _memory: _Memory | None = None

    def __new__(cls, shape: int | Sequence[int], dtype: Any = float,
                order: str = "C") -> SharedArray:
        dtype = numpy.dtype(dtype)
        if dtype.hasobject:
            raise TypeError(f"A SharedArray holds plain data (numbers, booleans, fixed-size "
                            f"strings, records of them), not Python objects: dtype {dtype}")
        shape = _dimensions(shape)
        segment = Segment(math.prod(shape) * dtype.itemsize)
        buffer = segment.map()
        array = numpy.ndarray.__new__(cls, shape, dtype, buffer, 0, None, order)
        array._memory = _Memory(segment.address, buffer, os.getpid(), segment)
        return array

    @classmethod
    def from_array(cls, array: Any) -> SharedArray:
        """A SharedArray holding a copy of ``array`` (anything numpy.asarray takes)."""
        source = numpy.asarray(array)
        shared = cls(source.shape, source.dtype)
        shared[...] = source
        return shared

    def __array_finalize__(self, obj: Any) -> None:
        memory = getattr(obj, "_memory", None)
        # A view keeps the memory; a new array made from this one (a + 1) does not share it.
        self._memory = memory if memory is not None and memory.holds(self) else None

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False
                       ) -> Any:
        # What a computation makes (a + 1, a.sum()) is new memory: a plain array or a scalar,
        # as numpy.memmap does.
        if array is self:
            return self
        plain = numpy.asarray(array)
        return plain[()] if plain.ndim == 0 else plain

    def __reduce_ex__(self, protocol: Any) -> Any:
        memory = self._memory
        if memory is None:  # a new array computed from one (a + 1): a plain array's data
            return numpy.asarray(self).__reduce_ex__(protocol)
        if memory.owner == os.getpid() and inside_worker():
            # Made by a worker, which may let it go before the caller maps it: sent by value,
            # and a SharedArray again on the other side.
            return SharedArray.from_array, (numpy.asarray(self),)
        data = self.__array_interface__["data"][0]
        return _attach_view, (memory.address, memory.owner, data - memory.start, self.shape,
                              self.dtype, self.strides)

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Let no new worker map this memory; it is freed when the arrays using it are gone."""
        if self._memory is not None and isinstance(self._memory.keep, Segment):
            self._memory.keep.release()


def _attach_view(address: Address, owner: int, offset: int, shape: tuple[int, ...],
                 dtype: numpy.dtype, strides: tuple[int, ...]) -> SharedArray:
    """The view a SharedArray sent from another process stands for, in the same memory."""
    memory = _attached.get(address.inode)
    if memory is None or memory.address != address:
        buffer = attach(address, shared=True)
        memory = _attached[address.inode] = _Memory(address, buffer, owner, buffer)
    view = numpy.ndarray.__new__(SharedArray, shape, dtype, memory.keep, offset, strides)
    view._memory = memory
    return view


def _byte_bounds(array: numpy.ndarray) -> tuple[int, int]:
    """The first and one-past-last byte addresses that ``array`` touches."""
    low = high = array.__array_interface__["data"][0]
    for extent, stride in zip(array.shape, array.strides, strict=True):
        if extent == 0:
            return low, low
        reach = (extent - 1) * stride
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    return low, high + array.itemsize
