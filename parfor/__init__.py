"""parfor: run a Python for-loop in parallel, with a progress bar and the same results.

This package is the name users import; the implementation lives in ``parfor_core`` and the
built-in backends in ``parfor_backends``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from parfor_core import (
    Backend,
    BackendUnavailableError,
    Chunks,
    ConfigError,
    ConfigWarning,
    InterpreterExitingError,
    ParforError,
    ParPool,
    PluginError,
    PluginWarning,
    SerializationError,
    UnknownBackendError,
    WorkerDiedError,
    WorkerError,
    config,
    gmap,
    parfor,
    pmap,
)

if TYPE_CHECKING:
    from parfor_core import SharedArray


def __getattr__(name: str) -> object:
    if name == "SharedArray":  # imports numpy: only for who uses it
        import parfor_core

        return parfor_core.SharedArray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Chunks",
    "ConfigError",
    "ConfigWarning",
    "InterpreterExitingError",
    "ParPool",
    "ParforError",
    "PluginError",
    "PluginWarning",
    "SerializationError",
    "SharedArray",
    "UnknownBackendError",
    "WorkerDiedError",
    "WorkerError",
    "config",
    "gmap",
    "parfor",
    "pmap",
]
