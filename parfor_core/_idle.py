"""IdleWatch: runs an action once something (a pool, kept shared memory) has had nothing to do
for a given time.

One thread per watch, re-armed by setting a deadline: a ``threading.Timer`` per idle spell
would start a thread at the end of every call, which costs a short call a tenth of its time.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from time import monotonic


class IdleWatch:
    """Calls ``on_idle()`` (from its own thread) once ``timeout`` seconds have passed since
    the last `arm` with no `disarm` after it."""

    def __init__(self, timeout: float, on_idle: Callable[[], object]) -> None:
        self.timeout = timeout
        self._on_idle = on_idle
        self._changed = threading.Condition(threading.Lock())
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        #: The thread that waits without a deadline, which only a notify wakes; a thread, not
        #: a flag, so that a closed one waking late cannot clear the mark of its successor.
        self._sleeper: threading.Thread | None = None

    def arm(self) -> None:
        """The pool has just become idle."""
        with self._changed:
            self._deadline = monotonic() + self.timeout
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="parfor-idle-watch",
                                                daemon=True)
                self._thread.start()
            elif self._sleeper is not None:
                self._changed.notify_all()

    def disarm(self) -> None:
        """The pool has work: the thread, if waiting for a deadline, finds none when it wakes."""
        self._deadline = None

    @property
    def armed(self) -> bool:
        """Whether a deadline is set: ``on_idle`` sees False, unless the pool was armed again
        (idle anew) since the deadline it fires for."""
        return self._deadline is not None

    def close(self) -> None:
        """End the thread (the pool has stopped); a later `arm` starts another."""
        with self._changed:
            self._deadline = None
            self._thread = None
            self._changed.notify_all()

    def _watch(self) -> None:
        me = threading.current_thread()
        with self._changed:
            while self._thread is me:
                deadline = self._deadline
                if deadline is None:
                    self._sleeper = me
                    self._changed.wait()
                    if self._sleeper is me:
                        self._sleeper = None
                    continue
                left = deadline - monotonic()
                if left > 0:  # an endless timeout (inf) waits in the longest steps there are
                    self._changed.wait(min(left, threading.TIMEOUT_MAX))
                    continue
                self._deadline = None
                self._changed.release()  # on_idle takes the pool's lock, which arm's callers hold
                try:
                    self._on_idle()
                except Exception as exc:  # the watch goes on: the next idle spell tries again
                    warnings.warn(f"parfor: an idle pool could not be stopped: {exc!r}",
                                  RuntimeWarning, stacklevel=1)
                finally:
                    self._changed.acquire()
