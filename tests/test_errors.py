"""Faults and bad input: a clear error that names the cause, on every backend, and no hang."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import sysconfig
import time
import traceback
import uuid
import weakref
from pathlib import Path

import psutil
import pytest

from parfor import (
    ParforError,
    SerializationError,
    UnknownBackendError,
    WorkerError,
    gmap,
    pmap,
)
from parfor_core import RemoteTraceback


class Boom(ValueError):
    pass


def fail_on_seven(i: int, log_dir: str) -> int:
    Path(log_dir, f"{i}-{uuid.uuid4().hex}").touch()
    if i == 7:
        raise Boom(f"item {i} is bad")
    return i


def report(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("ordered", [True, False])
def test_exception_keeps_its_type_and_names_the_item(backend, tmp_path, ordered):
    with pytest.raises(Boom, match="item 7 is bad") as caught:
        pmap(fail_on_seven, range(40), (str(tmp_path),), backend=backend, bar=False,
             yield_ordered=ordered)
    text = report(caught.value)
    assert "raised by item 7 (7)" in text
    assert "fail_on_seven" in text  # the worker's frame is in the report
    if backend == "loky":
        assert isinstance(caught.value.__cause__, RemoteTraceback)


class LookupFailed(Exception):
    pass


def look_up(i: int) -> int:
    try:
        return {}[i]
    except KeyError as missing:
        raise LookupFailed(f"no entry {i}") from missing


def test_the_exception_an_error_was_raised_from_is_its_cause(backend):
    # The cause was the worker's traceback text: code that looks at __cause__ (a library's
    # wrapped errors) saw a RemoteTraceback where a plain loop gives the KeyError.
    with pytest.raises(LookupFailed, match="no entry 3") as caught:
        pmap(look_up, [3], backend=backend, bar=False)
    assert type(caught.value.__cause__) is KeyError
    assert caught.value.__cause__.args == (3,)
    assert caught.value.__cause__.__cause__ is None  # the worker's frames are in a note
    assert "in look_up" in report(caught.value)


def test_no_item_runs_twice_and_none_after_failure_in_the_caller(backend, tmp_path):
    with pytest.raises(Boom):
        pmap(fail_on_seven, range(40), (str(tmp_path),), backend=backend, bar=False)
    runs = [name.split("-")[0] for name in os.listdir(tmp_path)]
    assert runs.count("7") == 1
    assert all(runs.count(i) == 1 for i in set(runs)), sorted(runs)


class Abort(BaseException):
    """Not an Exception: as SystemExit, it would end a worker that let it through."""


def exit_on_seven(i: int, log_dir: str, error: type[BaseException]) -> int:
    Path(log_dir, f"{i}-{uuid.uuid4().hex}").touch()
    if i == 7:
        raise error(f"item {i} says stop")
    return i


@pytest.mark.parametrize("error", [SystemExit, Abort])
def test_a_base_exception_from_fun_reaches_the_caller_once_naming_the_item(backend, tmp_path,
                                                                           error):
    """As a serial loop would raise it; not as a worker's death, nor after running it again."""
    with pytest.raises(error, match="item 7 says stop") as caught:
        pmap(exit_on_seven, range(20), (str(tmp_path), error), backend=backend, bar=False)
    assert "raised by item 7 (7)" in report(caught.value)
    assert [name.split("-")[0] for name in os.listdir(tmp_path)].count("7") == 1
    assert pmap(abs, range(-3, 3), backend=backend, bar=False) == [3, 2, 1, 0, 1, 2]


def test_a_keyboard_interrupt_raised_by_fun_in_a_worker_is_that_items_error(backend, tmp_path):
    """Only the caller's main thread gets Ctrl-C: anywhere else, fun raised it. In the caller
    (serial) it stops the call as Ctrl-C does, unnoted."""
    with pytest.raises(KeyboardInterrupt, match="item 7 says stop") as caught:
        pmap(exit_on_seven, range(20), (str(tmp_path), KeyboardInterrupt), backend=backend,
             bar=False)
    assert ("raised by item 7 (7)" in report(caught.value)) == (backend != "serial")
    assert [name.split("-")[0] for name in os.listdir(tmp_path)].count("7") == 1
    assert pmap(abs, range(-3, 3), backend=backend, bar=False) == [3, 2, 1, 0, 1, 2]


