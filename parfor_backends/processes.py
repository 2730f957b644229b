"""The processes backend: parfor's own pool of worker processes, fed over private pipes.

Workers start on first need and are reused by later calls; each gets a call's function and
arguments once. A worker that dies is replaced, and the items it held are retried one by one,
so that an item that kills its worker is found, and fails with an error naming it. What a
worker prints is shown in the caller, line by line, above any progress bar.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import IO

from parfor_backends._framing import COUNT, read_frame, write_frame
from parfor_backends._retrying import Job, abandon, settle
from parfor_core import (
    SETTINGS,
    Backend,
    Result,
    Task,
    answer_holds_shared,
    hookimpl,
    load_result,
    release_shared,
    share_call,
)
from parfor_core._idle import IdleWatch
from parfor_core._progress import tqdm_class
from parfor_core._task import add_note

#: Seconds a pool with nothing to do keeps its workers (the configured default).
IDLE_TIMEOUT = SETTINGS["idle_timeout"].default
#: How often an item that killed its worker is run again, alone, before it fails.
RETRIES = SETTINGS["retries"].default
#: Seconds that stopping workers waits for them to finish the item they run, before killing.
STOP_SECONDS = 2.0
#: How long a stop waits at least for the workers' reader threads, once the workers ended.
READERS_SECONDS = 0.5
#: Seconds a task nobody waits for any more may run on, while other work waits for its worker,
#: before the worker is killed: a quick chunk finishes sooner than a new worker starts.
ABANDONED_SECONDS = 0.25


class ProcessesBackend(Backend):
    """A pool of ``n_workers`` worker processes that parfor starts, watches and reuses."""

    name = "processes"
    crosses_process = True

    def __init__(self, n_workers: int, *, idle_timeout: float = IDLE_TIMEOUT,
                 retries: int = RETRIES,
                 worker_output: bool = SETTINGS["worker_output"].default) -> None:
        super().__init__(n_workers)
        self.retries = retries
        self.worker_output = worker_output
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._pending: deque[Job] = deque()
        self._idle = IdleWatch(idle_timeout, self._stop_if_idle)
        self._recheck: threading.Timer | None = None  # looks at abandoned tasks (see below)
        self._recheck_lock = threading.RLock()  # not the pool's: taken where its holder may be
        _backends.add(self)

    @classmethod
    def auto_priority(cls) -> int | None:
        return 20

    @property
    def idle_timeout(self) -> float:
        """Seconds the pool keeps its workers after its last task (from its next idle spell)."""
        return self._idle.timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float) -> None:
        self._idle.timeout = seconds

    def submit(self, task: Task) -> Future[Result]:
        share_call(task.call)  # serialized here, so that what cannot be sent fails the caller
        job = Job.of(task, local=True)
        job.future.add_done_callback(self._on_done)
        with self._lock:
            self._pending.append(job)
            self._pump()
        return job.future

    def prepare(self, n_items: int | None) -> None:
        """Start the workers the call will use now: each takes tens of milliseconds to boot,
        which the caller spends drawing the progress bar meanwhile."""
        wanted = self.n_workers if n_items is None else min(self.n_workers, n_items)
        with self._lock:
            while len(self._workers) < wanted:
                self._workers.append(_Worker.start(self))
            self._pump()  # arms the idle watch, should no task follow

    def reclaim(self, future: Future[Result]) -> bool:
        """Give back a task that waits while every worker is still starting, unless a worker
        had it before (it died with it): that task must not run in the caller."""
        with self._lock:
            if any(worker.ready for worker in self._workers):
                return False
            job = next((job for job in self._pending if job.future is future), None)
            if job is None or job.started:  # one that a worker had may have killed it
                return False
            self._pending.remove(job)
            release_shared(job.items)
            self._pump()  # arms the idle watch, should that have been the last task
            return True

    def interrupt(self) -> None:
        self._stop(kill=True)

    def shutdown(self) -> None:
        self._stop(kill=False)

    def _forget_in_child(self) -> None:
        """In a forked child: the workers are the parent's (`_disown_in_child` lets go of them).
        Start empty: the child starts workers of its own if it calls."""
        self._lock = threading.RLock()  # another thread of the parent may have held these
        self._recheck_lock = threading.RLock()
        self._workers = []
        self._pending = deque()
        self._idle = IdleWatch(self._idle.timeout, self._stop_if_idle)
        self._recheck = None

    # -- scheduling (all with self._lock held) -------------------------------------------------

    def _pump(self) -> None:
        """Hand pending jobs to idle workers, starting workers up to ``n_workers``.

        A worker gets a task only once it is ready, and its next one only once its last result
        is back: a task in a worker's pipe could no longer be cancelled, nor given to a worker
        that frees up first, nor taken back by the caller while the workers start.
        """
        self._idle.disarm()
        while self._pending:
            job = self._pending[0]
            if job.future.cancelled():
                release_shared(self._pending.popleft().items)
                continue
            worker = next((w for w in self._workers if w.ready and w.job is None), None)
            if worker is None:
                break
            self._pending.popleft()
            worker.run(job)
        self._retire_abandoned()  # before starting workers: the killed ones' successors
        starting = sum(not worker.ready for worker in self._workers)
        while len(self._workers) < self.n_workers and len(self._pending) > starting:
            self._workers.append(_Worker.start(self))
            starting += 1
        if self._workers and not self._pending and not any(w.job for w in self._workers):
            self._idle.arm()

    def _retire_abandoned(self) -> None:
        """Kill workers that run a task nobody waits for any more (a closed gmap's, a deleted or
        closed ParPool's), as many as the waiting work needs beyond the workers that are
        starting or may still start, and only once they have had ``ABANDONED_SECONDS`` since
        that work first needed them: the work is not held up, for as long as a long item takes,
        by results that will be thrown away, while a quick chunk finishes and keeps its warm
        worker. One still in that grace is looked at again when the grace ends."""
        abandoned = [w for w in self._workers if w.job is not None and w.job.future.cancelled()]
        if not abandoned:
            return
        waiting = sum(not job.future.cancelled() for job in self._pending)
        short = (waiting - sum(not w.ready for w in self._workers)
                 - (self.n_workers - len(self._workers)))
        abandoned.sort(key=lambda w: (w.wanted_since is None, w.wanted_since or 0.0))
        for worker in abandoned[max(0, short):]:  # not needed (any more)
            worker.wanted_since = None
        now = time.monotonic()
        for worker in abandoned[:max(0, short)]:
            if worker.wanted_since is None:
                worker.wanted_since = now
            if now - worker.wanted_since < ABANDONED_SECONDS:
                self._look_again_in(worker.wanted_since + ABANDONED_SECONDS - now)
                continue
            self._workers.remove(worker)
            release_shared(worker.job.items)
            worker.job = None
            worker.stop(kill=True, wait=None)
            worker.release()  # now: a process the task forked may hold its results pipe open

    def _on_done(self, future: Future[Result]) -> None:
        """A task was cancelled, perhaps while a worker runs it: look at the workers soon. From
        the timer's thread, not this one, which may be anywhere, even in this pool's own code
        (a garbage collection there that closes a forgotten gmap)."""
        if future.cancelled():
            self._look_again_in(0.0)

    def _look_again_in(self, seconds: float) -> None:
        with self._recheck_lock:
            if self._recheck is not None and self._recheck.is_alive():
                return  # that one looks, and asks for another if it needs to
            timer = threading.Timer(seconds, self._look_again)
            timer.daemon = True
            try:
                timer.start()
            except RuntimeError:  # no new threads at interpreter exit, which stops them all
                return
            self._recheck = timer

    def _look_again(self) -> None:
        with self._recheck_lock:
            self._recheck = None  # what this look finds still in its grace needs a new timer
        with self._lock:
            failed = self._pump_or_fail()
        _fail(failed)

    def _stop_if_idle(self) -> None:
        with self._lock:  # looked at and taken in one go: a task may come in at any moment
            if self._idle.armed or self._pending or any(w.job for w in self._workers):
                return  # armed again (idle anew) since the watch fired, or busy
            workers, jobs = self._take_all()
        self._end(workers, jobs, kill=False)

    def _stop(self, kill: bool) -> None:
        with self._lock:
            workers, jobs = self._take_all()
        self._end(workers, jobs, kill)

    def _take_all(self) -> tuple[list[_Worker], list[Job]]:
        """With the lock held: take every worker and job from the pool, which is then empty."""
        workers, self._workers = self._workers, []
        jobs = [w.job for w in workers if w.job] + list(self._pending)
        self._pending.clear()
        self._idle.close()
        return workers, jobs

    def _end(self, workers: list[_Worker], jobs: list[Job], kill: bool) -> None:
        """Fail ``jobs`` (``kill``: interrupted) and end ``workers`` (taken from the pool)."""
        for job in jobs:
            abandon(job.future, self.name, kill)
            release_shared(job.items)
        for worker in workers:  # all told first, so that they end side by side; one that is
            worker.stop(kill or not worker.ready, wait=None)  # starting has run nothing yet
        deadline = time.monotonic() + STOP_SECONDS  # one wait for them all, not one each
        for worker in workers:
            worker.stop(kill or not worker.ready, wait=max(0.0, deadline - time.monotonic()))
        # The readers end as soon as they read the end of their pipes; at exit, one left
        # running while the interpreter is torn down may crash it.
        deadline = max(deadline, time.monotonic() + READERS_SECONDS)
        for worker in workers:
            worker.reader_ended(max(0.0, deadline - time.monotonic()))

    # -- events from the workers' reader threads -----------------------------------------------

    # Futures are resolved after the lock is released: resolving runs the caller's callbacks,
    # which may take locks of their own (a ParPool's) while the caller holds those and submits.

    def _finished(self, worker: _Worker, answer: Result | BaseException) -> None:
        """The worker answered its job: a Result, or the error that reading the answer (or
        showing the job's output) raised."""
        outcome = None
        with self._lock:
            job, worker.job = worker.job, None
            if job is not None:
                if isinstance(answer, BaseException):
                    release_shared(job.items)
                    outcome = answer
                else:
                    outcome = self._advance(job, lambda: job.finish(answer))
            failed = self._pump_or_fail()
        if job is not None and outcome is not None:
            settle(job.future, outcome)
        _fail(failed)

    def _ready(self, worker: _Worker) -> None:
        """The worker has started: it may take tasks."""
        with self._lock:
            worker.ready = True
            failed = self._pump_or_fail()
        _fail(failed)

    def _died(self, worker: _Worker) -> None:
        """A worker's result pipe closed: it exited or was killed. Retry or fail its job.

        One that dies while starting counts as the death of the oldest waiting job, as if
        it had run it: a worker that cannot start fails the call, after the retries, rather
        than being started again for ever."""
        how = worker.exit_description()
        outcome = None
        with self._lock:
            if worker not in self._workers:  # stopped on purpose
                return
            self._workers.remove(worker)
            worker.release()
            job, worker.job = worker.job, None
            if not worker.ready and job is None and self._pending:
                job = self._pending.popleft()
                how += " while it was starting, before it ran anything"
            if job is not None:
                if job.future.cancelled() or worker.error is not None:
                    release_shared(job.items)
                    outcome = worker.error
                else:
                    outcome = self._advance(job, lambda: job.after_death(
                        f"worker process {worker.pid}", f"{how}. {_meaning(how)}",
                        self.retries, self.name))
            failed = self._pump_or_fail()
        if job is not None and outcome is not None:
            settle(job.future, outcome)
        _fail(failed)

    def _pump_or_fail(self) -> list[tuple[Job, Exception]]:
        """`_pump`, from a thread of the pool's own (a reader, a timer), where no caller sees
        what it raises: where a worker cannot start (no memory or descriptors left, as after
        the kernel killed one for memory), the jobs that wait fail, rather than wait for ever.
        With the lock held; the failed jobs are for `_fail`, once the lock is let go."""
        try:
            self._pump()
        except Exception as exc:
            add_note(exc, "parfor: raised while starting a worker process")
            failed = [(job, exc) for job in self._pending]
            self._pending.clear()
            return failed
        return []

    def _advance(self, job: Job, step: Callable[[], Job | Result]) -> Result | Exception | None:
        """With the lock held: what comes of ``job`` after ``step()`` (its finish, or what
        follows a death). A next job is queued (None); else what to settle its future with."""
        try:
            outcome = step()
        except Exception as exc:  # the next job could not be made: fail the call, never hang
            release_shared(job.items)
            return exc
        if isinstance(outcome, Job):
            self._pending.appendleft(outcome)
            return None
        return outcome


def _fail(failed: list[tuple[Job, Exception]]) -> None:
    """Settle the jobs `ProcessesBackend._pump_or_fail` failed."""
    for job, error in failed:
        release_shared(job.items)
        settle(job.future, error)


def _meaning(how: str) -> str:
    if "SIGKILL" in how:
        return ("SIGKILL often means the out-of-memory killer stopped it: the item may need "
                "more memory than is free.")
    if "SIGSEGV" in how or "SIGBUS" in how:
        return "That is a crash in native code (a C extension, ctypes, a broken library)."
    return "It ended itself (os._exit, or a fatal error in native code)."


#: What a worker process runs: ``-c`` rather than ``-m``, which would first import runpy.
#: Started with parfor's folder on its path, not in its environment: what the worker's function
#: starts in turn inherits the caller's environment, not one with parfor's folder added.
WORKER_MAIN = ("import sys; sys.path.insert(1, sys.argv[1]); "
               "from parfor_backends._process_worker import main; main(*map(int, sys.argv[2:]))")


class _Worker:
    """One worker process, the pipes to it, and the threads that read what it sends."""

    def __init__(self, backend: ProcessesBackend, process: subprocess.Popen[bytes],
                 lifeline: int | None, results: IO[bytes]) -> None:
        self.backend = backend
        self.process = process
        self.pid = process.pid
        self.job: Job | None = None
        self.ready = False  # it has started and read its settings: it may take tasks
        self.wanted_since: float | None = None  # when other work first waited for it
        self.known_calls: set[str] = set()
        self._lifeline = lifeline
        self._results = results
        self._disowned = False  # in a forked child: the parent's worker, never written to
        #: What fails the running job instead of its answer: what showing its output raised,
        #: or a fault of the reader thread itself (the worker is then killed).
        self.error: BaseException | None = None
        _live.add(self)
        self._reader = threading.Thread(target=self._read_results, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, backend: ProcessesBackend) -> _Worker:
        # The bar class that _show writes through, made here, on a caller's thread (the first
        # start is on one), not on a reader thread: making it (warnings.catch_warnings) is not
        # safe for the process's other threads.
        if backend.worker_output:
            tqdm_class()
        lifeline_read, lifeline_write = os.pipe()
        _lifelines.add(lifeline_write)  # at once: a fork from now on lets go of it
        results_read, results_write = os.pipe()
        # Python-level output comes over the results pipe; what native code writes to the file
        # descriptors goes straight to ours.
        output = None if backend.worker_output else subprocess.DEVNULL
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            with _sigint_blocked():
                process = subprocess.Popen(
                    [sys.executable, "-u", "-c", WORKER_MAIN, package_root, str(lifeline_read),
                     str(results_write)],
                    stdin=subprocess.PIPE, stdout=output, stderr=output,
                    pass_fds=(lifeline_read, results_write),
                )
        except BaseException:
            _lifelines.discard(lifeline_write)
            os.close(lifeline_write)
            os.close(results_read)
            raise
        finally:
            os.close(lifeline_read)
            os.close(results_write)
        worker = cls(backend, process, lifeline_write, os.fdopen(results_read, "rb"))
        try:
            worker._send(b"I", pickle.dumps((sys.path, backend.worker_output)))
        except BrokenPipeError:
            pass  # it failed at once: its reader thread reports it as dying while starting
        return worker

    def run(self, job: Job) -> None:
        """Send ``job`` to this idle worker, and the call first if the worker lacks it."""
        self.job = job
        self.wanted_since = None
        job.started = True
        call = job.task.call
        try:
            if call.id not in self.known_calls:  # sent with the task, in one write
                self._send(b"C", call.id.encode(), share_call(call), flush=False)
                self.known_calls.add(call.id)
                call.releasers.append(lambda: self._forget(call.id))
            self._send(b"T", call.id.encode(), job.items)
        except BrokenPipeError:
            pass  # it died: its reader thread reports that, and the job is run again

    def _forget(self, call_id: str) -> None:
        with self.backend._lock:
            if call_id in self.known_calls:
                self.known_calls.discard(call_id)
                try:
                    self._send(b"F", call_id.encode())
                except (BrokenPipeError, ValueError):
                    pass

    def _on_result(self, body: memoryview) -> None:
        """Hand the answer to the running job, and tell the worker it was read."""
        answer: Result | BaseException
        try:
            answer = load_result(body)
        except BaseException as exc:  # SystemExit too (a __setstate__'s): the caller's to raise
            answer = exc
        if answer_holds_shared(body):
            with self.backend._lock:
                self._acknowledge()
        if self.error is not None:
            answer, self.error = self.error, None
        self.backend._finished(self, answer)

    def _acknowledge(self) -> None:
        """Tell the worker its oldest answer in shared memory is read: it lets go of that
        memory (this process maps it now, if it needs it)."""
        try:
            self._send(b"A")
        except (BrokenPipeError, ValueError):
            pass  # it died, or is stopping: its memory goes with it

    def _send(self, kind: bytes, *body: bytes, flush: bool = True) -> None:
        if not self._disowned:  # its file's lock may be one a parent's thread held at the fork
            write_frame(self.process.stdin, kind, *body, flush=flush)

    def _read_results(self) -> None:
        try:
            while self._take_message():
                pass
        except BaseException as exc:  # never a job left unanswered: this fails it
            add_note(exc, f"parfor: raised while reading what worker process {self.pid} sent")
            self.error = exc
            self.process.kill()
        self._results.close()
        self.backend._died(self)

    def _take_message(self) -> bool:
        """Handle the worker's next message; False when there are no more. (A method: no
        frame keeps the last message, and a result's values, alive while the next is awaited.)
        """
        frame = read_frame(self._results)
        if frame is None:
            return False
        kind, body = frame
        if kind == b"R":
            self._on_result(body)
        elif kind == b"Y":
            self.backend._ready(self)
        elif kind == b"P":
            job = self.job
            if job is not None and job.task.report is not None:
                job.task.report(COUNT.unpack(body)[0])
        else:  # b"O" or b"E": lines the worker printed
            try:
                _show(bytes(body).decode(errors="replace"), sys.stdout if kind == b"O"
                      else sys.stderr)
            except Exception as exc:  # a closed or broken stream: the job fails, as print would
                # (output while no job runs, from a thread of a finished task, is lost instead:
                # no other job printed it)
                if self.error is None and self.job is not None:
                    add_note(exc, f"parfor: raised while showing what worker process "
                                  f"{self.pid} printed")
                    self.error = exc
        return True

    def exit_description(self) -> str:
        code = _ended(self.process, 5)
        if code < 0:
            try:
                return f"killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def stop(self, kill: bool, wait: float | None = STOP_SECONDS) -> None:
        """End the process: at once (``kill``), or by closing its task stream; then wait up to
        ``wait`` seconds for it to be gone (then it is killed), unless ``wait`` is None."""
        if kill:
            self.process.kill()
        else:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if wait is None:
            return
        _ended(self.process, wait)
        self.release()

    def reader_ended(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the reader thread to finish (the process has
        ended: it reads the end of the pipe), unless this is that thread."""
        if self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def disown(self, devnull: int) -> None:
        """In a forked child: close this process's copies of the task and result pipes of the
        parent's worker, without a byte written. The Python files on them are pointed at
        ``devnull`` and kept for good: closing one, even by collecting it, takes its lock,
        which a parent's thread may have held."""
        self._disowned = True
        self._lifeline = None  # closed with every other lifeline (see _disown_in_child)
        for stream in (self.process.stdin, self._results):
            if stream is not None and not stream.closed:
                os.dup2(devnull, stream.fileno(), inheritable=False)
                _disowned.append(stream)

    def release(self) -> None:
        """Close this side of the pipes to a worker that has ended (its reader thread closes
        the one from it when it reaches its end)."""
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is not None:
            _lifelines.discard(lifeline)
            os.close(lifeline)
        try:
            self.process.stdin.close()
        except OSError:
            pass
        _live.discard(self)


#: Every ProcessesBackend of this process, to be emptied in a forked child.
_backends: weakref.WeakSet[ProcessesBackend] = weakref.WeakSet()
#: Every worker whose pipes this process holds: in a pool, or stopping.
_live: weakref.WeakSet[_Worker] = weakref.WeakSet()
#: This process's end of every lifeline: put here as soon as it exists, also while its worker
#: starts, so that a forked child closes its copy (which would keep the worker alive).
_lifelines: set[int] = set()
#: In a forked child, the parent's pipe files, never to be closed (see `_Worker.disown`).
_disowned: list[IO[bytes]] = []


def _disown_in_child() -> None:
    """In a forked child: empty every pool, and close the child's copies of the pipes to the
    parent's workers (a copy of a lifeline would keep them alive past the parent's death).
    The pools first: the descriptors may fail, and must not leave the parent's pools in use."""
    for backend in list(_backends):
        backend._forget_in_child()
    for lifeline in list(_lifelines):
        with contextlib.suppress(OSError):
            os.close(lifeline)
    _lifelines.clear()
    workers = list(_live)
    _live.clear()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for worker in workers:
            worker.disown(devnull)
    finally:
        os.close(devnull)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_in_child)


def _ended(process: subprocess.Popen[bytes], timeout: float) -> int:
    """The exit code of ``process`` once it has ended, killed if that takes over ``timeout``
    seconds. Woken by the exit itself (a pidfd, on Linux): Popen.wait with a timeout polls with
    growing sleeps, which can double a few milliseconds' wait."""
    if process.returncode is None and hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError:  # reaped already, or a kernel without pidfds: Popen.wait's way
            pass
        else:
            try:
                waiting = select.poll()  # not select.select: this descriptor may be above 1023
                waiting.register(pidfd, select.POLLIN)
                waiting.poll(timeout * 1000)
            finally:
                os.close(pidfd)
            timeout = 0  # it has ended, or has had its time
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while a worker is made, which then starts with it blocked,
    until it ignores it: a Ctrl-C is the caller's to handle, also while a worker imports (its
    traceback then appeared among the bars). One that comes meanwhile here comes after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


#: How long showing a worker's lines waits for the bars' lock before it goes on without ...
SHOW_LOCK_SECONDS = 2.0
#: ... and the locks that made it wait so long once: they are only tried since, not waited for.
_stuck_locks: set[int] = set()


def _show(lines: str, file: IO[str]) -> None:
    """Show lines a worker printed, above any progress bar: under the bars' lock (which a
    forked child renews) where it can be had. A lock left held for ever (a process forked
    while holding it, which ended; a Ctrl-C between tqdm's two locks) would otherwise stop
    this worker's results with its lines, and the call would wait for ever."""
    bars = tqdm_class()
    lock = bars.get_lock()
    parts = getattr(lock, "locks", [lock])  # tqdm's own: a process's and a thread's
    taken = []
    for lock in parts:
        if not lock.acquire(timeout=0 if id(lock) in _stuck_locks else SHOW_LOCK_SECONDS):
            _stuck_locks.add(id(lock))
            break
        _stuck_locks.discard(id(lock))
        taken.append(lock)
    try:
        bars.write(lines, file=file, nolock=True)
    finally:
        for lock in reversed(taken):
            lock.release()


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [ProcessesBackend]
