"""The plugin manager: backend discovery on first need, names to classes, pooled instances."""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from ._config import Configuration, ConfigWarning, current
from ._task import inside_worker
from .backend import Backend, interpreter_exiting
from .errors import BackendUnavailableError, PluginError, UnknownBackendError, warn_once

if TYPE_CHECKING:
    import pluggy

    from ._entry_points import EntryPoint

ENTRY_POINT_GROUP = "parfor"
SERIAL = "serial"


class PluginWarning(UserWarning):
    """A plugin could not be loaded; parfor goes on without it."""


def available_cpus() -> int:
    """CPUs this process may run on (its CPU affinity, where the platform tells)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def gil_enabled() -> bool:
    """False only on a free-threaded Python running with the GIL disabled."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


class BackendInfo(NamedTuple):
    """What ``parfor backends`` shows of one backend."""

    name: str
    source: str
    unavailable_reason: str | None
    auto_priority: int | None


class Selection(NamedTuple):
    """A backend chosen by name for a call; `Registry.lease` turns it into an instance."""

    name: str
    n_workers: int
    options: tuple[tuple[str, Any], ...] = ()


class Choice(NamedTuple):
    """The backend a call would get, and why."""

    name: str
    reason: str


class Registry:
    """Discovers backend plugins on first need and keeps one pooled instance per backend."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        #: The plugins' answers, asked again only when the set of plugins changes.
        self._candidates_cache: tuple[tuple[Any, ...], dict[str, list[type[Backend]]]] | None = None
        self._entry_points: list[EntryPoint] = []
        self._instances: dict[str, tuple[Backend, Selection]] = {}
        #: Backends being made, by name: set once made (or failed). Made outside the lock, for
        #: a cluster backend connects then, and other backends' calls must not wait for it.
        self._making: dict[str, threading.Event] = {}
        self._leases: dict[int, int] = {}  # id(backend) -> calls running on it
        self._retired: weakref.WeakSet[Backend] = weakref.WeakSet()  # replaced, maybe leased
        self._closed = False
        self._exit_registered = False

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The pluggy manager, with every installed ``parfor`` entry point loaded."""
        with self._lock:
            if self._pm is None:
                import pluggy

                from . import hookspecs

                pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
                pm.add_hookspecs(hookspecs)
                self._load_entry_points(pm)
                self._pm = pm
            return self._pm

    def _load_entry_points(self, pm: pluggy.PluginManager) -> None:
        from ._entry_points import entry_points

        for name in current()["disable_plugins"]:
            pm.set_blocked(name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:
                warn_once(
                    f"parfor: skipping the backend plugin {ep.name!r} ({ep.value}, from "
                    f"{_dist_label(ep)}): it failed to load: {type(exc).__name__}: {exc}",
                    PluginWarning,
                )
                continue
            self._entry_points.append(ep)

    def _candidates(self) -> dict[str, list[type[Backend]]]:
        """Every registered backend class by name, asking each plugin on its own, so that one
        that fails to register (it raises, or returns no Backend classes) is skipped with a
        warning and the others keep working."""
        implementations = tuple(self.plugin_manager.hook.parfor_register_backends
                                .get_hookimpls())
        cached = self._candidates_cache
        if cached is not None and cached[0] == implementations:  # no plugin came or went
            return cached[1]
        found: dict[str, list[type[Backend]]] = {}
        for implementation in implementations:
            try:
                classes = list(implementation.function())
                bad = [c for c in classes if not (isinstance(c, type)
                                                  and issubclass(c, Backend)
                                                  and isinstance(getattr(c, "name", None), str))]
                if bad:
                    raise TypeError(f"it returned {bad!r}, not Backend subclasses with a name")
            except Exception as exc:
                warn_once(f"parfor: skipping the backend plugin {implementation.plugin_name!r}:"
                          f" parfor_register_backends failed: {type(exc).__name__}: {exc}",
                          PluginWarning)
                continue
            for cls in classes:
                same = found.setdefault(cls.name, [])
                if cls not in same:
                    same.append(cls)
        self._candidates_cache = (implementations, found)
        return found

    def source(self, cls: type[Backend]) -> str:
        """Which distribution (and version) provides a backend class."""
        top = cls.__module__.partition(".")[0]
        for ep in self._entry_points:
            if ep.value.partition(":")[0].partition(".")[0] == top:
                return _dist_label(ep)
        return f"module {cls.__module__} (registered at run time)"

    def get_class(self, name: str, origin: str = "backend=") -> type[Backend]:
        """The backend class registered under ``name``; a clear error when there is none."""
        candidates = self._candidates()
        if name not in candidates:
            raise UnknownBackendError(name, candidates, origin,
                                      "" if candidates else self.why_none())
        classes = candidates[name]
        if len(classes) > 1:
            raise PluginError(
                f"Two backends are registered under the name {name!r}: "
                + " and ".join(f"{c.__module__}.{c.__qualname__} from {self.source(c)}"
                               for c in classes)
                + ". Uninstall one of them, or keep one from loading with PARFOR_DISABLE_PLUGINS"
                " (or the disable_plugins setting) set to its entry-point name."
            )
        return classes[0]

    def why_none(self) -> str:
        """Why no backend is registered: a setting disabled the plugins, or none was found."""
        settings = current()
        if settings["disable_plugins"]:
            return (f"the disable_plugins setting ({settings.source('disable_plugins')}) names "
                    f"every plugin")
        return ("no installed plugin registers one: parfor's own backends are found through "
                "the entry points of its installed distribution, so install parfor (pip "
                "install -e . in a source checkout) rather than put its folder on sys.path")

    def names(self) -> list[str]:
        return sorted(self._candidates())

    def infos(self) -> list[BackendInfo]:
        infos = []
        for name, classes in sorted(self._candidates().items()):
            for cls in classes:
                infos.append(BackendInfo(name, self.source(cls), cls.unavailable_reason(),
                                         cls.auto_priority()))
        return infos

    def auto(self) -> Choice:
        """The backend a plain call picks for parallel work here, and why."""
        ranked = sorted(((cls.auto_priority(), name, cls)  # availability is the slow check:
                         for name, [cls] in self._candidates().items()  # only for the best ones
                         if cls.auto_priority() is not None), key=lambda r: r[:2], reverse=True)
        best = next(((priority, name) for priority, name, cls in ranked
                     if cls.unavailable_reason() is None), None)
        gil = "enabled" if gil_enabled() else "disabled"
        if best is None:
            return Choice(SERIAL, f"the GIL is {gil} and no parallel backend is available")
        return Choice(best[1], f"the GIL is {gil} and {best[1]!r} has the highest automatic "
                               f"priority ({best[0]}) of the available backends")

    def select(self, backend: str | Backend | None, *, serial: bool | None, total: int | None,
               settings: Configuration) -> Backend | Selection:
        """Which backend one call runs on, from its arguments and settings; checked now, made
        by `lease`.

        Nested calls (inside a worker) always run serially, whatever was asked: the outer call
        already keeps every worker busy, and waiting on the same pool could deadlock. So does
        an automatic choice made while the interpreter exits (by a thread the main one left).
        """
        if isinstance(backend, Backend):
            if serial is True:
                raise ValueError(f"serial=True conflicts with backend={backend!r}")
            return Selection(SERIAL, 1) if inside_worker() else backend
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or a Backend instance, "
                            f"got {type(backend).__name__} {backend!r}")
        if serial is True and backend not in (None, SERIAL):
            raise ValueError(f"serial=True conflicts with backend={backend!r}")
        if serial is False and backend == SERIAL:
            raise ValueError("serial=False conflicts with backend='serial'")
        if inside_worker() or serial is True:
            return Selection(SERIAL, 1)
        name = settings["backend"]
        origin = "backend=" if backend is not None else settings.source("backend")
        if serial is False and backend is None and name == SERIAL:
            name = None  # the call's serial=False beats a configured serial backend
        cls = self._usable_class(name, origin) if name is not None else None
        n_workers = settings["n_processes"] or available_cpus()
        if cls is None:
            if serial is None and ((total is not None and total < 2) or n_workers < 2
                                   or interpreter_exiting()):  # executors stop at exit
                return Selection(SERIAL, 1)
            cls = self._usable_class(self.auto().name, "the automatic choice")
        if cls.name == SERIAL:
            return Selection(SERIAL, 1)
        return Selection(cls.name, n_workers, _options(cls, settings))

    def _usable_class(self, name: str, origin: str = "backend=") -> type[Backend]:
        cls = self.get_class(name, origin)
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(name, reason)
        return cls

    @contextmanager
    def lease(self, selected: Backend | Selection) -> Iterator[Backend]:
        """The instance to run on while the block lasts: pooled per name and reused by later
        calls. A call with another worker count replaces the pooled instance; the replaced one
        is shut down once no call is using it any more."""
        if isinstance(selected, Backend):  # the caller's own instance: the caller manages it
            yield selected
            return
        backend = self._acquire(selected)
        try:
            yield backend
        finally:
            self._release(backend)

    def _acquire(self, selection: Selection) -> Backend:
        name = selection.name
        while True:
            with self._lock:
                backend, made_for = self._instances.get(name, (None, None))
                if backend is not None and made_for == selection:
                    self._leases[id(backend)] = self._leases.get(id(backend), 0) + 1
                    return backend
                making = self._making.get(name)
                if making is None:  # this thread makes it
                    cls = self._usable_class(name)
                    making = self._making[name] = threading.Event()
                    break
            making.wait()  # another thread makes one: it may suit this call too
        backend = retired = None
        try:
            backend = cls(selection.n_workers, **dict(selection.options))
        finally:
            with self._lock:  # pooled and no longer being made at once, for those waiting
                del self._making[name]
                if backend is not None:
                    retired = self._pool(backend, selection)
            making.set()
        if retired is not None:
            retired.shutdown()
        return backend

    def _pool(self, backend: Backend, selection: Selection) -> Backend | None:
        """Make a new instance the pooled one for its name, leased by the call that made it;
        returns the one it replaces if no call is using that one (to be shut down)."""
        old = self._instances.get(selection.name, (None,))[0]
        self._instances[selection.name] = (backend, selection)
        self._leases[id(backend)] = 1
        if not self._exit_registered:
            atexit.register(self._exit)
            self._exit_registered = True
        if old is not None and self._leases.get(id(old)):
            self._retired.add(old)
            return None
        return old

    def _release(self, backend: Backend) -> None:
        with self._lock:
            self._leases[id(backend)] -= 1
            if self._leases[id(backend)] > 0:
                return
            del self._leases[id(backend)]
            if self._instances.get(backend.name, (None,))[0] is backend or self._closed:
                return  # still the pooled one, kept for the next call; or shut down at exit
        backend.shutdown()

    def shutdown(self) -> None:
        """Shut every backend instance down, pooled or still leased (at interpreter exit), and
        let go of the shared memory kept for calls to come."""
        with self._lock:
            instances = [backend for backend, _ in self._instances.values()] + [
                backend for backend in self._retired if id(backend) in self._leases]
            self._instances = {}
        for backend in instances:
            backend.shutdown()
        kept = sys.modules.get("parfor_core._kept")  # loaded by the first call that kept any
        if kept is not None:
            kept.release_all()

    def forget_in_child(self) -> None:
        """In a forked child: the pooled backends are the parent's (their workers, threads and
        pipes), and another thread of the parent may have held the lock. The child's calls get
        backends of their own (the processes backend also closes its copies of the workers'
        pipes, see there)."""
        self._lock = threading.RLock()
        self._instances = {}
        self._making = {}
        self._leases = {}
        self._retired = weakref.WeakSet()

    def _exit(self) -> None:
        """At interpreter exit: shut everything down; calls still open (an abandoned gmap)
        release their backend later, during teardown, and must not shut it down again."""
        with self._lock:
            self._closed = True
        self.shutdown()


