"""What crosses to worker processes: the call once per call, large arguments shared."""

from __future__ import annotations

import functools
import gc
import glob
import importlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from clusters import CLUSTERS
from conftest import BACKENDS

from parfor import ParPool, SerializationError, pmap
from parfor_core import registry

PICKLED_IN_PARENT: list[int] = []


def _rebuild(log_dir: str, payload: bytes) -> Counted:
    Path(log_dir, f"{os.getpid()}-{len(os.listdir(log_dir))}").touch()
    return Counted(log_dir, payload)


class Counted:
    """Counts how often it is pickled (in the parent) and unpickled (in workers, via files)."""

    def __init__(self, log_dir: str, payload: bytes = b"") -> None:
        self.log_dir, self.payload = log_dir, payload

    def __reduce__(self):
        PICKLED_IN_PARENT.append(1)
        return _rebuild, (self.log_dir, self.payload)


def size_plus(i: int, counted: Counted) -> int:
    return len(counted.payload) + i


def test_extra_arguments_are_serialized_once_per_call(process_backend, tmp_path):
    PICKLED_IN_PARENT.clear()
    result = pmap(size_plus, range(300), (Counted(str(tmp_path), b"x" * 10),),
                  backend=process_backend, bar=False)
    assert result == [10 + i for i in range(300)]
    assert len(PICKLED_IN_PARENT) == 1
    # ... and deserialized at most once per worker process, not once per item or chunk.
    pids = [name.split("-")[0] for name in os.listdir(tmp_path)]
    assert len(pids) == len(set(pids)) <= os.cpu_count()


def parfor_files() -> set[str]:
    """Files parfor could have left behind: there should never be any."""
    folders = ["/dev/shm", tempfile.gettempdir()]
    return {path for folder in folders for path in glob.glob(f"{folder}/parfor-*")}


def test_large_arguments_travel_once_and_leave_nothing_behind(process_backend, tmp_path):
    before, held = parfor_files(), shared_memory_held()  # SharedArrays of earlier tests
    big = Counted(str(tmp_path), os.urandom(3 << 20))
    PICKLED_IN_PARENT.clear()
    result = pmap(size_plus, range(64), (big,), backend=process_backend, bar=False)
    assert result == [(3 << 20) + i for i in range(64)]
    assert len(PICKLED_IN_PARENT) == 1
    pids = [name.split("-")[0] for name in os.listdir(tmp_path)]
    assert len(pids) == len(set(pids))  # read once per worker
    assert parfor_files() == before  # no file, during or after the call
    assert shared_memory_held() <= held  # and the shared memory is let go after the call


def shared_memory_held(pid: int | str = "self") -> set[int]:
    """The shared memory segments (their inodes) a process (this one) holds open."""
    held = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # the process is gone
        return held
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:parfor"):
                held.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:  # the directory's own descriptor, or one closed meanwhile
            continue
    return held


