"""Runs one call over an input through a backend: lazy chunking, a bounded window, ordering."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from ._chunking import ChunkSizer
from ._task import Call, Result, Task, add_note, is_item_error, run_task
from .backend import Backend
from .errors import SerializationError, WorkerError

if TYPE_CHECKING:
    from concurrent.futures import Future

#: Chunks in flight (or finished but waiting for their turn) per worker: enough to keep every
#: worker busy, few enough that the input is read only a bounded distance ahead of the results.
CHUNKS_PER_WORKER = 2


def dispatch(
    backend: Backend,
    call: Call,
    items: Input,
    sizer: ChunkSizer,
    *,
    ordered: bool = True,
    on_done: Callable[[int], object],
    help_while_starting: bool = False,
    keeps_all: bool = False,
) -> Iterator[tuple[Sequence[int], list[Any]]]:
    """Yield ``(input indices, values)`` batches covering every item; re-raise the first failure.

    Items already read from ``items`` were run elsewhere. With ``help_while_starting``, tasks
    the backend gives back while its workers start (`Backend.reclaim`) run here meanwhile: a
    short call of quick items is done before the first worker is, and a slow item here delays
    no other. An error of the input, or an item that cannot be sent to the workers, is raised
    after the results of the items before it, as a serial loop would.

    With ``ordered`` results come in input order (a failure is raised when its turn comes, after
    the values before it); otherwise as soon as they are done. Results that wait for their turn
    count against the chunks read ahead, unless the caller ``keeps_all`` of them anyway (pmap):
    then one slow item holds back no other work. Closing the generator cancels
    what has not run.
    """
    from concurrent.futures import FIRST_COMPLETED, wait  # not at import: it loads logging

    window = CHUNKS_PER_WORKER * max(1, backend.n_workers)
    in_flight: dict[Future[Result], tuple[int, Task]] = {}
    finished: dict[int, tuple[Task, Result]] = {}
    submitted = yielded = 0
    exhausted = False
    progress = _Progress(on_done)
    try:
        while True:
            while not exhausted and len(in_flight) + (0 if keeps_all else len(finished)) < window:
                chunk = items.take(sizer.next_size())
                if not chunk:
                    exhausted = True
                    break
                sizer.taken(len(chunk))
                task = Task(call, range(items.read - len(chunk), items.read), chunk,
                            progress.reporter(submitted))
                sent = _submitted(backend, task, items)
                if sent is None:
                    exhausted = True
                    break
                in_flight[sent[0]] = (submitted, sent[1])
                submitted += 1
            if not in_flight:
                items.raise_held()
                return
            if help_while_starting:
                oldest = min(in_flight, key=lambda f: in_flight[f][0])
                help_while_starting = backend.reclaim(oldest)  # until a worker is ready
            if help_while_starting:
                number, task = in_flight.pop(oldest)
                answers: Iterable[tuple[int, Task, Result]] = [(number, task, run_task(task))]
            else:
                answers = _answers(wait(in_flight, return_when=FIRST_COMPLETED)[0], backend,
                                   in_flight)
            for number, task, result in answers:
                sizer.record(len(result.values) + (result.failure is not None), result.elapsed)
                progress.finish(number, len(result.values))
                if ordered:
                    finished[number] = (task, result)
                else:
                    yield from emit(task, result)
            while yielded in finished:
                yield from emit(*finished.pop(yielded))
                yielded += 1
    except (KeyboardInterrupt, RuntimeError) as error:
        pressed = ctrl_c_of(error)
        if pressed is None:
            raise
        if in_flight:
            from ._ctrl_c import interrupt_held  # not at import: it loads signal and enum

            interrupt_held(backend)
        if pressed is error:
            raise
        raise pressed from error
    finally:
        call.cancelled = True
        for future in in_flight:
            future.cancel()


def ctrl_c_of(error: BaseException) -> KeyboardInterrupt | None:
    """The user's Ctrl-C that ``error`` is or hides, if any. A second press that lands while
    a ``threading.Condition`` wait takes its lock back after the first makes that wait raise
    "release unlocked lock" instead (CPython's, with the presses as its context): the
    Ctrl-C is the cause all the same, and the workers must stop."""
    if is_item_error(error):
        return None
    if isinstance(error, KeyboardInterrupt):
        return error
    context = error.__context__
    if (isinstance(error, RuntimeError) and str(error) == "release unlocked lock"
            and isinstance(context, KeyboardInterrupt)):
        return context
    return None


class _Progress:
    """Turns the backends' reports of items done within running tasks into progress steps."""

    def __init__(self, on_done: Callable[[int], object]) -> None:
        self.on_done = on_done
        self.reported: dict[int, int] = {}
        self.lock = threading.Lock()

    def reporter(self, number: int) -> Callable[[int], None]:
        return lambda done: self._advance(number, done)

    def _advance(self, number: int, done: int) -> None:
        with self.lock:  # backends report from their own threads
            step = done - self.reported.get(number, 0)
            if step <= 0:
                return
            self.reported[number] = done
        self.on_done(step)

    def finish(self, number: int, done: int) -> None:
        with self.lock:
            step = done - self.reported.pop(number, 0)
        self.on_done(step)


class Input:
    """A call's items, read in chunks as they are needed. An error the iterable raises is held
    back until the items read before it are done: a serial loop would have run them too, and
    gmap yields their results before the error (`raise_held`)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.source = iter(items)
        self.read = 0  # items read so far: the input position of the next one
        self._error: Exception | None = None

    def take(self, n: int) -> list[Any]:
        """The next at most ``n`` items; an empty list once the input is spent or failed."""
        chunk: list[Any] = []
        if self._error is None:
            try:
                chunk.extend(islice(self.source, n))
            except Exception as exc:
                add_note(exc, f"parfor: raised by the input iterable after "
                              f"{self.read + len(chunk)} items")
                self._error = exc
        self.read += len(chunk)
        return chunk

    def hold(self, error: Exception) -> None:
        """End the input with ``error``, raised once the items read before it are done."""
        self._error = error

    def raise_held(self) -> None:
        """Raise the iterable's error, if it raised one."""
        error, self._error = self._error, None
        if error is not None:
            raise error


def _submitted(backend: Backend, task: Task, items: Input
               ) -> tuple[Future[Result], Task] | None:
    """``task`` submitted, with its future. Where one of its items cannot be sent, that ends
    the input (the error held in ``items``), and only the items before it are: None if none."""
    try:
        return backend.submit(task), task
    except SerializationError as error:
        items.hold(error)
        before = task.indices.index(error.item) if error.item in task.indices else 0
        if before == 0:
            return None
        return _submitted(backend, task._replace(indices=task.indices[:before],
                                                 items=task.items[:before]), items)


def _answers(done: set[Future[Result]], backend: Backend,
             in_flight: dict[Future[Result], tuple[int, Task]]
             ) -> Iterator[tuple[int, Task, Result]]:
    """The finished tasks' numbers, tasks and results, in submission order; each leaves
    ``in_flight`` when its turn comes."""
    for future in sorted(done, key=lambda f: in_flight[f][0]):
        number, task = in_flight.pop(future)
        yield number, task, _result(future, task, backend, in_flight)


def _result(future: Future[Result], task: Task, backend: Backend,
            in_flight: dict[Future[Result], tuple[int, Task]]) -> Result:
    try:
        return future.result()
    except Exception as exc:
        # A dead worker fails every task in flight at once: name them all, not a bystander.
        failed = [task, *(other for other_future, (_, other) in in_flight.items()
                          if other_future.done() and not other_future.cancelled()
                          and other_future.exception() is not None)]
        indices = sorted(index for each in failed for index in each.indices)
        raise WorkerError.running(backend.name, _items_label(indices), exc, indices) from exc


def _items_label(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"input item {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"input items {indices[0]} to {indices[-1]}"
    shown = ", ".join(map(str, indices[:8]))
    return f"input items {shown}{', ...' if len(indices) > 8 else ''} ({len(indices)} items)"


def emit(task: Task, result: Result, count: int | None = None
         ) -> Iterator[tuple[Sequence[int], list[Any]]]:
    """Yield the task's done items' indices and values (``count`` of them, when the values
    list holds earlier ones too); then raise its failure, if any."""
    yield task.indices[:len(result.values) if count is None else count], result.values
    failure = result.failure
    if failure is not None:
        failure.reraise(f"item {failure.index} ({failure.item_repr})")
