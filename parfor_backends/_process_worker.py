"""A worker process of the processes backend: runs tasks from its parent, and only its parent.

Started as ``main(LIFELINE, RESULTS)`` in a fresh interpreter (``processes.WORKER_MAIN``).
Tasks arrive on stdin, results leave on the RESULTS pipe; both are pipes the parent made for
this worker alone. What the tasks print to sys.stdout and sys.stderr travels on the RESULTS
pipe too, line by line, so the parent shows it before the result it came with. The worker exits
when stdin closes, and at once when the parent dies (the LIFELINE pipe, whose other end only
the parent holds, reaches EOF: the kernel's SIGIO ends it then, also while native code holds
the GIL, and a thread watching the pipe backs that up). Ctrl-C is the parent's to handle.
"""

from __future__ import annotations

import codecs
import fcntl
import io
import os
import pickle
import signal
import sys
import threading
from collections import deque
from typing import Any

from parfor_backends._framing import COUNT, read_frame, write_frame

#: How often a running task's progress is sent to the parent, in seconds.
PROGRESS_INTERVAL = 0.2


def main(lifeline: int, results_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # born with it blocked: a pending one goes
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.register_at_fork(after_in_child=_output_of_a_fork)
    _killed_with_parent(lifeline)
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()
    tasks = os.fdopen(os.dup(0), "rb")
    _stdin_from_devnull()  # user code calling input() must not read the task stream
    results = os.fdopen(results_fd, "wb")
    send_lock = threading.Lock()

    def send(kind: bytes, body: bytes = b"") -> None:
        with send_lock:
            write_frame(results, kind, body)

    from parfor_core import answer_holds_shared, load_shared_call, mark_worker_process

    mark_worker_process(environment_is_callers=True)
    reporter = _ProgressReporter(send)
    outputs: list[_Output] = []
    calls: dict[str, Any] = {}
    unread: deque[bytes] = deque()  # answers in shared memory, kept until the parent read them
    while (frame := read_frame(tasks)) is not None:
        kind, body = frame
        if kind == b"T":
            answer = _answer(calls, body, reporter, outputs)
            if answer_holds_shared(answer):
                unread.append(answer)
            send(b"R", answer)
            del answer  # not held (a large one in the pipe's bytes) while the next task is awaited
        elif kind == b"A":  # the parent has read the oldest answer in shared memory
            unread.popleft()
        elif kind == b"C":
            call_id = bytes(body[:32]).decode()
            try:
                calls[call_id] = load_shared_call(call_id, body[32:])
            except BaseException as exc:  # reported with each task of that call, not a crash
                calls[call_id] = exc  # (an argument's __setstate__ may raise SystemExit)
        elif kind == b"F":
            calls.pop(bytes(body).decode(), None)
        elif kind == b"I":
            sys.path[:], show_output = pickle.loads(body)
            if show_output:
                outputs[:] = [_Output(send, b"O", 1), _Output(send, b"E", 2)]
                sys.stdout, sys.stderr = outputs
            else:
                sys.stdout = sys.stderr = open(os.devnull, "w")
            send(b"Y")  # ready: tasks may come now (until then the parent keeps them)
    tasks.close()  # not left to the exit: a ResourceWarning where the caller's filters show one


def _answer(calls: dict[str, Any], task: memoryview, reporter: _ProgressReporter,
            outputs: list[_Output]) -> bytes:
    """Run a task (its call's id, then its items) and answer the dumped Result."""
    from parfor_core import run_items, unloadable

    call_id, items = bytes(task[:32]).decode(), task[32:]
    call = calls[call_id]
    if isinstance(call, BaseException):
        return unloadable(items, "the function or its extra arguments", call)
    values: list[Any] = []
    reporter.watch(values)
    answer = run_items(call, items, values, local=True)
    reporter.watch(None)
    for output in outputs:
        output.flush()
    return answer


def _output_of_a_fork() -> None:
    """In a process that a task forked: what it prints goes to the file descriptors, as a
    native write would, not into the results pipe, whose messages are the worker's alone (it
    ends, sending nothing, when it is back from the task: see ``parfor_core.leave_fork``)."""
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - for its whole life
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _killed_with_parent(lifeline: int) -> None:
    """Have the kernel send SIGIO, whose default action ends a process, when the parent's end
    of the lifeline closes. That needs no GIL here, unlike the watching thread: a worker deep in
    native code that holds it goes at once too. (A parent gone before this is armed is caught by
    that thread.)"""
    try:
        signal.signal(signal.SIGIO, signal.SIG_DFL)  # not ignored, as an exec'd child may inherit
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGIO})
        fcntl.fcntl(lifeline, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(lifeline, fcntl.F_SETFL, fcntl.fcntl(lifeline, fcntl.F_GETFL) | os.O_ASYNC)
    except (AttributeError, OSError):  # a system without them: the watching thread still works
        pass


def _exit_with_parent(lifeline: int) -> None:
    while os.read(lifeline, 1):  # the parent never writes: this returns only at its death
        pass
    os._exit(1)


def _stdin_from_devnull() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


class _Output(io.TextIOBase):
    """sys.stdout or sys.stderr of a worker: sends whole lines to the parent as they come.

    Code that needs a file descriptor (a subprocess's stdout, faulthandler) gets ``fd``, the
    worker's own, which the parent's is: what goes there is shown as native writes are.
    """

    mode = "w"  # as the file it stands for has

    def __init__(self, send: Any, kind: bytes, fd: int) -> None:
        self._send = send
        self._kind = kind
        self._fd = fd
        self._pending = ""
        self._lock = threading.Lock()
        self.buffer = _OutputBuffer(self)

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "replace"

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        self.flush()  # what was printed before is sent now (shown after writes there, maybe)
        return self._fd

    def write(self, text: str) -> int:
        with self._lock:
            lines, newline, self._pending = (self._pending + text).rpartition("\n")
            if newline:
                self._send(self._kind, lines.encode(errors="replace"))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._send(self._kind, self._pending.encode(errors="replace"))
                self._pending = ""


class _OutputBuffer(io.RawIOBase):
    """The bytes side of an `_Output` (``sys.stdout.buffer``): UTF-8, decoded as it comes."""

    mode = "wb"

    def __init__(self, text: _Output) -> None:
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = memoryview(data)
        self._text.write(self._decoder.decode(data))
        return data.nbytes

    def fileno(self) -> int:
        return self._text.fileno()


class _ProgressReporter:
    """A thread that sends how many items of the running task are done, a few times a second.

    It is woken only when a task starts while it sleeps without a deadline; between quick
    tasks it keeps ticking, so that a stream of them costs no thread wake-up each.
    """

    def __init__(self, send: Any) -> None:
        self._send = send
        self._values: list[Any] | None = None
        self._asleep = False
        self._changed = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def watch(self, values: list[Any] | None) -> None:
        """Follow this task's list of values (None between tasks); no report follows None."""
        with self._changed:
            self._values = values
            if values is not None and self._asleep:
                self._changed.notify()

    def _run(self) -> None:
        watched, sent = None, 0
        with self._changed:
            while True:
                if self._values is None:
                    self._asleep = True
                    self._changed.wait()
                    self._asleep = False
                    continue
                self._changed.wait(PROGRESS_INTERVAL)
                values = self._values
                if values is None:
                    continue
                if values is not watched:
                    watched, sent = values, 0
                if len(values) != sent:  # sent under the lock: never after the result
                    sent = len(values)
                    self._send(b"P", COUNT.pack(sent))
