"""The ParforError family: each error carries the data that explains it, not only a message."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence


class ParforError(Exception):
    """Base of the errors about parfor's machinery: backends, plugins, workers, serialization.

    Mistakes in arguments raise TypeError or ValueError instead.
    """

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt without calling __init__, whose signature differs per subclass, so that these
        # errors cross from a worker process to the caller intact.
        return rebuild_exception, (type(self), self.args, self.__dict__)


def rebuild_exception(cls: type[BaseException], args: tuple[object, ...],
                      state: dict[str, object]) -> BaseException:
    """Make an exception from its class, args and attributes, without calling ``__init__``."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


def rebuild_group(cls: type[BaseException], message: str, exceptions: list[BaseException],
                  state: dict[str, object]) -> BaseException:
    """Make an exception group from its class, message, members and attributes (its
    ``__new__`` needs the message and the members; ``__init__`` may want other arguments)."""
    group = cls.__new__(cls, message, exceptions)  # type: ignore[call-arg]
    group.__dict__.update(state)
    return group


class UnknownBackendError(ParforError, ValueError):
    """No backend is registered under the requested name."""

    def __init__(self, name: str, known: Sequence[str], origin: str = "backend=",
                 why_none: str = "") -> None:
        self.name = name
        self.known = sorted(known)
        known_ones = ", ".join(self.known) or f"none ({why_none})"
        super().__init__(f"No backend named {name!r} (from {origin}). Known: {known_ones}.")


class BackendUnavailableError(ParforError):
    """The backend is registered but cannot run here (a missing extra, an old Python...)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"Backend {name!r} is not available here: {reason}")


class PluginError(ParforError):
    """A plugin registered something parfor cannot use, such as two backends with one name."""


class InterpreterExitingError(ParforError, RuntimeError):
    """Work was asked of a backend while the interpreter exits: its executors have stopped, and
    a task started then would wait on them for ever."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        super().__init__(f"The interpreter is exiting: the {backend} backend can start no new "
                         f"work")


class SerializationError(ParforError, TypeError):
    """An object that must cross to a worker process (or back) cannot be serialized; ``item``
    is its index in the input when it is an input item."""

    def __init__(self, what: str, obj: object, cause: BaseException,
                 item: int | None = None) -> None:
        self.what, self.item = what, item
        self.type_name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        advice = ("It is nested too deeply to serialize: make it flatter, or raise "
                  "sys.setrecursionlimit" if _too_deep(cause) else
                  "Make it picklable (define it at module level, or give it __reduce__ / "
                  "__getstate__), create it inside the function instead")
        super().__init__(
            f"Cannot serialize {what} (type {self.type_name}) with cloudpickle or dill: "
            f"{type(cause).__name__}: {cause}. {advice}, or use backend='threads' so nothing "
            "has to cross a process boundary."
        )


def _too_deep(error: BaseException | None) -> bool:
    """Whether ``error`` is, or comes from, a RecursionError (cloudpickle wraps its own)."""
    while error is not None:
        if isinstance(error, RecursionError):
            return True
        error = error.__cause__
    return False


class NotLoadedHere(ParforError):
    """A worker's answer that cannot be deserialized in the caller, with the cause chained: a
    class of the caller's that refuses the state it comes with, say."""


class WorkerError(ParforError):
    """A worker failed outside the user's function: it died, or the backend itself broke."""

    def __init__(self, message: str, *, backend: str, indices: Sequence[int]) -> None:
        self.backend = backend
        self.indices = list(indices)
        super().__init__(message)

    @classmethod
    def running(cls, backend: str, what: str, cause: BaseException,
                indices: Sequence[int] = ()) -> WorkerError:
        """The error for a task whose future failed: ``what`` says which work was running."""
        if isinstance(cause, NotLoadedHere) and cause.__cause__ is not None:
            cause = cause.__cause__
            return cls(f"Backend {backend!r} ran {what}, but its answer cannot be deserialized "
                       f"here: {type(cause).__name__}: {cause}", backend=backend,
                       indices=indices)
        return cls(f"Backend {backend!r} failed while running {what}, outside the function "
                   f"itself: {type(cause).__name__}: {cause}", backend=backend, indices=indices)


class WorkerDiedError(WorkerError):
    """A worker process died while running an item, each time that item was tried."""

    def __init__(self, message: str, *, backend: str, indices: Sequence[int],
                 subject: str | None = None) -> None:
        super().__init__(message, backend=backend, indices=indices)
        self.subject = subject  # the words of the message that name the work, if known

    def naming(self, subject: str) -> WorkerDiedError:
        """The same error naming the work otherwise: a ParPool's task by its handle, rather
        than as the input item 0 that each of its tasks is to the backend."""
        if self.subject is None:
            return self
        return WorkerDiedError(str(self).replace(self.subject, subject, 1),
                               backend=self.backend, indices=self.indices, subject=subject)


_seen: set[tuple[type[Warning], str]] = set()


def warn_once(message: str, category: type[Warning]) -> None:
    """`warn`, but once per message: settings and plugins are looked up on every call."""
    if (category, message) not in _seen:
        _seen.add((category, message))
        warn(message, category)


def warn(message: str, category: type[Warning]) -> None:
    """Warn, pointing at the user's line: the first frame outside parfor's packages."""
    frame, level = sys._getframe(1), 2  # level 1 would be this function
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
            "parfor", "parfor_core", "parfor_backends"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
