"""Chunks: split one or more long iterables into bite-sized lists to hand to a function whole."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from itertools import islice, repeat
from typing import Any

from ._arguments import check_count
from ._registry import available_cpus
from .errors import warn


class Chunks:
    """Yield an iterable in consecutive lists; several iterables in lists of lists, side by side.

    Choose how with one of:

    - ``size``: at most this many items per chunk (sizes are evened out between chunks);
    - ``number``: this many chunks;
    - ``ratio``: this many chunks per CPU.

    ``size`` with ``number`` or ``ratio`` uses the number, unless chunks would then exceed
    ``size``. With none of them, one chunk per CPU. ``s``, ``n`` and ``r`` are deprecated
    aliases of ``size``, ``number`` and ``ratio``. ``length`` gives the number of items where
    ``len()`` does not work; with ``size`` alone no length is needed, and the chunks stream.
    """

    def __init__(
        self,
        *iterables: Iterable[Any],
        size: int | None = None,
        number: int | None = None,
        ratio: float | None = None,
        length: int | None = None,
        s: int | None = None,
        n: int | None = None,
        r: float | None = None,
    ) -> None:
        size, number, ratio = (_renamed(old, value, new) for old, value, new in
                               (("s", s, size), ("n", n, number), ("r", r, ratio)))
        if not iterables:
            raise TypeError("Chunks needs at least one iterable")
        size, number, length = (None if value is None else check_count(f"Chunks: {name}",
                                                                        value, minimum)
                                for name, value, minimum in (("size", size, 1),
                                                             ("number", number, 1),
                                                             ("length", length, 0)))
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio < math.inf):
            raise ValueError(f"Chunks: ratio must be a finite number above 0, got {ratio!r}")
        self.iterables = iterables
        self.size = size
        if length is None:
            try:
                length = min(len(iterable) for iterable in iterables)  # type: ignore[arg-type]
            except TypeError:
                if size is None or number is not None or ratio is not None:
                    raise TypeError(
                        "Chunks cannot tell how many items there are (len() fails on the "
                        "input): give length=, or size= alone to stream chunks of that size"
                    ) from None
        self.number_of_items = length
        self.lengths: list[int] | None = None
        if length is not None:
            count = _chunk_count(length, size, number, ratio)
            self.lengths = [(i + 1) * length // count - i * length // count for i in range(count)]

    def __len__(self) -> int:
        if self.lengths is None:
            raise TypeError("the number of chunks is unknown: the input has no len() and no "
                            "length= was given")
        return len(self.lengths)

    def __iter__(self) -> Iterator[Any]:
        iterators = [iter(iterable) for iterable in self.iterables]
        sizes = self.lengths if self.lengths is not None else repeat(self.size or 1)
        for size in sizes:
            parts = [list(islice(iterator, size)) for iterator in iterators]
            shortest = min(len(part) for part in parts)
            if self.lengths is None:
                if shortest == 0:
                    return
                parts = [part[:shortest] for part in parts]
            elif shortest < size:
                raise ValueError(f"Chunks: the input ended after fewer items than its length "
                                 f"({self.number_of_items}): give the right length=, and "
                                 "iterate Chunks of a generator only once")
            yield parts[0] if len(parts) == 1 else parts

    def __repr__(self) -> str:
        known = "unknown" if self.lengths is None else len(self.lengths)
        return f"Chunks(number of chunks={known}, items={self.number_of_items})"


def _chunk_count(length: int, size: int | None, number: int | None, ratio: float | None) -> int:
    if length == 0:
        return 0
    if ratio is not None:
        number = max(1, round(available_cpus() * ratio))
    if number is None:
        number = math.ceil(length / size) if size is not None else available_cpus()
    elif size is not None and length > size * number:
        number = math.ceil(length / size)
    return max(1, min(number, length))


_NEW_NAMES = {"s": "size", "n": "number", "r": "ratio"}


def _renamed(old: str, value: Any, new_value: Any) -> Any:
    """The value of ``size``, ``number`` or ``ratio``, given by its deprecated name ``old``."""
    if value is None:
        return new_value
    new = _NEW_NAMES[old]
    warn(f"parfor: Chunks' {old!r} is deprecated, use {new!r} instead", DeprecationWarning)
    if new_value is not None:
        raise TypeError(f"Chunks got both {old!r} and {new!r} (its new name): give {new!r} only")
    return value
