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
Context = tuple[str, list[str], dict[str, str], bytes | None, list[bytes] | None]

#: The environment a worker last took over (at first, the one it started with, the caller's
#: then): what the caller has since unset is unset here too.
_taken_environment: dict[str, str] = {}


#: The environment as last read here, and the raw mapping it was read from: reading it again
#: decodes every variable, which costs a warm call of a few items a visible share.
_read_environment: tuple[object, dict[str, str]] = (None, {})


#: The warning filters as last read here, and each of them pickled.
_read_filters: tuple[list[Any], list[bytes]] = ([], [])


def caller_context() -> Context:
    """This process's state, to send with a call."""
    return (os.getcwd(), list(sys.path), _environment(), _authentication_key(),
            _warning_filters())


def _warning_filters() -> list[bytes] | None:
    """The warning filters (``-W``, ``filterwarnings`` calls), each pickled alone: a worker
    loads those it can (`_take_over_filters`), and leaves out one of a warning class it cannot
    import (the caller's script's)."""
    global _read_filters
    warnings = sys.modules.get("warnings")
    if warnings is None:
        return None
    if warnings.filters != _read_filters[0]:
        _read_filters = (list(warnings.filters), [pickled for entry in warnings.filters
                                                  if (pickled := _pickled(entry)) is not None])
    return _read_filters[1]


def _pickled(entry: tuple[Any, ...]) -> bytes | None:
    import pickle  # not at import: parfor's import is kept light

    try:
        return pickle.dumps(entry)
    except Exception:  # a warning class made in a function: no worker could load it
        return None


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
    if filters is not None:  # after the path: their classes may be imported from there
        _take_over_filters(filters)
    if environment == _taken_environment:  # the usual case: nothing to read through
        return
    for name in _taken_environment.keys() - environment.keys():
        os.environ.pop(name, None)
    for name, value in environment.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    _taken_environment = environment


#: The pickled warning filters a worker last took over.
_taken_filters: list[bytes] = []


def _take_over_filters(filters: list[bytes]) -> None:
    global _taken_filters
    if filters == _taken_filters:
        return
    import pickle
    import warnings

    loaded = []
    for entry in filters:
        try:
            loaded.append(pickle.loads(entry))
        except Exception:  # a warning class that cannot be imported here: its filter is left out
            pass
    warnings.resetwarnings()  # which tells the registries of warnings shown that they changed
    warnings.filters[:] = loaded
    _taken_filters = filters