def _options(cls: type[Backend], settings: Configuration) -> tuple[tuple[str, Any], ...]:
    """The settings a backend takes as keyword arguments: the general ones it accepts
    (idle_timeout, retries, worker_output) and its own table; unknown own options warn."""
    parameters, takes_any = _keyword_parameters(cls)
    own = settings["backends"].get(cls.name, {})
    for key in own:
        if key not in parameters and not takes_any:
            warn_once(f"{settings.source('backends')}: backend {cls.name!r} has no option "
                      f"{key!r}; it is ignored", ConfigWarning)
    options = settings.backend_options(cls.name, cls.environment)
    return tuple(sorted((key, value) for key, value in options.items()
                        if (key in parameters or takes_any) and key != "n_workers"))


@functools.cache
def _keyword_parameters(cls: type[Backend]) -> tuple[frozenset[str], bool]:
    """The names ``cls.__init__`` takes, and whether it takes any keyword (``**options``)."""
    import inspect

    parameters = inspect.signature(cls.__init__).parameters
    return frozenset(parameters), any(p.kind is inspect.Parameter.VAR_KEYWORD
                                      for p in parameters.values())


def _dist_label(ep: EntryPoint) -> str:
    return f"{ep.dist_name} {ep.dist_version}"


registry = Registry()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=registry.forget_in_child)
