"""The progress bar: tqdm, a user's callback, or nothing, advanced by items done."""

from __future__ import annotations

import functools
import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any


def check_bar(bar: object, bar_kwargs: Mapping[str, Any]) -> None:
    """Reject a bad ``bar`` or an unknown keyword now, rather than after the work is done."""
    if not (bar is None or isinstance(bar, bool) or callable(bar)):
        raise TypeError(f"bar must be True, False, None or a callable taking the number of "
                        f"done iterations, got {type(bar).__name__} {bar!r}")
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

    def __init__(self, bar: bool | Callable[[int], object], total: int | None,
                 desc: str | None = None, bar_kwargs: Mapping[str, Any] | None = None) -> None:
        self.done = 0
        self._lock = threading.Lock()
        self._callback: Callable[[int], object] | None = None
        self._tqdm: Any = None
        if callable(bar) and not isinstance(bar, bool):
            self._callback = bar
        elif bar:
            self._tqdm = _tqdm_class()(total=total, desc=desc,
                                       **{"miniters": 1, **(bar_kwargs or {})})

    def add_total(self, n: int) -> None:
        """Grow the expected total (ParPool, where work arrives over time)."""
        if self._tqdm is not None:
            with self._lock:
                self._tqdm.total = (self._tqdm.total or 0) + n
                self._tqdm.refresh()

    def update(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done += n
            if self._tqdm is not None:
                self._tqdm.update(n)
            elif self._callback is not None:
                self._callback(self.done)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


@functools.cache
def _tqdm_class() -> Any:
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

    if not hasattr(tqdm, "_lock") and TqdmDefaultWriteLock.th_lock is not None:
        ParforBar.set_lock(TqdmDefaultWriteLock.th_lock)
    return ParforBar


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
