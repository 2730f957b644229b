"""parfor's core: the public API, the backend contract and the plugin machinery.

Importing it is cheap: plugins are discovered, and cloudpickle, dill, tqdm and loky imported,
on first need.
"""

from __future__ import annotations

from ._api import gmap, parfor, pmap
from ._chunks import Chunks
from ._config import SETTINGS, ConfigError, ConfigWarning, config
from ._pool import ParPool
from ._registry import BackendInfo, Choice, PluginWarning, available_cpus, gil_enabled, registry
from ._task import (
    Call,
    Failure,
    RemoteTraceback,
    Result,
    Task,
    inside_worker,
    mark_worker_process,
    run_task,
)
from ._wire import (
    dump_call,
    dump_items,
    dump_task,
    execute_call,
    execute_dumped,
    load_call,
    load_result,
    run_items,
    unloadable,
)
from .backend import Backend, then
from .errors import (
    BackendUnavailableError,
    ParforError,
    PluginError,
    SerializationError,
    UnknownBackendError,
    WorkerDiedError,
    WorkerError,
)
from .hookspecs import hookimpl

__all__ = [
    "SETTINGS",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "Call",
    "Choice",
    "Chunks",
    "ConfigError",
    "ConfigWarning",
    "Failure",
    "ParPool",
    "ParforError",
    "PluginError",
    "PluginWarning",
    "RemoteTraceback",
    "Result",
    "SerializationError",
    "Task",
    "UnknownBackendError",
    "WorkerDiedError",
    "WorkerError",
    "available_cpus",
    "config",
    "dump_call",
    "dump_items",
    "dump_task",
    "execute_call",
    "execute_dumped",
    "gil_enabled",
    "gmap",
    "hookimpl",
    "inside_worker",
    "load_call",
    "load_result",
    "mark_worker_process",
    "parfor",
    "pmap",
    "registry",
    "run_items",
    "run_task",
    "then",
    "unloadable",
]
