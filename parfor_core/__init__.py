"""parfor's core: the public API, the backend contract and the plugin machinery.

Importing it is cheap: each name loads its module on first use (a worker process, which needs
only the task protocol, never loads the API), and plugins are discovered, and pluggy,
cloudpickle, dill, tqdm, loky and numpy imported, on first need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and the API docs; at run time loaded by __getattr__
    from ._api import gmap, parfor, pmap
    from ._chunks import Chunks
    from ._config import SETTINGS, ConfigError, ConfigWarning, config
    from ._pool import ParPool
    from ._registry import (
        BackendInfo,
        Choice,
        PluginWarning,
        available_cpus,
        gil_enabled,
        registry,
    )
    from ._shared_array import SharedArray
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
        answer_holds_shared,
        dump_call,
        dump_items,
        dump_task,
        execute_call,
        execute_dumped,
        load_call,
        load_result,
        load_shared_call,
        release_shared,
        run_items,
        share_call,
        unloadable,
    )
    from .backend import Backend, interpreter_exiting, stop_before_exit, then
    from .errors import (
        BackendUnavailableError,
        InterpreterExitingError,
        ParforError,
        PluginError,
        SerializationError,
        UnknownBackendError,
        WorkerDiedError,
        WorkerError,
    )
    from .hookspecs import hookimpl

#: Where each public name lives, loaded on first use.
_MODULES = {
    "._api": ("gmap", "parfor", "pmap"),
    "._chunks": ("Chunks",),
    "._config": ("SETTINGS", "ConfigError", "ConfigWarning", "config"),
    "._pool": ("ParPool",),
    "._registry": ("BackendInfo", "Choice", "PluginWarning", "available_cpus", "gil_enabled",
                   "registry"),
    "._shared_array": ("SharedArray",),  # needs numpy
    "._task": ("Call", "Failure", "RemoteTraceback", "Result", "Task", "inside_worker",
               "mark_worker_process", "run_task"),
    "._wire": ("answer_holds_shared", "dump_call", "dump_items", "dump_task", "execute_call",
               "execute_dumped", "load_call", "load_result", "load_shared_call",
               "release_shared", "run_items", "share_call", "unloadable"),
    ".backend": ("Backend", "interpreter_exiting", "stop_before_exit", "then"),
    ".errors": ("BackendUnavailableError", "InterpreterExitingError", "ParforError",
                "PluginError", "SerializationError", "UnknownBackendError", "WorkerDiedError",
                "WorkerError"),
    ".hookspecs": ("hookimpl",),  # imports pluggy
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "InterpreterExitingError",
    "ParPool",
    "ParforError",
    "PluginError",
    "PluginWarning",
    "RemoteTraceback",
    "Result",
    "SerializationError",
    "SharedArray",
    "Task",
    "UnknownBackendError",
    "WorkerDiedError",
    "WorkerError",
    "answer_holds_shared",
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
    "interpreter_exiting",
    "load_call",
    "load_result",
    "load_shared_call",
    "mark_worker_process",
    "parfor",
    "pmap",
    "registry",
    "release_shared",
    "run_items",
    "run_task",
    "share_call",
    "stop_before_exit",
    "then",
    "unloadable",
]