def test_a_keyboard_interrupt_from_fun_is_not_a_ctrl_c_the_workers_stay(tmp_path):
    """Ctrl-C stops the backend's workers; an item's error does not (a forced cancel of Ray
    tasks in the caller's process may even abort it: ray-project/ray#54846)."""
    def workers() -> set[int]:
        return {child.pid for child in psutil.Process().children()
                if "_process_worker" in " ".join(child.cmdline())}

    pmap(abs, range(4), backend="processes", bar=False)
    before = workers()
    with pytest.raises(KeyboardInterrupt):
        pmap(exit_on_seven, range(20), (str(tmp_path), KeyboardInterrupt), backend="processes",
             bar=False)
    assert before and workers() == before


def stop_on_seven(i: int) -> int:
    if i == 7:
        raise StopIteration(i)
    return i


def test_a_stop_iteration_from_fun_is_an_error_naming_the_item(backend):
    """Not a silently shortened list, as list(map(...)) would give."""
    with pytest.raises(RuntimeError, match=r"fun raised StopIteration on item 7 \(7\)") as caught:
        pmap(stop_on_seven, range(20), backend=backend, bar=False)
    assert isinstance(caught.value.__cause__, StopIteration)


def test_backend_is_usable_after_an_exception(backend, tmp_path):
    with pytest.raises(Boom):
        pmap(fail_on_seven, range(10), (str(tmp_path),), backend=backend, bar=False)
    assert pmap(abs, range(-3, 3), backend=backend, bar=False) == [3, 2, 1, 0, 1, 2]


def test_gmap_yields_the_results_before_the_failure(backend, tmp_path):
    results = gmap(fail_on_seven, range(20), (str(tmp_path),), backend=backend, bar=False)
    got = []
    with pytest.raises(Boom):
        for value in results:
            got.append(value)
    assert got == list(range(7))


def flaky_input(n_good: int):
    yield from range(n_good)
    raise OSError("the disk went away")


def test_input_generator_error_reaches_the_caller(backend):
    with pytest.raises(OSError, match="the disk went away") as caught:
        pmap(abs, flaky_input(25), backend=backend, bar=False)
    assert "raised by the input iterable" in report(caught.value)
    assert pmap(abs, [-1], backend=backend, bar=False) == [1]


@pytest.mark.parametrize("ordered", [True, False])
def test_gmap_yields_every_item_read_before_the_input_failed(backend, ordered):
    """As a serial loop would: the 50 items the input gave run, and their results come first."""
    results = gmap(abs, flaky_input(50), backend=backend, bar=False, yield_ordered=ordered)
    got = []
    with pytest.raises(OSError, match="the disk went away") as caught:
        for value in results:
            got.append(value)
    assert sorted(got) == list(range(50))
    assert "raised by the input iterable after 50 items" in report(caught.value)


def test_by_default_gmap_yields_every_item_read_before_the_input_failed():
    """The automatic choice starts in the caller, then goes on to workers: either way."""
    for n_good in (50, 5000):
        got = []
        with pytest.raises(OSError, match="the disk went away"):
            for value in gmap(slow_abs, flaky_input(n_good), bar=False):
                got.append(value)
        assert got == list(range(n_good))


def slow_abs(x: int) -> int:
    time.sleep(0.0002)
    return abs(x)


def test_exception_in_a_long_run_does_not_hang(backend):
    def slow_then_fail(i):
        if i == 3:
            raise KeyError(i)
        return i

    with pytest.raises(KeyError):
        pmap(slow_then_fail, range(2000), backend=backend, bar=False)


class Unsendable:
    """Refuses to be pickled, as a database connection or an open socket would."""

    def __reduce__(self):
        raise TypeError("Unsendable objects refuse to be pickled")


def return_unsendable(i: int) -> object:
    return Unsendable() if i == 3 else i


