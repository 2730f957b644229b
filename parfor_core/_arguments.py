"""Checks of the arguments every entry point shares, so mistakes fail at once with a clear cause."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ._registry import available_cpus
from ._task import Call


def make_call(fun: object, args: object, kwargs: object) -> Call:
    """The Call of ``fun(item, *args, **kwargs)``, after checking each part."""
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__} {fun!r}")
    if args is None:
        args = ()
    elif not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of extra positional arguments for fun, got "
                        f"{type(args).__name__} {args!r}; did you mean args=({args!r},)?")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict of extra keyword arguments for fun, got "
                        f"{type(kwargs).__name__} {kwargs!r}")
    return Call(fun, args, kwargs)  # type: ignore[arg-type]


def n_workers(n_processes: object) -> int:
    """The number of workers asked for, or every available CPU."""
    if n_processes is None:
        return available_cpus()
    if isinstance(n_processes, bool) or not isinstance(n_processes, int) or n_processes < 1:
        raise ValueError(f"n_processes must be a whole number of at least 1, got {n_processes!r}")
    return n_processes


def total_of(iterable: object, total: object, length: object) -> int | None:
    """How many items to expect: ``total``, the deprecated ``length``, or ``len(iterable)``."""
    if not (hasattr(type(iterable), "__iter__") or hasattr(type(iterable), "__getitem__")):
        raise TypeError(f"iterable must be iterable, got {type(iterable).__name__} {iterable!r}")
    if length is not None:
        warnings.warn("parfor: 'length' is deprecated, use 'total' instead",
                      DeprecationWarning, stacklevel=4)
        if total is None:
            total = length
    if total is not None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be a whole number of at least 0, got {total!r}")
        return total
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def show_bar(
    bar: bool | Callable[[int], object] | None, nested: bool
) -> bool | Callable[[int], Any]:
    """``bar=None`` means a bar, except in nested calls, whose bars would fight the outer one."""
    return (not nested) if bar is None else bar