MAIN_SCRIPT = """
import dataclasses
import enum
import sys
import warnings
from typing import Generic, NamedTuple, TypeVar
from parfor import ParPool, pmap

class Quiet(UserWarning):  # a filter of a class workers cannot import: left out there
    pass

warnings.simplefilter("ignore", Quiet)

class Color(enum.Enum):
    RED = 1
    BLUE = 2

T = TypeVar("T")

class Box(Generic[T]):
    def __init__(self, value):
        self.value = value

class Node:
    pass

Node.default = Node()

class Point:
    def __init__(self, x):
        self.x = x

class TwoArg(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")
        self.a = a

def helper(i):
    return Point(i)

def make(i):
    return helper(i)

def fail(i):
    if i == 2:
        raise TwoArg(i, "x")
    return i

def is_point(p):
    return isinstance(p, Point)

def is_red(color):
    return color is Color.RED

def unbox(box):
    return box.value

def is_default(node):
    return node is Node.default

class Slotted:
    __slots__ = ("v",)
    def __init__(self, v):
        self.v = v

@dataclasses.dataclass(slots=True)
class Pair:
    a: int
    b: int

class Named(NamedTuple):  # empty __slots__, which its class refuses to be made with
    x: int

def slotted(i):
    return Slotted(i), Pair(i, -i), Named(i)

if __name__ == "__main__":
    backend = sys.argv[1]
    points = pmap(make, range(4), backend=backend, bar=False)
    print(all(type(p) is Point for p in points), [p.x for p in points])
    print(pmap(lambda p: p.x * 2, [Point(3), Point(4)], backend=backend, bar=False))
    try:
        pmap(fail, range(4), backend=backend, bar=False)
    except TwoArg as error:
        print("TwoArg", error.a, error)
    print(pmap(is_point, [Point(1), 2], backend=backend, bar=False))
    print(pmap(is_red, [Color.RED, Color.BLUE], backend=backend, bar=False))
    colors = pmap(lambda c: c, [Color.BLUE, Color.RED], backend=backend, bar=False)
    print(colors == [Color.BLUE, Color.RED], pmap(unbox, [Box(5), Box(5)], backend=backend,
                                                  bar=False)[:1])
    print(pmap(lambda n: isinstance(n, Node), [Node(), Node.default], backend=backend,
               bar=False))
    print([(s.v, p, n) for s, p, n in pmap(slotted, range(2), backend=backend, bar=False)])
"""


def run_as_main(tmp_path, code: str, backend: str) -> list[str]:
    """Run ``code`` as a script (so that its definitions live in __main__); its output lines."""
    script = tmp_path / "script.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script), backend], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


IMPORTED_MODULE = """
import os
from parfor import pmap

class Point:
    def __init__(self, x):
        self.x = x

class Invalid(ValueError):
    pass

def make(x):
    return Point(x)

def check(x):
    if x == 3:
        raise Invalid(f"item {x}")
    return x

backend = os.environ.get("TEST_BACKEND", "serial")  # a worker that imports this runs it here
points = [point.x for point in pmap(make, range(8), backend=backend, bar=False)]
try:
    pmap(check, range(8), backend=backend, bar=False)
except Invalid as error:
    caught = str(error)
"""


def test_a_call_at_the_top_of_an_imported_module_gets_the_modules_own_classes_back(backend,
                                                                                   tmp_path):
    # The caller's import of the module waited for the answers, which named its classes; and
    # loading them waited for that import to end: the call hung for ever.
    (tmp_path / "analysis.py").write_text(IMPORTED_MODULE)
    script = tmp_path / "script.py"
    script.write_text("import analysis\nprint(analysis.points, analysis.caught)\n")
    env = {key: value for key, value in os.environ.items() if not key.endswith("_ADDRESS")}
    env["TEST_BACKEND"] = backend  # a cluster backend starts one of its own, which finds the module
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=90, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[0, 1, 2, 3, 4, 5, 6, 7] item 3"


def test_classes_of_the_main_script_survive_the_round_trip(backend, tmp_path):
    # The instances of a class with __slots__ (a dataclass with slots=True) came back with a
    # __dict__ the caller's class has not: "'Slotted' object has no attribute '__dict__'". And
    # a warning filter of the script's own class must not keep the workers from loading a call.
    assert run_as_main(tmp_path, MAIN_SCRIPT, backend) == [
        "True [0, 1, 2, 3]", "[6, 8]", "TwoArg 2 2/x", "[True, False]", "[True, False]",
        "True [5]", "[True, True]",
        "[(0, Pair(a=0, b=0), Named(x=0)), (1, Pair(a=1, b=-1), Named(x=1))]"]


CACHED_SCRIPT = """
import functools
import sys
from parfor import pmap

@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

@functools.cache
def square(x):
    return x * x

def fib_squared(n):
    return square(fib(n))

@functools.singledispatch
def describe(x):
    return "thing"

@describe.register
def _(x: int):
    return "int"

@describe.register
def _(x: list):
    return [describe(each) for each in x]

@functools.singledispatch
def shape(x):
    return "first default"

shape.register(object, lambda x: "default put in its place")
shape.register(int, lambda x: "int")

if __name__ == "__main__":
    backend = sys.argv[1]
    print(pmap(fib, [10, 20, 90], backend=backend, bar=False))
    print(pmap(fib_squared, [10, 20], backend=backend, bar=False))
    print(pmap(functools.lru_cache(maxsize=8)(abs), [-1, 2], backend=backend, bar=False))
    print(pmap(describe, [1, "a", [2, None]], backend=backend, bar=False))
    print(pmap(shape, [1, "a"], backend=backend, bar=False))
"""