def test_unserializable_argument_is_named(process_backend):
    with pytest.raises(SerializationError, match=r"args\[1\].*Unsendable"):
        pmap(lambda i, a, b: i, range(4), (1, Unsendable()), backend=process_backend,
             bar=False)


SCRIPT_USING_A_GENERATOR = """
gen = (i for i in range(3))

def uses(i):
    return next(gen)

def calls(i):
    return uses(i)

def walks(i):
    return walks(i - 1) if i else next(gen)
"""


def test_what_a_function_carries_that_cannot_be_serialized_is_named(process_backend):
    # The error blamed "the function" (one of a notebook, at its top level), and advised to
    # define it at module level.
    script: dict[str, object] = {"__name__": "a_notebook"}  # not importable: sent by value
    exec(SCRIPT_USING_A_GENERATOR, script)
    for fun, user in ((script["uses"], "uses"), (script["calls"], "uses"),
                      (script["walks"], "walks")):  # not 'walks' itself, that walks() uses
        with pytest.raises(SerializationError, match=rf"the global 'gen' that {user}\(\) uses "
                                                     r"\(type builtins\.generator\)"):
            pmap(fun, range(4), backend=process_backend, bar=False)
    stream = (i for i in range(3))

    def closure(i: int) -> int:
        return next(stream)

    with pytest.raises(SerializationError, match=r"the variable 'stream' of the closure of "
                                                 r"test_what.*<locals>\.closure\(\) "):
        pmap(closure, range(4), backend=process_backend, bar=False)


class RefusedHere:
    """Loads in workers, but not in the process it names: as a class whose state the caller's
    version refuses."""

    def __init__(self, refused_in: int) -> None:
        self.refused_in = refused_in

    def __setstate__(self, state: dict[str, int]) -> None:
        if state["refused_in"] == os.getpid():
            raise ValueError("this state is refused here")
        self.__dict__.update(state)


def refused_by(i: int, caller: int) -> object:
    return RefusedHere(caller) if i == 3 else i


def test_a_result_that_cannot_be_loaded_here_is_named(process_backend):
    # "failed while running input item 3, outside the function itself", as if it had not run.
    with pytest.raises(WorkerError, match=r"ran input items? .*, but its answer cannot be "
                                          r"deserialized here: ValueError: this state is "
                                          r"refused here") as caught:
        pmap(refused_by, range(6), (os.getpid(),), backend=process_backend, bar=False)
    assert 3 in caught.value.indices
    assert pmap(abs, [-1], backend=process_backend, bar=False) == [1]


def test_a_module_that_workers_cannot_import_gets_advice(process_backend, tmp_path,
                                                          monkeypatch):
    # "No module named 'loose'", and nothing on what to do.
    import importlib.util

    import cloudpickle

    (tmp_path / "loose.py").write_text("def triple(x):\n    return 3 * x\n")
    spec = importlib.util.spec_from_file_location("loose", tmp_path / "loose.py")
    loose = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "loose", loose)
    spec.loader.exec_module(loose)
    with pytest.raises(ParforError, match=r"No module named 'loose'\. If the caller has the "
                                          r"module 'loose' but a worker cannot import it .*"
                                          r"register_pickle_by_value"):
        pmap(loose.triple, range(3), backend=process_backend, bar=False)
    cloudpickle.register_pickle_by_value(loose)  # as the advice says
    try:
        assert pmap(loose.triple, range(3), backend=process_backend, bar=False) == [0, 3, 6]
    finally:
        cloudpickle.unregister_pickle_by_value(loose)


def test_an_argument_nested_too_deeply_gets_advice_that_fits(process_backend):
    # "Make it picklable (define it at module level, ...)", of a list.
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(SerializationError, match=r"args\[0\] \(type builtins\.list\) .*"
                                                 r"recursion.* nested too deeply"):
        pmap(len, [[1]], (nested,), backend=process_backend, bar=False)


def test_unserializable_item_is_named(process_backend):
    items = [1, 2, Unsendable()]
    with pytest.raises(SerializationError, match=r"input item 2 .*Unsendable"):
        pmap(id, items, backend=process_backend, bar=False, serial=False)


