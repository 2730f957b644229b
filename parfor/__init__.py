"""parfor: run a Python for-loop in parallel, with a progress bar and the same results.

This package is the name users import; the implementation lives in ``parfor_core`` and the
built-in backends in ``parfor_backends``.
"""

from __future__ import annotations

from parfor_core import (
    Backend,
    BackendUnavailableError,
    Chunks,
    ConfigError,
    ConfigWarning,
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

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Chunks",
    "ConfigError",
    "ConfigWarning",
    "ParPool",
    "ParforError",
    "PluginError",
    "PluginWarning",
    "SerializationError",
    "UnknownBackendError",
    "WorkerDiedError",
    "WorkerError",
    "config",
    "gmap",
    "parfor",
    "pmap",
]
