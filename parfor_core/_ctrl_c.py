"""A Ctrl-C pressed again while the first one stops the workers: held back until they are."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backend import Backend

#: Seconds for which presses are held back: a stop that takes longer (one that hangs) can be
#: broken off by the next press.
HOLD_SECONDS = 5.0


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Run the block with Ctrl-C held back: a backend's stop that a second press broke off
    would leave workers running, out of its pool (impatient presses come in bursts). Only in
    the main thread, and only where Python's own handler is set: another is the program's."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    until = time.monotonic() + HOLD_SECONDS

    def hold(signum: int, frame: FrameType | None) -> None:
        if time.monotonic() > until:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupt_held(backend: Backend) -> None:
    """Stop the backend's running tasks for a Ctrl-C, further presses held back meanwhile."""
    with ctrl_c_held():
        backend.interrupt()