@pytest.mark.parametrize("ordered", [True, False])
def test_gmap_yields_every_item_before_one_that_cannot_be_sent(process_backend, ordered):
    # gmap raised as the item's chunk was sent, without the results of the chunks ahead of it
    # and of the items before it in its chunk: a serial loop would have given them.
    items = [*range(40), Unsendable(), *range(41, 50)]
    got = []
    with pytest.raises(SerializationError, match=r"input item 40 .*Unsendable") as caught:
        for value in gmap(abs, items, backend=process_backend, bar=False,
                          yield_ordered=ordered):
            got.append(value)
    assert sorted(got) == list(range(40))
    assert caught.value.item == 40


def test_unserializable_result_is_named(process_backend):
    with pytest.raises(SerializationError, match=r"result of input item 3.*Unsendable"):
        pmap(return_unsendable, range(6), backend=process_backend, bar=False)
    assert pmap(abs, [-2, 2], backend=process_backend, bar=False) == [2, 2]


class ExitsWhenSent:
    """A result whose pickling raises SystemExit: it once ended the worker, and the call failed
    with a WorkerDiedError after the retries."""

    def __reduce__(self) -> tuple[object, ...]:
        raise SystemExit(3)


def return_exits_when_sent(i: int) -> object:
    return ExitsWhenSent() if i == 3 else i


def test_a_result_whose_pickling_raises_system_exit_is_named(process_backend):
    with pytest.raises(SerializationError, match=r"result of input item 3.*SystemExit"):
        pmap(return_exits_when_sent, range(6), backend=process_backend, bar=False)
    assert pmap(abs, [-2, 2], backend=process_backend, bar=False) == [2, 2]


def exit_three() -> None:
    raise SystemExit(3)


class ExitsWhenLoaded:
    def __reduce__(self) -> tuple[object, ...]:
        return exit_three, ()


def take_argument(i: int, argument: object) -> int:
    return i


def test_an_argument_whose_loading_raises_system_exit_in_a_worker_is_named(process_backend):
    # The worker died of it, and after the retries the call failed with a WorkerDiedError
    # that blamed native code, or (loky) raised the bare SystemExit in the caller.
    with pytest.raises(ParforError, match=r"extra arguments cannot be deserialized.*SystemExit"):
        pmap(take_argument, range(4), (ExitsWhenLoaded(),), backend=process_backend,
             bar=False)
    assert pmap(abs, [-2, 2], backend=process_backend, bar=False) == [2, 2]


class Held:
    """An argument whose life a weak reference tells."""


def maybe_fail_on_two(i: int, held: Held, raises: type[BaseException] | None) -> int:
    if raises is not None and i == 2:
        raise raises("two")
    return i


@pytest.mark.parametrize("raises", [ValueError, StopIteration, None])
def test_a_call_lets_go_of_its_arguments_without_a_garbage_collection(backend, raises):
    # They stayed in cycles until one (a large array, and its shared memory, for as long as
    # the program had none): a failed call's error, its traceback, a frame there, the error;
    # on Ray, every call's task, its remote future, the callback that holds both.
    held = Held()
    alive = weakref.ref(held)
    gc.disable()
    try:
        expected = {ValueError: ValueError, StopIteration: RuntimeError}.get(raises)
        with pytest.raises(expected) if expected else contextlib.nullcontext():
            pmap(maybe_fail_on_two, range(4), (held, raises), backend=backend, bar=False)
        del held
        if sysconfig.get_config_var("Py_GIL_DISABLED") and backend != "serial":
            # There an object another thread made (the error, in a worker's or a reader's
            # thread) is freed once that thread runs again: other calls wake them.
            for _ in range(2):
                pmap(abs, range(-40, 0), backend=backend, serial=False, bar=False)
        deadline = time.monotonic() + 10  # tasks still running (Ray's) may hold it till they end
        while alive() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive() is None
    finally:
        gc.enable()


