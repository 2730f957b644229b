"""The progress bar: tqdm, a user's callback, or nothing, advanced by items done."""

from __future__ import annotations

import functools
import os
import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from ._task import add_note


@runtime_checkable
class ProgressBar(Protocol):
    """A bar of the caller's own, such as a tqdm bar: advanced by ``update(n)`` with the items
    just done, and left open (it is the caller's)."""

    def update(self, n: int) -> object: ...


def check_bar(bar: object, bar_kwargs: Mapping[str, Any], desc: object = None) -> None:
    """Reject a bad ``bar``, ``desc`` or unknown keyword now, not after the work is done."""
    if not (bar is None or isinstance(bar, bool) or callable(bar)
            or (isinstance(bar, ProgressBar) and not isinstance(bar, Mapping))):
        raise TypeError(f"bar must be True, False, None, a callable taking the number of done "
                        f"iterations, or a bar with an update(n) method (such as a tqdm bar), "
                        f"got {type(bar).__name__} {bar!r}")
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a string (the progress bar's description), got "
                        f"{type(desc).__name__} {desc!r}")
    if bar_kwargs:
        unknown = sorted(set(bar_kwargs) - _tqdm_parameters())
        if unknown:
            raise TypeError(
                f"Unexpected keyword argument(s) {', '.join(unknown)}: parfor passes the keyword "
                "arguments it does not know itself to tqdm, and tqdm does not know these either."
            )


@functools.cache
def _tqdm_parameters() -> frozenset[str]:
    """The keyword arguments tqdm takes (read once: inspecting it costs more than a short call)."""
    import inspect

    _import_tqdm()
    from tqdm.std import tqdm  # tqdm.auto's subclass hides the signature behind **kwargs

    return frozenset(inspect.signature(tqdm.__init__).parameters)


class Progress:
    """Counts finished items and shows them; safe to update from several threads."""

    def __init__(self, bar: bool | Callable[[int], object] | ProgressBar, total: int | None,
                 desc: str | None = None, bar_kwargs: Mapping[str, Any] | None = None) -> None:
        self.done = 0
        self._lock = threading.Lock()
        self._callback: Callable[[int], object] | None = None
        self._bar: Any = None  # what update(n) moves: our tqdm bar, or the caller's bar
        self._owned = False  # our tqdm bar, which we size and close
        if bar is False:  # told by identity, not by a runtime Protocol check: those are slow
            return
        if callable(bar):
            self._callback = bar
        elif bar is not True:  # a bar object, as check_bar allowed
            self._bar = bar
        else:
            self._bar = _new_tqdm_bar(total, desc, bar_kwargs or {})
            self._owned = True

    def add_total(self, n: int) -> None:
        """Grow the expected total (ParPool, where work arrives over time)."""
        if self._owned:
            with self._lock:
                self._bar.total = (self._bar.total or 0) + n
                self._bar.refresh()

    def update(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self._callback is not None:
                self._callback(self.done)

    def close(self) -> None:
        if self._owned:
            self._bar.close()


def _new_tqdm_bar(total: int | None, desc: str | None, bar_kwargs: Mapping[str, Any]) -> Any:
    """A tqdm bar; where tqdm rejects a value, its error, and no half-made bar left behind.

    tqdm registers a bar before its ``__init__`` reads the arguments, and a bar whose
    ``__init__`` failed is closed when collected: that close fails on the missing attributes
    ("Exception ignored in ... __del__") and takes tqdm's lock at whatever moment the garbage
    collector runs. So the bar is made in two steps, and a failed one is unregistered at once.
    """
    cls = tqdm_class()
    bar = cls.__new__(cls)
    try:
        bar.__init__(total=total, desc=desc, **{"miniters": 1, **bar_kwargs})
    except Exception as exc:
        bar.disable = True  # what tqdm's close() checks first: nothing left for it to do
        with cls.get_lock():
            cls._instances.discard(bar)
        add_note(exc, f"parfor: raised by tqdm, given the bar keyword arguments "
                      f"{dict(bar_kwargs)!r}")
        raise
    return bar


@functools.cache
def tqdm_class() -> Any:
    """A notebook widget in Jupyter, else tqdm's plain console bar; what tqdm.auto picks, but
    without the asyncio support it adds, whose import costs more than a short call.

    Its bars take tqdm's thread lock, which every tqdm bar of this process shares, but not the
    cross-process lock tqdm makes at its first bar: parfor's workers draw no bars, and making
    that lock imports multiprocessing, which costs a short call more than its work.
    """
    import warnings

    _import_tqdm()
    from tqdm.std import TqdmDefaultWriteLock, TqdmExperimentalWarning

    with warnings.catch_warnings():  # autonotebook warns it is experimental, as tqdm.auto hides
        warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
        from tqdm.autonotebook import tqdm

    class ParforBar(tqdm):  # type: ignore[misc, valid-type]
        __doc__ = tqdm.__doc__
        #: No monitor thread, which tqdm starts with every first bar and joins at its close
        #: (0.05x of a 100 000-item call of quick items): it only rescues bars whose
        #: ``miniters`` grew with quick items, and parfor's bars keep ``miniters`` at 1. They
        #: are updated once per chunk, so each update may redraw (every ``mininterval``).
        monitor_interval = 0

    if _forked:  # tqdm's locks are copies of the parent's, which a thread there may have held
        ParforBar.set_lock(threading.RLock())
    elif not hasattr(tqdm, "_lock") and TqdmDefaultWriteLock.th_lock is not None:
        ParforBar.set_lock(TqdmDefaultWriteLock.th_lock)
    return ParforBar


#: Whether this process is a fork of one that may have drawn bars (see `tqdm_class`).
_forked = False


def _renew_bar_lock_in_child() -> None:
    """In a forked child: the bars' lock is a copy of one that a parent's thread (drawing a bar,
    showing a worker's output) may have held; the child's bar class is made anew, with a new
    lock, when next needed."""
    global _forked
    _forked = True
    tqdm_class.cache_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_bar_lock_in_child)


def _import_tqdm() -> None:
    """Import tqdm with its ``tqdm.version`` module made here: tqdm's own asks
    importlib.metadata for the version, an import (email, zipfile, csv) that costs a cold start
    more than the rest of tqdm. Any other name of that module loads the real one."""
    if "tqdm" in sys.modules or "importlib.metadata" in sys.modules:  # nothing to save
        return
    from ._entry_points import installed_version

    version = installed_version("tqdm")
    if version is None:  # not installed from a distribution: let tqdm find out
        return
    module = types.ModuleType("tqdm.version", "tqdm's version, read by parfor.")
    module.__version__ = version  # type: ignore[attr-defined]
    module.__getattr__ = _real_tqdm_version  # type: ignore[method-assign]
    sys.modules["tqdm.version"] = module
    import tqdm

    tqdm.version = module  # type: ignore[attr-defined]  # as an import would have set it


def _real_tqdm_version(name: str) -> Any:
    if name.startswith("__"):  # what the import machinery asks (__path__): a module has none
        raise AttributeError(name)
    import importlib

    sys.modules.pop("tqdm.version", None)
    return getattr(importlib.import_module("tqdm.version"), name)
