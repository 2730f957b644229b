"""What a worker on the caller's machine takes over from the caller with each call: the working
directory, ``sys.path``, the environment and the warning filters, as a plain loop there would
see them. A worker started before a change (``os.chdir``, ``%cd`` in a notebook, a path added
for an import, a variable set) would otherwise run later calls in the state of its start, and
read the wrong files without a word; and a worker never runs the script's own filters. Also
multiprocessing's authentication key, without which the proxies of a
``multiprocessing.Manager()`` that the caller started are refused in the workers.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: The caller's working directory, ``sys.path``, environment, multiprocessing's key and
#: warning filters.
Context = tuple[str, list[str], dict[str, str], bytes | None, list[Any] | None]

#: The environment a worker last took over (at first, the one it started with, the caller's
#: then): what the caller has since unset is unset here too.
_taken_environment: dict[str, str] = {}


#: The environment as last read here, and the raw mapping it was read from: reading it again
#: decodes every variable, which costs a warm call of a few items a visible share.
_read_environment: tuple[object, dict[str, str]] = (None, {})


#: The warning filters as last read here, and those of them that can be sent by reference.
_read_filters: tuple[list[Any], list[Any]] = ([], [])


def caller_context() -> Context:
    """This process's state, to send with a call."""
    return (os.getcwd(), list(sys.path), _environment(), _authentication_key(),
            _warning_filters())


def _warning_filters() -> list[Any] | None:
    """The warning filters (``-W``, ``filterwarnings`` calls) that a worker can load: those
    of a warning class it cannot import (one of the caller's script) are left out."""
    global _read_filters
    warnings = sys.modules.get("warnings")
    if warnings is None:
        return None
    if warnings.filters != _read_filters[0]:
        _read_filters = (list(warnings.filters),
                         [entry for entry in warnings.filters if _by_reference(entry)])
    return _read_filters[1]


def _by_reference(entry: tuple[Any, ...]) -> bool:
    import pickle  # not at import: parfor's import is kept light

    try:
        pickle.loads(pickle.dumps(entry))
    except Exception:
        return False
    return True


def _authentication_key() -> bytes | None:
    """multiprocessing's key, where it is loaded (a Manager is started through it)."""
    process = sys.modules.get("multiprocessing.process")
    return None if process is None else bytes(process.current_process().authkey)


def _environment() -> dict[str, str]:
    global _read_environment
    raw = getattr(os.environ, "_data", None)  # CPython's encoded variables, which it updates
    if raw is None or raw != _read_environment[0]:
        _read_environment = (None if raw is None else dict(raw), dict(os.environ))
    return _read_environment[1]


def started_from_caller() -> None:
    """Worker side, at its start: the environment it inherited is the caller's."""
    global _taken_environment
    _taken_environment = dict(os.environ)


def take_over(context: Context) -> None:
    """Worker side: make this process's state the caller's, before the call is loaded (its
    function may import from the caller's paths)."""
    global _taken_environment
    folder, path, environment, key, filters = context
    if filters is not None:
        _take_over_filters(filters)
    if key is not None:
        from multiprocessing import process

        if process.current_process().authkey != key:
            process.current_process().authkey = key
    if sys.path != path:
        sys.path[:] = path
    try:
        if os.getcwd() != folder:
            os.chdir(folder)
    except OSError:  # gone since, or not allowed here: fun meets that as the loop would
        pass
    if environment == _taken_environment:  # the usual case: nothing to read through
        return
    for name in _taken_environment.keys() - environment.keys():
        os.environ.pop(name, None)
    for name, value in environment.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    _taken_environment = environment


def _take_over_filters(filters: list[Any]) -> None:
    import warnings

    if warnings.filters != filters:
        warnings.resetwarnings()  # which tells the registries of warnings shown that they changed
        warnings.filters[:] = filters