class LockedError(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.attachment = Unsendable()


def raise_locked(i: int) -> None:
    raise LockedError()


def test_unserializable_exception_is_reported(process_backend):
    with pytest.raises(ParforError, match="LockedError: cannot travel") as caught:
        pmap(raise_locked, range(3), backend=process_backend, bar=False)
    assert "raised by item 0" in report(caught.value)


def test_huge_deep_result_gets_an_error_not_a_crash(process_backend):
    def deep(i):
        nested: list = []
        for _ in range(100_000):
            nested = [nested]
        return nested

    with pytest.raises(SerializationError, match="result of input item 0"):
        pmap(deep, range(2), backend=process_backend, bar=False)


def die(i: int) -> int:
    if i == 2:
        os._exit(3)
    return i


def test_worker_death_is_reported_not_hung(process_backend):
    with pytest.raises(WorkerError, match="input item") as caught:
        pmap(die, range(4), backend=process_backend, bar=False)
    assert caught.value.backend == process_backend
    assert pmap(abs, [-5, 5], backend=process_backend, bar=False) == [5, 5]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fun": 3}, TypeError, "fun must be callable"),
        ({"args": 3}, TypeError, r"did you mean args=\(3,\)"),
        ({"kwargs": [1]}, TypeError, "kwargs must be a dict"),
        ({"iterable": None}, TypeError, "iterable must be iterable"),
        ({"n_processes": 0}, ValueError, "n_processes must be"),
        ({"total": -1}, ValueError, "total must be"),
        ({"bar": "yes"}, TypeError, "bar must be"),
        ({"n_process": 2}, TypeError, "n_process"),
        ({"backend": "lokky"}, UnknownBackendError, "Known: .*loky.*serial.*threads"),
        ({"backend": 3}, TypeError, "backend must be"),
        ({"serial": True, "backend": "threads"}, ValueError, "conflicts"),
        ({"serial": False, "backend": "serial"}, ValueError, "conflicts"),
    ],
)
def test_bad_arguments_fail_at_once_with_a_clear_message(kwargs, error, match):
    call = {"fun": abs, "iterable": range(3), **kwargs}
    with pytest.raises(error, match=match):
        gmap(**call)


def test_numpy_integers_are_accepted_where_whole_numbers_are():
    import numpy

    assert pmap(abs, range(-3, 0), total=numpy.int64(3), n_processes=numpy.int32(2),
                bar=False) == [3, 2, 1]



def test_length_is_a_deprecated_alias_of_total():
    shown = []
    with pytest.warns(DeprecationWarning, match="total"):
        pmap(abs, iter(range(4)), length=4, bar=shown.append, backend="serial")
    assert shown[-1] == 4


