"""Fixtures shared by the suite: every behavioural test runs once per registered backend."""

from __future__ import annotations

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
