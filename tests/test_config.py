"""Configuration: each rung of the resolution order on its own, then their order, and errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

from parfor import ConfigError, ConfigWarning, ParPool, UnknownBackendError, config, parfor, pmap
from parfor_core import gil_enabled, registry
from parfor_core._config import current


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No PARFOR_* variable, no user file, and a working directory without a project file."""
    for name in list(os.environ):
        if name.startswith("PARFOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def where(i: int) -> tuple[int, str]:
    time.sleep(0.02)  # long enough that workers take some items while the caller helps
    return os.getpid(), threading.current_thread().name


def ran_on() -> str:
    """Which backend a plain pmap used, told by where its items ran."""
    places = set(pmap(where, range(32), bar=False))
    if places == {(os.getpid(), threading.current_thread().name)}:
        return "serial"
    if all(pid == os.getpid() for pid, _ in places):
        return "threads"
    return "processes"


#: What a plain pmap runs on here: threads where the GIL is disabled, worker processes elsewhere.
DEFAULT = "processes" if gil_enabled() else "threads"


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_defaults():
    settings = current()
    assert settings["idle_timeout"] == 600.0 and settings.source("idle_timeout") == "the default"
    assert settings["backend"] is None and settings["retries"] == 1
    assert ran_on() == DEFAULT


def test_user_file(isolated):
    write(isolated / "xdg" / "parfor" / "config.toml", 'backend = "threads"\nretries = 3\n')
    settings = current()
    assert settings["retries"] == 3
    assert settings.source("retries") == str(isolated / "xdg" / "parfor" / "config.toml")
    assert ran_on() == "threads"


def test_parfor_config_names_the_user_file(isolated, monkeypatch):
    other = isolated / "elsewhere.toml"
    write(other, "n_processes = 3\n")
    monkeypatch.setenv("PARFOR_CONFIG", str(other))
    assert current()["n_processes"] == 3
    monkeypatch.setenv("PARFOR_CONFIG", str(isolated / "missing.toml"))
    with pytest.raises(ConfigError, match="PARFOR_CONFIG names .*missing.toml"):
        current()


def test_project_pyproject_found_upwards(isolated):
    write(isolated / "project" / "pyproject.toml", '[tool.parfor]\nbackend = "threads"\n')
    assert current().source("backend").endswith("pyproject.toml [tool.parfor]")
    assert ran_on() == "threads"


def test_project_parfor_toml(isolated):
    write(isolated / "project" / "sub" / "parfor.toml", 'backend = "serial"\n')
    assert ran_on() == "serial"


def test_a_file_rewritten_within_one_clock_tick_is_read_again(isolated):
    path = isolated / "project" / "sub" / "parfor.toml"
    write(path, "retries = 3\n")
    assert current()["retries"] == 3
    stamp = path.stat().st_mtime_ns
    write(path, "retries = 12\n")
    os.utime(path, ns=(stamp, stamp))  # as a rewrite within the file clock's tick leaves it
    assert current()["retries"] == 12


def test_a_change_to_any_source_applies_to_the_next_call(isolated, monkeypatch):
    """The sources are read again only when one of them changes: each kind of change shows."""
    project = isolated / "project"
    assert current()["retries"] == 1
    write(project / "parfor.toml", "retries = 2\n")  # a file appears further up
    assert current()["retries"] == 2
    nearer = project / "sub" / "pyproject.toml"
    write(nearer, "[tool.parfor]\nretries = 3\n")  # a nearer one appears
    assert current()["retries"] == 3
    nearer.unlink()  # and goes
    assert current()["retries"] == 2
    monkeypatch.chdir(isolated)  # another working directory, with no project file
    assert current()["retries"] == 1
    write(isolated / "xdg" / "parfor" / "config.toml", "retries = 4\n")
    assert current()["retries"] == 4
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated / "elsewhere"))  # the user file moves
    assert current()["retries"] == 1
    monkeypatch.setenv("PARFOR_RETRIES", "5")
    assert current()["retries"] == 5 and current(n_processes=2)["n_processes"] == 2