@functools.lru_cache
def cached_double(x: int) -> int:
    return 2 * x


def test_the_cached_and_dispatching_functions_of_the_main_script_run_in_workers(backend,
                                                                                tmp_path):
    # Cached ones were pickled by their names, as lru_cache has them: "Can't get attribute
    # 'fib' on <module '__main__'>" in a worker, whose __main__ is not the script. A
    # singledispatch one, by value with its cache: RecursionError.
    assert run_as_main(tmp_path, CACHED_SCRIPT, backend) == [
        "[55, 6765, 2880067194370816120]", "[3025, 45765225]", "[1, 2]",
        "['int', 'thing', ['int', 'thing']]", "['int', 'default put in its place']"]
    # One that a worker can import still goes by its name.
    assert pmap(cached_double, [1, 2], backend=backend, bar=False) == [2, 4]


def test_local_functions_and_classes_travel_by_value(process_backend):
    class Local:
        def __init__(self, x):
            self.x = x

    def double(point):
        return Local(point.x * 2)

    results = pmap(double, [Local(1), Local(2)], backend=process_backend, bar=False)
    assert [type(r).__name__ for r in results] == ["Local", "Local"]
    assert [r.x for r in results] == [2, 4]


CLASSES_MADE_IN_FUN = """
import sys
from collections import namedtuple
from parfor import ParPool, pmap

Alias = namedtuple("PointNT", "x y")

def namedtuple_in_fun(i):
    Pair = namedtuple("Pair", "a b")
    return Pair(i, -i)

def aliased(i):
    return Alias(i, i)

if __name__ == "__main__":
    backend = sys.argv[1]
    print(pmap(namedtuple_in_fun, range(2), backend=backend, bar=False))
    print(pmap(aliased, range(2), backend=backend, bar=False))
"""


def test_classes_made_in_fun_or_under_another_name_come_back_by_value(backend, tmp_path):
    assert run_as_main(tmp_path, CLASSES_MADE_IN_FUN, backend) == [
        "[Pair(a=0, b=0), Pair(a=1, b=-1)]", "[PointNT(x=0, y=0), PointNT(x=1, y=1)]"]


def seen_by_an_item(i: int, module: str) -> tuple[str, str | None, str]:
    time.sleep(0.01)  # long enough that every worker takes items
    with open("where.txt") as file:
        where = file.read()
    return where, os.environ.get("PARFOR_TEST_SEEN"), importlib.import_module(module).NAME


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name not in CLUSTERS],
                         indirect=True)  # a cluster's workers may be on other machines
def test_warm_workers_take_over_the_callers_folder_path_and_environment(backend, tmp_path,
                                                                       monkeypatch):
    # Workers kept the working directory, sys.path and environment of their start: after an
    # os.chdir (or %cd in a notebook) a call read the old folder's files, without a word.
    for name in ("before", "after"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "where.txt").write_text(name)
        (tmp_path / name / f"module_{name}_{tmp_path.name}.py").write_text(f"NAME = {name!r}")
    monkeypatch.chdir(tmp_path / "before")
    monkeypatch.syspath_prepend(str(tmp_path / "before"))
    monkeypatch.setenv("PARFOR_TEST_SEEN", "before")
    module = f"module_before_{tmp_path.name}"
    assert set(pmap(seen_by_an_item, range(20), (module,), backend=backend, n_processes=2,
                    bar=False)) == {("before", "before", "before")}
    monkeypatch.chdir(tmp_path / "after")
    monkeypatch.syspath_prepend(str(tmp_path / "after"))  # a module only the caller can see
    monkeypatch.setenv("PARFOR_TEST_SEEN", "after")
    module = f"module_after_{tmp_path.name}"
    assert set(pmap(seen_by_an_item, range(20), (module,), backend=backend, n_processes=2,
                    bar=False)) == {("after", "after", "after")}
    monkeypatch.delenv("PARFOR_TEST_SEEN")
    assert {seen[1] for seen in pmap(seen_by_an_item, range(20), (module,), backend=backend,
                                     n_processes=2, bar=False)} == {None}


