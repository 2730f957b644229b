"""The command line: `parfor backends` and `parfor demo`, run as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from parfor_core import registry


def run(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parfor", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **environment})


def test_backends_lists_every_backend_and_the_choice():
    result = run("backends")
    assert result.returncode == 0, result.stderr
    for info in registry.infos():
        assert info.name in result.stdout
    assert "from parfor 0.1.0" in result.stdout
    choice = registry.auto()
    assert f"A plain pmap here uses {choice.name!r}: {choice.reason}." in result.stdout


def test_backends_names_the_configured_backend_as_the_one_a_plain_call_uses():
    result = run("backends", PARFOR_BACKEND="threads")
    assert result.returncode == 0, result.stderr
    assert "* threads" in result.stdout
    assert ("A plain pmap here uses 'threads', as set by environment variable PARFOR_BACKEND, "
            "for every input; it runs serially only inside a worker (nested calls)."
            in result.stdout)
    unknown = run("backends", PARFOR_BACKEND="lokky")
    assert unknown.returncode == 2
    assert ("No backend named 'lokky' (from environment variable PARFOR_BACKEND)"
            in unknown.stderr)


def test_with_every_plugin_disabled_the_cause_is_named():
    every = ",".join(ep.name for ep in entry_points(group="parfor"))
    result = run("backends", PARFOR_DISABLE_PLUGINS=every)
    assert result.returncode == 1
    assert ("No backend is loaded: the disable_plugins setting (environment variable "
            "PARFOR_DISABLE_PLUGINS) names every plugin." in result.stdout)
    call = subprocess.run([sys.executable, "-c", "from parfor import pmap; pmap(abs, [1, 2])"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PARFOR_DISABLE_PLUGINS": every})
    assert ("No backend named 'serial' (from the automatic choice). Known: none (the "
            "disable_plugins setting (environment variable PARFOR_DISABLE_PLUGINS) names "
            "every plugin)." in call.stderr)


def test_demo_runs_in_parallel_and_reports_the_speedup():
    result = run("demo", "--items", "8", "--work", "20000")
    assert result.returncode == 0, result.stderr
    assert f"8 items on backend {registry.auto().name!r}" in result.stdout
    assert "speedup" in result.stdout
    assert "8/8" in result.stderr  # both progress bars ran to the end


def test_demo_on_a_named_backend():
    result = run("demo", "--items", "4", "--work", "1000", "--backend", "threads",
                 "--n-processes", "3")
    assert result.returncode == 0, result.stderr
    assert "backend 'threads' with 3 workers" in result.stdout


def test_unknown_command_fails_with_usage():
    result = run("fly")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_console_script_is_installed():
    script = shutil.which("parfor", path=str(Path(sys.executable).parent) + os.pathsep
                          + os.environ.get("PATH", ""))
    if script is None:
        pytest.fail("the 'parfor' console script is not installed next to this Python")
    result = subprocess.run([script, "backends"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serial" in result.stdout


def test_bad_options_fail_with_a_message_not_a_traceback():
    for args, message in [(("--backend", "lokky"), "No backend named 'lokky'"),
                          (("--n-processes", "0"), "--n-processes: must be a whole number of "
                                                   "at least 1, got '0'"),
                          (("--items", "1"), "at least 2"),
                          (("--items", "abc"), "--items: must be a whole number of at least "
                                               "2, got 'abc'"),
                          (("--work", "-5"), "--work: must be a whole number of at least 1")]:
        result = run("demo", *args)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["config", "backends"])
def test_a_reader_that_leaves_early_gets_no_traceback(command):
    # `parfor config | head -1` ended in a BrokenPipeError traceback.
    process = subprocess.Popen([sys.executable, "-m", "parfor", command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line
    error = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=60) == 141, error
    assert error == ""
