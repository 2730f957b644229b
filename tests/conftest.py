"""Fixtures shared by the suite: every behavioural test runs once per registered backend."""

from __future__ import annotations

import sys
import sysconfig

import pytest

from parfor_core import registry

BACKENDS = registry.names()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of a registered backend; tests using it run on each in turn."""
    return request.param


PROCESS_BACKENDS = [name for name in BACKENDS if registry.get_class(name).crosses_process]


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request: pytest.FixtureRequest) -> str:
    """The name of a registered backend whose workers are other processes."""
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _gil_stays_disabled():
    """On a free-threaded Python the GIL must still be off when the suite ends: no import of
    parfor or its dependencies, in any test, turned it back on."""
    yield
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert not sys._is_gil_enabled(), "something imported during the tests re-enabled the GIL"