class TwoPartError(Exception):
    """An exception whose __init__ needs two arguments: plain pickling cannot rebuild it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


def raise_two_part(i: int) -> int:
    if i == 3:
        raise TwoPartError(i, "bad item")
    return i


def test_exception_that_pickle_cannot_rebuild_keeps_its_type(backend):
    with pytest.raises(TwoPartError, match="3: bad item") as caught:
        pmap(raise_two_part, range(6), backend=backend, bar=False)
    assert caught.value.code == 3
    assert "raised by item 3 (3)" in report(caught.value)


class PrefixingError(Exception):
    """Its __init__ takes one argument and rewords it: pickle rebuilds it, garbled."""

    def __init__(self, detail: object) -> None:
        super().__init__(f"bad {detail}")


def raise_group(i: int) -> int:
    if i == 3:
        raise ExceptionGroup("two went wrong", [  # noqa: F821 - Python 3.11 on, as the test
            ValueError("plain"), TwoPartError(i, "bad item"),
            ExceptionGroup("inner", [TwoPartError(i + 1, "worse")])])  # noqa: F821
    return i


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are Python 3.11 on")
def test_an_exception_group_keeps_its_type_and_its_members(backend):
    # A member that pickle cannot rebuild made the whole group a ParforError.
    with pytest.raises(ExceptionGroup, match="two went wrong") as caught:  # noqa: F821
        pmap(raise_group, range(6), backend=backend, bar=False)
    plain, two_part, inner = caught.value.exceptions
    assert (type(plain), str(plain)) == (ValueError, "plain")
    assert (type(two_part), str(two_part), two_part.code) == (TwoPartError, "3: bad item", 3)
    assert isinstance(inner, ExceptionGroup)  # noqa: F821
    assert [(type(e), e.code) for e in inner.exceptions] == [(TwoPartError, 4)]
    assert "raised by item 3 (3)" in report(caught.value)


def raise_prefixing_group(i: int) -> int:
    raise ExceptionGroup("reworded", [PrefixingError(i)])  # noqa: F821


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are Python 3.11 on")
def test_a_group_member_that_rewords_its_argument_is_not_garbled(backend):
    # Pickle rebuilds a group whose members it can call again, garbling such a one.
    with pytest.raises(ExceptionGroup) as caught:  # noqa: F821
        pmap(raise_prefixing_group, [3], backend=backend, bar=False)
    [member] = caught.value.exceptions
    assert (type(member), str(member)) == (PrefixingError, "bad 3")


def test_worker_death_names_the_items_that_were_running(process_backend):
    with pytest.raises(WorkerError) as caught:
        pmap(die, range(6), backend=process_backend, bar=False)
    assert 2 in caught.value.indices
    assert "input item" in str(caught.value)


@pytest.mark.parametrize("entry", ["pmap", "gmap", "parfor"])
def test_length_warning_points_at_the_callers_line(entry):
    from parfor import parfor

    with pytest.warns(DeprecationWarning) as record:
        if entry == "pmap":
            pmap(abs, [1, 2], length=2, bar=False, backend="serial")
        elif entry == "gmap":
            list(gmap(abs, [1, 2], length=2, bar=False, backend="serial"))
        else:
            parfor([1, 2], length=2, bar=False, backend="serial")(abs)
    assert record[0].filename == __file__


class RewordingError(Exception):
    """Its __init__ rewords its arguments: calling it again with .args would garble them."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")


def raise_rewording(i: int) -> None:
    raise RewordingError(i, "bad")


def test_exception_message_is_not_garbled_by_the_round_trip(backend):
    with pytest.raises(RewordingError) as caught:
        pmap(raise_rewording, [7, 8], backend=backend, bar=False)
    assert str(caught.value) == "7: bad"


def raise_builtin(kind: str) -> None:
    if kind == "OSError":
        open(os.path.join(os.sep, "no such folder", "file.txt"))  # noqa: SIM115
    elif kind == "UnicodeDecodeError":
        b"\xff".decode()
    elif kind == "SyntaxError":
        compile("x = = 1", "<given>", "exec")
    else:
        sys.exit(4)


@pytest.mark.parametrize(("kind", "fields"), [
    ("OSError", {"errno": 2, "filename": os.path.join(os.sep, "no such folder", "file.txt")}),
    ("UnicodeDecodeError", {"encoding": "utf-8", "start": 0, "reason": "invalid start byte"}),
    ("SyntaxError", {"filename": "<given>", "lineno": 1}),
    ("SystemExit", {"code": 4}),
])
def test_a_builtin_exception_keeps_its_fields(backend, kind, fields):
    # They came back as class, args and attributes, without the fields a builtin exception
    # keeps in C: errno None, and sys.exit(4) in fun ended the script with status 0.
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - checked just below
        pmap(raise_builtin, [kind], backend=backend, bar=False)
    assert kind in {cls.__name__ for cls in type(caught.value).__mro__}
    assert {name: getattr(caught.value, name) for name in fields} == fields


def test_a_worker_traceback_of_a_function_sent_by_value_names_its_file_and_line(
        process_backend):
    # cloudpickle writes "<dynamic-code>" for the file of a function it sends by value (those
    # of the caller's script, local ones): the traceback named no file and showed no line.
    def fails(i: int) -> None:
        raise ValueError("raised by the local function")

    with pytest.raises(ValueError) as caught:
        pmap(fails, [1], backend=process_backend, bar=False)
    remote = str(caught.value.__cause__)
    assert f'File "{__file__}"' in remote
    assert 'raise ValueError("raised by the local function")' in remote