def test_environment():
    os.environ["PARFOR_BACKEND"] = "threads"
    try:
        assert current().source("backend") == "environment variable PARFOR_BACKEND"
        assert ran_on() == "threads"
    finally:
        del os.environ["PARFOR_BACKEND"]


def test_context_manager():
    with config(backend="threads", n_processes=3):
        assert current()["n_processes"] == 3
        assert ran_on() == "threads"
    assert ran_on() == DEFAULT


def test_the_order_of_the_rungs(isolated, monkeypatch):
    write(isolated / "xdg" / "parfor" / "config.toml", 'backend = "loky"\nretries = 2\n')
    assert current().source("backend").endswith("config.toml")
    write(isolated / "project" / "pyproject.toml", '[tool.parfor]\nbackend = "serial"\n')
    assert current()["backend"] == "serial" and current()["retries"] == 2  # project over user
    monkeypatch.setenv("PARFOR_BACKEND", "processes")
    assert current()["backend"] == "processes"  # environment over project
    with config(backend="threads"):
        assert current()["backend"] == "threads"  # block over environment
        assert current(backend="serial")["backend"] == "serial"  # argument over block
        assert pmap(where, range(4), backend="serial", bar=False) == [where(0)] * 4


def test_blocks_do_not_leak_into_other_threads_or_tasks():
    seen = {}

    def other_thread():
        seen["thread"] = current()["backend"]

    async def task(name: str):
        with config(backend=name):
            await asyncio.sleep(0.01)
            return current()["backend"]

    async def both():
        return await asyncio.gather(task("threads"), task("serial"))

    with config(backend="threads"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen["thread"] is None
    assert asyncio.run(both()) == ["threads", "serial"]


def test_parpool_and_decorator_take_their_defaults_from_the_configuration():
    with config(backend="threads", n_processes=3):
        with ParPool(abs) as pool:
            assert pool.backend.name == "threads" and pool.backend.n_workers == 3

        @parfor(range(4), bar=False)
        def places(i):
            return where(i)

    assert all(pid == os.getpid() and name.startswith("parfor-worker") for pid, name in places)


def test_backend_options_reach_the_backend(isolated):
    write(isolated / "project" / "parfor.toml",
          'backend = "processes"\nworker_output = false\n'
          "[backends.processes]\nretries = 0\nidle_timeout = 5\n")
    selected = registry.select(None, serial=None, total=10, settings=current())
    with registry.lease(selected) as backend:
        assert (backend.name, backend.retries, backend.idle_timeout) == ("processes", 0, 5)
        assert backend.worker_output is False


@pytest.mark.parametrize("name", ["processes", "loky"])
@pytest.mark.parametrize("seconds", ["inf", "1e300"])
def test_an_endless_idle_timeout_keeps_the_workers(isolated, name, seconds):
    # loky was handed it as is, and each of its workers failed at its first wait.
    write(isolated / "project" / "parfor.toml",
          f'[backends.{name}]\nidle_timeout = {seconds}\n')
    selected = registry.select(name, serial=None, total=10, settings=current(backend=name))
    with registry.lease(selected) as backend:
        assert backend.idle_timeout == float(seconds)
        assert pmap(abs, range(-4, 0), backend=backend, bar=False) == [4, 3, 2, 1]
        backend.shutdown()


def test_unknown_backend_option_warns(isolated):
    write(isolated / "project" / "parfor.toml",
          'backend = "processes"\n[backends.processes]\nspeed = 11\n')
    with pytest.warns(ConfigWarning, match="parfor.toml.*'processes' has no option 'speed'"):
        assert pmap(abs, [-1, -2], bar=False) == [1, 2]


def test_bad_value_names_the_file_the_key_and_the_allowed_values(isolated):
    write(isolated / "project" / "pyproject.toml", "[tool.parfor]\nn_processes = 0\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml \[tool.parfor\]: n_processes = 0 "
                                          r"must be a whole number of at least 1"):
        pmap(abs, [1, 2])


def test_unknown_backend_in_a_file_lists_the_known_ones(isolated):
    write(isolated / "project" / "pyproject.toml", '[tool.parfor]\nbackend = "lokky"\n')
    with pytest.raises(UnknownBackendError, match=r"'lokky' \(from .*pyproject.toml "
                                                  r"\[tool.parfor\]\). Known: .*loky"):
        pmap(abs, [1, 2])


def test_unknown_key_warns_and_the_rest_works(isolated):
    write(isolated / "project" / "parfor.toml", 'colour = "red"\nbackend = "serial"\n')
    with pytest.warns(ConfigWarning, match="parfor.toml: unknown setting 'colour'"):
        assert ran_on() == "serial"


def test_a_file_that_is_not_utf8_is_named(isolated):
    (isolated / "project" / "sub" / "parfor.toml").write_bytes(b'backend = "\xff"\n')
    with pytest.raises(ConfigError, match=r"parfor.toml is not valid TOML: it is not UTF-8"):
        current()


def test_toml_syntax_error_names_the_file_and_line(isolated):
    write(isolated / "project" / "parfor.toml", 'backend = "serial"\nretries = = 2\n')
    with pytest.raises(ConfigError, match=r"parfor.toml is not valid TOML: .*line 2"):
        current()


def test_a_variable_set_to_nothing_counts_as_unset(monkeypatch):
    # `%env PARFOR_BACKEND=` in a notebook made every call fail ("No backend named ''").
    for variable in ("PARFOR_BACKEND", "PARFOR_N_PROCESSES", "PARFOR_BAR", "PARFOR_RETRIES"):
        monkeypatch.setenv(variable, "")
    settings = current()
    assert settings.source("backend") == settings.source("n_processes") == "the default"
    assert pmap(abs, [-1, -2], bar=False) == [1, 2]


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("PARFOR_N_PROCESSES", "many")
    with pytest.raises(ConfigError, match="environment variable PARFOR_N_PROCESSES"):
        pmap(abs, [1, 2])
    monkeypatch.setenv("PARFOR_N_PROCESSES", "2")
    monkeypatch.setenv("PARFOR_WORKER_OUTPUT", "maybe")
    with pytest.raises(ConfigError, match="PARFOR_WORKER_OUTPUT: worker_output = 'maybe' "
                                          "must be true or false"):
        current()


def test_unknown_setting_in_a_block_is_a_type_error():
    with pytest.raises(TypeError, match="unknown setting 'backnd'"), config(backnd="threads"):
        pass


def test_parfor_config_command_shows_values_and_sources(isolated):
    write(isolated / "project" / "pyproject.toml", "[tool.parfor]\nretries = 4\n")
    env = {**os.environ, "PARFOR_N_PROCESSES": "3"}
    result = subprocess.run([sys.executable, "-m", "parfor", "config"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "n_processes      3  <- environment variable PARFOR_N_PROCESSES" in lines
    assert any(line.startswith("retries          4  <- ") and "pyproject.toml" in line
               for line in lines)
    assert "idle_timeout     600.0  <- the default" in lines


def test_disabled_plugins_are_not_loaded(isolated):
    env = {**os.environ, "PARFOR_DISABLE_PLUGINS": "loky"}
    listing = subprocess.run([sys.executable, "-m", "parfor", "backends"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert listing.returncode == 0 and "loky" not in listing.stdout
    assert "processes" in listing.stdout
    named = subprocess.run([sys.executable, "-c", "from parfor import pmap; "
                            "pmap(abs, [1, 2], backend='loky')"], capture_output=True,
                           text=True, timeout=60, env=env)
    assert "No backend named 'loky'" in named.stderr


def test_nested_blocks_merge_backend_options():
    with config(backends={"processes": {"retries": 0}}):
        with config(backends={"processes": {"idle_timeout": 5}}):
            assert current()["backends"] == {"processes": {"retries": 0, "idle_timeout": 5}}
        assert current()["backends"] == {"processes": {"retries": 0}}


def test_general_options_in_a_backend_table_are_checked(isolated):
    write(isolated / "project" / "parfor.toml", '[backends.processes]\nidle_timeout = "soon"\n')
    with pytest.raises(ConfigError, match=r"parfor.toml: backends = .*backends.processes: "
                                          r"idle_timeout = 'soon' must be a number of seconds"):
        current()


def nested_bar(i: int) -> int:
    return sum(pmap(abs, range(3)))


def test_a_configured_bar_stays_off_in_nested_calls(isolated, capsys):
    write(isolated / "project" / "parfor.toml", "bar = true\n")
    assert pmap(nested_bar, range(2), backend="threads", bar=False) == [3, 3]
    assert "3/3" not in capsys.readouterr().err


def test_serial_false_beats_a_configured_serial_backend(monkeypatch):
    monkeypatch.setenv("PARFOR_BACKEND", "serial")
    assert ran_on() == "serial"
    places = set(pmap(where, range(8), bar=False, serial=False))
    assert places != {where(0)}


def test_serial_true_needs_no_valid_configured_backend(monkeypatch):
    monkeypatch.setenv("PARFOR_BACKEND", "nope")
    assert pmap(abs, [-1, -2], serial=True, bar=False) == [1, 2]


@pytest.mark.parametrize("text", [
    '[tool.parfor]\nbackend = "threads"\n',
    '[ "tool" . \'parfor\' ]  # spaced and quoted\nbackend = "threads"\n',
    '[tool.parfor.backends.threads]\n[tool.parfor]\nbackend = "threads"\n',
    '[tool]\nparfor = { backend = "threads" }\n',
    'tool.parfor.backend = "threads"\n',
    'tool = { parfor = { backend = "threads" } }\n',
])
def test_every_way_toml_spells_tool_parfor_is_found(isolated, text):
    write(isolated / "project" / "pyproject.toml", text + "[project]\nname = 'x'\n")
    assert current()["backend"] == "threads"


def test_a_pyproject_without_tool_parfor_is_not_parsed(isolated):
    """Reading it is cheap; parsing it, and importing tomllib, costs a short call a visible
    share: a file that names no tool.parfor is passed over, even one that is not TOML."""
    write(isolated / "project" / "pyproject.toml",
          "[project]\nname = 'x'\n[tool.ruff]\nline-length = 99\ntools = = broken\n"
          "[tool.parforx]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert current()["backend"] is None
    code = ("import sys\nfrom parfor_core._config import current\ncurrent()\n"
            "print('tomllib' in sys.modules, 'tomli' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=isolated / "project" / "sub")
    assert loaded.stdout.split() == ["False", "False"], loaded.stderr


def test_a_broken_pyproject_further_up_warns_and_is_skipped(isolated):
    write(isolated / "project" / "pyproject.toml", "[tool.parfor]\nthis is = = not toml\n")
    write(isolated / "project" / "sub" / "pyproject.toml", "[tool]\nother = 1\n")
    with pytest.warns(ConfigWarning, match="is not valid TOML"):
        assert current()["backend"] is None
    write(isolated / "project" / "sub" / "pyproject.toml", "tool = 3\n")
    assert current()["backend"] is None


def test_disable_plugins_from_a_project_file(isolated):
    write(isolated / "project" / "parfor.toml", 'disable_plugins = ["loky"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARFOR_")}
    listing = subprocess.run([sys.executable, "-m", "parfor", "backends"], capture_output=True,
                             text=True, timeout=60, env=env, cwd=isolated / "project" / "sub")
    assert listing.returncode == 0, listing.stderr
    assert "loky" not in listing.stdout and "processes" in listing.stdout
