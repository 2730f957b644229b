"""parfor, pmap and gmap: from a function and an iterable to results, in parallel."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from ._arguments import make_call, settings_for, settle_sharing, show_bar, total_of
from ._chunking import ChunkSizer
from ._dispatch import Input, dispatch
from ._probe import Gathered, run_while_cheap, worth_probing
from ._progress import Progress, ProgressBar, check_bar
from ._registry import SERIAL, Selection, registry
from ._task import Call, inside_worker
from .backend import Backend

R = TypeVar("R")


class ProgressSpec(NamedTuple):
    """What bar to show, made when the generator starts so an unstarted one leaves none open."""

    bar: bool | Callable[[int], object] | ProgressBar
    total: int | None
    desc: str | None
    bar_kwargs: Mapping[str, Any]


def gmap(
    fun: Callable[..., R],
    iterable: Iterable[Any],
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    total: int | None = None,
    desc: str | None = None,
    bar: bool | Callable[[int], object] | ProgressBar | None = None,
    serial: bool | None = None,
    length: int | None = None,
    n_processes: int | None = None,
    yield_ordered: bool = True,
    yield_index: bool = False,
    backend: str | Backend | None = None,
    **bar_kwargs: Any,
) -> Iterator[Any]:
    """Like `pmap`, but a generator: each result is yielded as soon as it may be.

    The input is read lazily, a bounded number of chunks ahead of the results, so an endless
    generator works in constant memory. Closing the generator early cancels the rest.
    """
    return _flatten(_batches(fun, iterable, args, kwargs, total, desc, bar, serial, length,
                             n_processes, yield_ordered, yield_index, backend, bar_kwargs, None))


def _batches(fun: Callable[..., Any], iterable: Iterable[Any], args: Sequence[Any] | None,
             kwargs: Mapping[str, Any] | None, total: int | None, desc: str | None,
             bar: bool | Callable[[int], object] | ProgressBar | None, serial: bool | None,
             length: int | None, n_processes: int | None, ordered: bool, with_index: bool,
             backend: str | Backend | None, bar_kwargs: Mapping[str, Any],
             into: Gathered | None) -> Generator[list[Any], None, None]:
    """Check every argument now, then return a generator of lists of results, one per chunk
    (items run in the caller are gathered in ``into``, if given, and come as ``into.values``)."""
    call = make_call(fun, args, kwargs)
    expected = total_of(iterable, total, length)
    check_bar(bar, bar_kwargs, desc)
    settings = settings_for(backend, n_processes, bar)
    settle_sharing(call, settings)
    selected = registry.select(backend, serial=serial, total=expected, settings=settings)
    shown = show_bar(bar, settings["bar"], nested=inside_worker())
    spec = ProgressSpec(shown, expected, desc, bar_kwargs)
    serially = isinstance(selected, Selection) and selected.name == SERIAL
    automatic = (serial is None and backend is None and settings["backend"] is None
                 and isinstance(selected, Selection) and not serially)
    # A number of workers that was asked for is a cap (memory, GPUs, licences): the caller
    # does not run tasks beside them while they start.
    return _run(selected, call, iterable, expected, ordered, with_index, spec,
                probe=serially or (automatic and worth_probing(expected)), stay=serially,
                helping=automatic and settings["n_processes"] is None, into=into)


def _run(selected: Backend | Selection, call: Call, iterable: Iterable[Any], total: int | None,
         ordered: bool, with_index: bool, bar: ProgressSpec, probe: bool, stay: bool = False,
         helping: bool = False, into: Gathered | None = None
         ) -> Generator[list[Any], None, None]:
    """Run the call: first in the caller while workers cannot pay (``probe``; ``stay``: all of
    it, as the serial backend would, in the caller's quickest loop), then the rest of the input
    on the backend, with the caller's help while its workers start (``helping``)."""
    progress: Progress | None = None
    try:
        if probe:
            progress = Progress(*bar)
            rest = yield from _shaped(run_while_cheap(call, iterable, total, progress.update,
                                                      None if with_index else into, stay),
                                      with_index)
            if rest is None:  # it all ran here
                return
            source = rest
        else:
            source = Input(iterable)
        with registry.lease(selected) as backend:
            left = None if total is None else max(0, total - source.read)
            if progress is None:  # workers start while the bar (and tqdm) loads
                backend.prepare(left)
                progress = Progress(*bar)
            batches = dispatch(backend, call, source, ChunkSizer(backend.n_workers, left),
                               ordered=ordered, on_done=progress.update,
                               help_while_starting=helping, keeps_all=into is not None)
            yield from _shaped(batches, with_index)
    finally:
        call.release()
        if progress is not None:
            progress.close()


def _shaped(batches: Generator[tuple[Sequence[int], list[Any]], None, R], with_index: bool
            ) -> Generator[list[Any], None, R]:
    """The values of each batch, or ``(index, value)`` pairs; returns what ``batches`` does."""
    while True:
        try:
            indices, values = next(batches)
        except StopIteration as stop:
            return stop.value
        yield list(zip(indices, values, strict=True)) if with_index else values


class _Results(itertools.chain):  # type: ignore[type-arg]
    """What gmap returns: the results one by one, read at C speed (a generator's frame per
    result would cost a long stream of quick items a visible share). It has a generator's
    methods: ``close()`` stops the call and cancels what is left; ``send(value)`` is ``next()``
    (gmap's generator in the original parfor ignored what was sent); ``throw(error)`` closes it
    and raises ``error``, as a generator that does not catch it would."""

    _batches: Generator[list[Any], None, None]
    _reading: list[list[Any]]  # the batch being read: emptied by close(), so nothing more comes

    def close(self) -> None:
        try:
            self._batches.close()
        finally:
            self._reading[0].clear()

    def send(self, value: object) -> Any:
        return next(self)

    def throw(self, error: BaseException | type[BaseException]) -> Any:
        self.close()
        raise error


def _flatten(batches: Generator[list[Any], None, None]) -> Iterator[Any]:
    reading: list[list[Any]] = [[]]
    results = _Results.from_iterable(_noted(batches, reading))
    results._batches, results._reading = batches, reading
    return results


def _noted(batches: Generator[list[Any], None, None], reading: list[list[Any]]
           ) -> Generator[list[Any], None, None]:
    """The batches, each noted in ``reading`` as it is handed out (see `_Results.close`)."""
    for batch in batches:
        reading[0] = batch
        yield batch


def pmap(
    fun: Callable[..., R],
    iterable: Iterable[Any],
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    total: int | None = None,
    desc: str | None = None,
    bar: bool | Callable[[int], object] | ProgressBar | None = None,
    serial: bool | None = None,
    length: int | None = None,
    n_processes: int | None = None,
    yield_ordered: bool = True,
    yield_index: bool = False,
    backend: str | Backend | None = None,
    **bar_kwargs: Any,
) -> list[Any]:
    """Apply ``fun(item, *args, **kwargs)`` to every item of ``iterable`` in parallel.

    Returns the results as a list, in input order unless ``yield_ordered=False``; with
    ``yield_index=True`` each result comes as ``(index in the input, result)``.

    Args:
        fun: the function; takes an item of ``iterable`` first, then ``args`` and ``kwargs``.
        iterable: the items; any iterable, also a generator or an endless iterator (for gmap).
        args: extra positional arguments for ``fun``, sent to the workers once per call.
        kwargs: extra keyword arguments for ``fun``, sent once per call.
        total: the number of items, for the progress bar when ``len(iterable)`` fails.
        desc: a description shown before the progress bar.
        bar: True for a progress bar, False for none, or a callable that is given the number
            of finished items; None (default) shows one except in nested calls.
        serial: True runs in the caller; False never falls back to serial on small inputs;
            None (default) lets parfor decide.
        length: deprecated alias of ``total``.
        n_processes: the number of workers; default: every CPU this process may use.
        yield_ordered: results in input order (default), or in order of completion.
        yield_index: give ``(index, result)`` pairs, the index being the item's input position.
        backend: a backend name (see ``parfor backends``) or a Backend instance; default:
            chosen automatically.
        **bar_kwargs: passed to ``tqdm.tqdm``.

    Raises:
        Exception: what ``fun`` raised, of its original type, with the worker's traceback
            chained and the failing item's index in a note.
    """
    results = Gathered()
    for batch in _batches(fun, iterable, args, kwargs, total, desc, bar, serial, length,
                          n_processes, yield_ordered, yield_index, backend, bar_kwargs, results):
        if batch is not results.values:  # items run in the caller are in it: no second copy
            results.values.extend(batch)
    return results.values


def parfor(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], list[Any]]:
    """Decorator form of `pmap`: the decorated name becomes the list of results.

    ``@parfor(range(10), (3,))`` over ``def fun(i, a)`` sets ``fun`` to
    ``pmap(fun, range(10), (3,))``. Takes the same arguments as `pmap`, less ``fun``.
    """

    def decorate(fun: Callable[..., Any]) -> list[Any]:
        return pmap(fun, *args, **kwargs)

    return decorate
