"""A real third-party plugin: the example distribution in examples/, installed with pip into
this environment, then discovered, listed, selected through every rung of the configuration,
and put through the conformance suite, each in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "parfor-backend-example"


@pytest.fixture(scope="module")
def installed():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(EXAMPLE)],
                   check=True, timeout=300)
    try:
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", "parfor-backend-example"], check=True,
                       timeout=300)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """An environment with no PARFOR_* variable and no user file; runs in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARFOR_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    return env


def run(code: str, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


CHOSEN = """
    from parfor import pmap
    from parfor_core import registry
    from parfor_core._config import current
    print(registry.select(None, serial=None, total=10, settings=current()).name)
    print(pmap(abs, range(-3, 3), bar=False))
"""


def test_listed_with_its_distribution(installed, clean_env, tmp_path):
    out = run("from parfor.__main__ import main; main(['backends'])", clean_env, tmp_path)
    line = next(line for line in out.splitlines() if " example " in f" {line} ")
    assert "available; never chosen automatically; from parfor-backend-example 0.1.0" in line


def test_selected_by_name(installed, clean_env, tmp_path):
    out = run("""
        from parfor import pmap
        print(pmap(abs, range(-3, 3), backend="example", bar=False))
    """, clean_env, tmp_path)
    assert out.strip() == "[3, 2, 1, 0, 1, 2]"


@pytest.mark.parametrize("rung", ["argument", "block", "environment", "project", "user"])
def test_selected_through_each_rung_of_the_configuration(installed, clean_env, tmp_path, rung):
    code = CHOSEN
    if rung == "argument":
        code = CHOSEN.replace("settings=current()", "settings=current(backend='example')")
    elif rung == "block":
        code = "import parfor\nwith parfor.config(backend='example'):\n" + textwrap.indent(
            textwrap.dedent(CHOSEN), "    ")
    elif rung == "environment":
        clean_env["PARFOR_BACKEND"] = "example"
    elif rung == "project":
        (tmp_path / "pyproject.toml").write_text('[tool.parfor]\nbackend = "example"\n')
    else:
        user = tmp_path / "xdg" / "parfor" / "config.toml"
        user.parent.mkdir(parents=True)
        user.write_text('backend = "example"\n')
    assert run(code, clean_env, tmp_path).splitlines() == ["example", "[3, 2, 1, 0, 1, 2]"]


def test_its_own_options_come_from_the_configuration(installed, clean_env, tmp_path):
    (tmp_path / "parfor.toml").write_text(
        'backend = "example"\n[backends.example]\nstart_method = "forkserver"\n')
    out = run("""
        from parfor_core import registry
        from parfor_core._config import current
        with registry.lease(registry.select(None, serial=None, total=9,
                                            settings=current())) as backend:
            print(backend.name, backend.start_method)
    """, clean_env, tmp_path)
    assert out.strip() == "example forkserver"


def test_takes_part_in_the_automatic_choice_by_priority(installed, clean_env, tmp_path):
    clean_env["PARFOR_EXAMPLE_PRIORITY"] = "500"  # above every built-in, threads included
    out = run("from parfor.__main__ import main; main(['backends'])", clean_env, tmp_path)
    assert "* example" in out
    assert "A plain pmap here uses 'example'" in out


def test_disabled_by_name(installed, clean_env, tmp_path):
    clean_env["PARFOR_DISABLE_PLUGINS"] = "example"
    out = run("from parfor.__main__ import main; main(['backends'])", clean_env, tmp_path)
    assert "example" not in out


def test_passes_the_conformance_suite(installed, clean_env, tmp_path):
    (tmp_path / "test_example_backend.py").write_text(textwrap.dedent("""
        from parfor_core.testing import BackendConformance

        class TestExample(BackendConformance):
            backend = "example"
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_example_backend.py"], capture_output=True, text=True,
                            timeout=300, env=clean_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 passed" in result.stdout


def test_recovers_after_a_worker_dies(installed, clean_env, tmp_path):
    out = run("""
        import os
        from parfor import WorkerError, pmap

        def die(i):
            os._exit(1)

        if __name__ == "__main__":
            try:
                pmap(die, range(4), backend="example", bar=False)
            except WorkerError as error:
                print("WorkerError", error.backend)
            print(pmap(abs, [-1, -2], backend="example", bar=False))
    """.replace('if __name__ == "__main__":', "if True:"), clean_env, tmp_path)
    assert out.splitlines() == ["WorkerError example", "[1, 2]"]