def environment(_: int) -> dict[str, str]:
    return dict(os.environ)


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name not in CLUSTERS],
                         indirect=True)
def test_the_workers_environment_is_the_callers_with_nothing_added(backend, monkeypatch):
    # processes workers had parfor's folder added to PYTHONPATH, which a process their function
    # started inherited; and a variable they inherited stayed after the caller unset it.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    monkeypatch.setenv("PARFOR_TEST_INHERITED", "1")
    registry.shutdown()  # workers start now, with this environment
    assert pmap(environment, range(2), backend=backend, n_processes=2, bar=False) \
        == [dict(os.environ)] * 2
    monkeypatch.delenv("PARFOR_TEST_INHERITED")
    assert pmap(environment, range(2), backend=backend, n_processes=2, bar=False) \
        == [dict(os.environ)] * 2


OWN_VARIABLE = """
import os, sys
from parfor_core import mark_worker_process
from parfor_core._context import take_over

mark_worker_process(environment_is_callers=sys.argv[1] == "callers")
callers = {name: value for name, value in os.environ.items() if name != "PARFOR_TEST_OWN"}
take_over((os.getcwd(), list(sys.path), callers, None, None))
print(os.environ.get("PARFOR_TEST_OWN"))
"""


@pytest.mark.parametrize(("started_with", "kept"), [("own", "1"), ("callers", "None")])
def test_a_workers_own_variables_stay_unless_it_started_with_the_callers(started_with, kept):
    # Every variable a worker started with counted as the caller's: one that a plugin gave its
    # workers (OMP_NUM_THREADS=1, say) was unset at their first call.
    result = subprocess.run([sys.executable, "-c", OWN_VARIABLE, started_with],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PARFOR_TEST_OWN": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [kept]


def warns(_: int) -> str:
    warnings.warn("a noisy warning", UserWarning, stacklevel=1)
    return "went on"


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name not in CLUSTERS],
                         indirect=True)
def test_the_workers_follow_the_callers_warning_filters(backend):
    # A warning that the caller's script silenced was shown by every worker process; one it
    # turned into an error was not raised.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="a noisy")
        assert pmap(warns, range(4), backend=backend, n_processes=2, bar=False) \
            == ["went on"] * 4
        warnings.filterwarnings("error", message="a noisy")
        with pytest.raises(UserWarning, match="a noisy warning"):
            pmap(warns, range(4), backend=backend, n_processes=2, bar=False)


