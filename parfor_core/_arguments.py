"""Checks of the arguments every entry point shares, so mistakes fail at once with a clear cause."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from ._config import Configuration, current
from ._task import Call
from .errors import warn


def make_call(fun: object, args: object, kwargs: object) -> Call:
    """The Call of ``fun(item, *args, **kwargs)``, after checking each part."""
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__} {fun!r}")
    args = check_args(args, "extra positional arguments")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict of extra keyword arguments for fun, got "
                        f"{type(kwargs).__name__} {kwargs!r}")
    return Call(fun, args, kwargs)  # type: ignore[arg-type]


def check_args(args: object, what: str) -> tuple[Any, ...]:
    """``args`` (None: none) as a tuple, if it is a tuple or list of ``what`` for fun."""
    if args is None:
        return ()
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of {what} for fun, got {type(args).__name__} "
                        f"{args!r}; did you mean args=({args!r},)?")
    return tuple(args)


def settle_sharing(call: Call, settings: Configuration) -> Call:
    """Fix how ``call``'s large data is shared to the settings where it was made."""
    call.share_in_place, call.keep_shared = settings["share_in_place"], settings["keep_shared"]
    return call


def check_count(name: str, value: object, minimum: int) -> int:
    """``value`` as an int if it is a whole number (numpy's too) of at least ``minimum``; else
    a ValueError naming it."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return number


def settings_for(backend: object, n_processes: object, bar: object) -> Configuration:
    """The settings of one call: its own arguments (checked here) over the configuration."""
    if n_processes is not None:
        n_processes = check_count("n_processes", n_processes, 1)
    return current(backend=backend if isinstance(backend, str) else None,
                   n_processes=n_processes, bar=bar)


def total_of(iterable: object, total: object, length: object) -> int | None:
    """How many items to expect: ``total``, the deprecated ``length``, or ``len(iterable)``."""
    if not (hasattr(type(iterable), "__iter__") or hasattr(type(iterable), "__getitem__")):
        raise TypeError(f"iterable must be iterable, got {type(iterable).__name__} {iterable!r}")
    if length is not None:
        warn("parfor: 'length' is deprecated, use 'total' instead", DeprecationWarning)
        if total is None:
            total = length
    if total is not None:
        return check_count("total", total, 0)
    try:
        return len(iterable)  # type: ignore[arg-type]
    except (TypeError, OverflowError):  # no length, or one past sys.maxsize (range(10**20))
        return None


def show_bar(argument: object, configured: object, nested: bool) -> bool | Callable[[int], Any]:
    """The call's ``bar`` if it gave one; else none in a nested call (it would fight the outer
    call's bar); else the configured one, and a bar when nothing is configured."""
    if argument is not None:
        return argument  # type: ignore[return-value]
    if nested:
        return False
    return True if configured is None else configured  # type: ignore[return-value]
