"""Starts worker processes from one long-lived thread of this process.

A worker asks the kernel to kill it when its parent dies (`die_with_parent`), which works even
while it is stuck in native code that holds the GIL, where its own watching thread cannot run.
But Linux sends that signal when the *thread* that forked the worker ends, not the process: a
worker started by a caller's short-lived thread, or by the reader thread of a worker that died,
would be killed with that thread. So every worker is forked by this one thread, which lives as
long as the process.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from concurrent.futures import Future
from typing import Any

_requests: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]]
_requests_of_pid: int | None = None


def start_process(args: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args, **popen_kwargs)``, forked by the spawning thread. Interrupted
    while waiting (Ctrl-C), it leaves no process behind: one started meanwhile is killed."""
    future: Future[subprocess.Popen[bytes]] = Future()
    _spawning_requests().put((future, args, popen_kwargs))
    try:
        return future.result()
    except BaseException:
        if not future.cancel():  # started, or starting: nobody will own it
            future.add_done_callback(_kill_unowned)
        raise


def _spawning_requests() -> queue.SimpleQueue[Any]:
    """The spawning thread's queue, with the thread started on first need in each process
    (a forked child has no copy of its parent's thread). Two threads asking first at once may
    start two spawning threads; each serves the requests put in its own queue, and lives on."""
    global _requests, _requests_of_pid
    if _requests_of_pid != os.getpid():
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=_spawn, args=(requests,), name="parfor-spawner",
                         daemon=True).start()
        _requests, _requests_of_pid = requests, os.getpid()
    return _requests


def _spawn(requests: queue.SimpleQueue[Any]) -> None:
    while True:
        _serve(*requests.get())


def _serve(future: Future[subprocess.Popen[bytes]], args: list[str],
           popen_kwargs: dict[str, Any]) -> None:
    if future.set_running_or_notify_cancel():  # not if the caller gave up before the start
        try:
            future.set_result(subprocess.Popen(args, **popen_kwargs))
        except BaseException as exc:
            future.set_exception(exc)


def _kill_unowned(future: Future[subprocess.Popen[bytes]]) -> None:
    if not future.cancelled() and future.exception() is None:
        process = future.result()
        process.kill()
        process.wait()
