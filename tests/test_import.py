"""`import parfor` stays cheap: no plugin discovery and none of the heavy dependencies, nor
the standard library modules that only running a call needs."""

from __future__ import annotations

import json
import subprocess
import sys


def in_fresh_interpreter(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter, where nothing is imported yet; fail if it fails."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)


PROBE = """
import json, sys
before = set(sys.modules)
import parfor
from parfor_core import registry
lazy = ("dill", "tqdm", "loky", "cloudpickle", "pluggy", "parfor_backends", "pickle",
        "tempfile", "inspect", "dataclasses", "pathlib", "concurrent.futures", "uuid",
        "traceback", "importlib.metadata")
loaded = [m for m in lazy if m in sys.modules and m not in before]
print(json.dumps({"loaded": loaded, "discovered": registry._pm is not None}))
"""


def test_import_loads_nothing_heavy_and_discovers_no_plugins():
    result = in_fresh_interpreter(PROBE)
    assert json.loads(result.stdout) == {"loaded": [], "discovered": False}


WORKER_PROBE = """
import json, sys
from parfor_core import load_shared_call, mark_worker_process, run_items, unloadable
print(json.dumps(sorted(m for m in sys.modules if m.startswith("parfor_core."))))
"""


def test_a_worker_loads_only_the_task_protocol():
    """A worker process imports what running tasks needs, not the API, configuration or
    plugin machinery: that keeps a fresh worker's start short."""
    result = in_fresh_interpreter(WORKER_PROBE)
    assert json.loads(result.stdout) == ["parfor_core._context", "parfor_core._pickling",
                                         "parfor_core._shared", "parfor_core._task",
                                         "parfor_core._wire", "parfor_core.errors"]


def test_the_progress_bar_does_not_import_asyncio():
    code = ("import sys\nfrom parfor_core._progress import Progress\n"
            "Progress(True, 3, bar_kwargs={'disable': True}).close()\n"
            "print('asyncio' in sys.modules, 'tqdm' in sys.modules)")
    result = in_fresh_interpreter(code)
    assert result.stdout.split() == ["False", "True"]


def test_a_call_with_a_bar_runs_without_importlib_metadata():
    """Discovery reads entry points itself, and tqdm is handed its version: importing
    importlib.metadata costs a short call about 20 ms."""
    code = ("import sys\nfrom parfor import pmap\n"
            "assert pmap(abs, range(-3, 3), bar=True) == [3, 2, 1, 0, 1, 2]\n"
            "print('importlib.metadata' in sys.modules, 'tqdm' in sys.modules)")
    result = in_fresh_interpreter(code)
    assert result.stdout.split() == ["False", "True"]
    assert "6/6" in result.stderr  # the bar was drawn


def test_parfors_bars_take_tqdms_thread_lock_without_importing_multiprocessing():
    """tqdm's first bar makes a cross-process lock (importing multiprocessing, ~10 ms); parfor's
    workers draw no bars, so its bars take only the thread lock that all tqdm bars share. A
    user's own tqdm bar afterwards still gets tqdm's locks, that same thread lock among them."""
    code = ("import os, sys\nfrom parfor import pmap\n"
            "assert pmap(abs, range(-2, 2), file=open(os.devnull, 'w')) == [2, 1, 0, 1]\n"
            "print('multiprocessing' in sys.modules)\n"
            "from tqdm import tqdm\nfrom tqdm.std import TqdmDefaultWriteLock\n"
            "tqdm(total=1, file=open(os.devnull, 'w')).close()\n"
            "print('multiprocessing' in sys.modules, "
            "TqdmDefaultWriteLock.th_lock in tqdm.get_lock().locks)")
    result = in_fresh_interpreter(code)
    assert result.stdout.split() == ["False", "True", "True"]


def test_tqdm_keeps_its_version_module():
    """The tqdm.version parfor makes gives the installed version, and any other name of the
    real module (which it then loads)."""
    code = ("import sys\nfrom parfor_core._progress import Progress\n"
            "Progress(True, 1, bar_kwargs={'disable': True}).close()\n"
            "import tqdm, tqdm.version\nfrom importlib.metadata import version\n"
            "print(tqdm.__version__ == tqdm.version.__version__ == version('tqdm'))\n"
            "from tqdm.version import PackageNotFoundError\n"
            "print(PackageNotFoundError.__module__, sys.modules['tqdm.version'].__file__)")
    result = in_fresh_interpreter(code)
    same, module, path = result.stdout.split()
    assert same == "True" and module == "importlib.metadata"
    assert path.endswith(("tqdm/version.py", "tqdm\\version.py"))


def test_installed_versions_are_read_as_importlib_metadata_reads_them():
    from importlib.metadata import version

    from parfor_core._entry_points import installed_version

    for name in ("tqdm", "pluggy", "dill", "cloudpickle", "loky", "Pluggy", "parfor"):
        assert installed_version(name) == version(name), name
    assert installed_version("no-such-distribution-here") is None


def test_entry_points_are_found_as_importlib_metadata_finds_them():
    from importlib.metadata import entry_points as reference

    from parfor_core._entry_points import entry_points

    for group in ("parfor", "console_scripts", "pytest11"):
        ours = sorted((ep.name, ep.value, ep.dist_name, ep.dist_version)
                      for ep in entry_points(group))
        theirs = sorted((ep.name, ep.value.partition("[")[0].strip(), ep.dist.name,
                         ep.dist.version) for ep in reference(group=group))
        assert ours == theirs, group
    assert {ep.name for ep in entry_points("parfor")} >= {"processes", "serial", "threads"}