class Guarded:
    """An object with a lock of its own, as many classes have."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def twice(self, i: int) -> int:
        with self._lock:
            return 2 * i


def under_lock(i: int, lock: Any) -> int:
    with lock:
        return i


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_a_lock_crosses_as_a_new_one_that_is_not_held(process_backend, kind):
    # dill sent an RLock held (its copy waited for ever) and a Lock as it was at the moment,
    # held for ever if another thread held it then: the call hung.
    lock = getattr(threading, kind)()
    with lock:  # held here while the call is sent: the workers' copies are not
        assert pmap(under_lock, range(6), (lock,), backend=process_backend, bar=False) \
            == list(range(6))
    guarded = Guarded()  # and an object holding one stays of its class (cloudpickle's path)
    assert pmap(guarded.twice, range(4), backend=process_backend, bar=False) == [0, 2, 4, 6]
    assert all(isinstance(copy, Guarded) for copy in
               pmap(copy_of, [guarded] * 3, backend=process_backend, bar=False))


def copy_of(thing: Any) -> Any:
    return thing


def write_line(i: int, file: Any) -> int:
    file.write(f"line {i}\n".encode() if "b" in file.mode else f"line {i}\n")
    return i


def first_line(i: int, file: Any) -> str:
    file.seek(0)
    return file.readline()


@pytest.mark.parametrize("mode", ["w", "r+", "wb"])
def test_a_file_open_for_writing_is_refused_naming_it(process_backend, tmp_path, mode):
    # dill reopened it in each worker: each wrote over the others' lines and the caller's, and
    # the call said nothing (r+ became a copy, whose writes were lost).
    path = tmp_path / "out.txt"
    path.write_text("the caller's line\n")
    with open(path, mode) as file:
        with pytest.raises(SerializationError, match=r"args\[0\].*out\.txt.*open for writing"):
            pmap(write_line, range(6), (file,), backend=process_backend, bar=False)
    assert path.read_text() == ("" if mode in ("w", "wb") else "the caller's line\n")
    path.write_text("first\nsecond\n")
    with open(path) as file:  # one open for reading crosses, as a copy of its text
        assert pmap(first_line, range(2), (file,), backend=process_backend, bar=False) \
            == ["first\n", "first\n"]
    assert pmap(write_line, range(3), (sys.__stdout__,), backend=process_backend, bar=False) \
        == [0, 1, 2]  # the standard streams cross by name (sys.stdout is pytest's here)


@pytest.mark.parametrize("mode", ["a", "ab"])
def test_a_file_open_for_appending_has_every_line_when_the_call_returns(process_backend,
                                                                         tmp_path, mode):
    # dill reopened it in each worker, where lines stayed in the buffer after the call: the
    # caller found 1 line of 7 when the call returned.
    path = tmp_path / "log.txt"
    with open(path, mode) as file:
        file.write(b"the caller's line\n" if "b" in mode else "the caller's line\n")
        file.flush()
        assert pmap(write_line, range(6), (file,), backend=process_backend, n_processes=2,
                    bar=False) == list(range(6))
        assert sorted(path.read_text().splitlines()) == sorted(
            ["the caller's line", *(f"line {i}" for i in range(6))])


@pytest.mark.parametrize("mode", ["a", "ab"])
def test_a_file_opened_again_in_a_worker_closes_quietly_when_its_call_lets_it_go(tmp_path, mode):
    # Each worker's copy warned, when the worker dropped the call, that it was left open (the
    # worker had taken over the caller's warning filters: 'Exception ignored ... unclosed file').
    from parfor_core._pickling import dumps, loads

    path = tmp_path / "log.txt"
    with open(path, mode) as file:
        copy = loads(dumps(file))  # as a worker loads it
    assert (copy.name, copy.mode) == (str(path), mode)
    copy.write(b"a line\n" if "b" in mode else "a line\n")
    descriptor = copy.fileno()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del copy  # let go, as the worker lets go of a call's function and arguments
        gc.collect()
    with pytest.raises(OSError):  # the descriptor closed with it
        os.fstat(descriptor)
    assert path.read_text() == "a line\n"


def square_into(i: int, shared: Any) -> int:
    shared[i] = i * i
    return i


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name not in CLUSTERS],
                         indirect=True)  # a cluster's workers may be on other machines
def test_a_managers_proxies_work_in_the_workers(backend):
    # processes workers had another authentication key: "digest sent was rejected".
    import multiprocessing

    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        assert pmap(square_into, range(6), (shared,), backend=backend, n_processes=2,
                    bar=False) == list(range(6))
        assert dict(shared) == {i: i * i for i in range(6)}


def test_a_class_of_the_callers_keeps_what_the_caller_changed_in_it(process_backend):
    # Loading a result that carried the class by value set the caller's class to the state
    # of the worker's copy, sent with the first task: the caller's change was undone.
    class Settings:
        limit = 1

    def make(i: int) -> Settings:
        return Settings()

    with ParPool(make, backend=process_backend, bar=False) as pool:
        pool[0] = 0
        assert isinstance(pool[0], Settings)
        Settings.limit = 50
        pool[1] = 1
        assert isinstance(pool[1], Settings)
    assert Settings.limit == 50
