"""Fixtures shared by the suite: every behavioural test runs once per registered backend."""

from __future__ import annotations

import os
import sys
import sysconfig

import pytest
from clusters import CLUSTERS, WITHOUT, DaskCluster, RayCluster

from parfor_core import registry

BACKENDS = [name for name in registry.names() if name not in WITHOUT]


def pytest_report_header() -> list[str]:
    left_out = f"; left out by PARFOR_TEST_WITHOUT: {', '.join(sorted(WITHOUT))}" if WITHOUT else ""
    return [f"parfor backends under test: {', '.join(BACKENDS)}{left_out}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests marked with a backend that PARFOR_TEST_WITHOUT leaves out."""
    left_out = [item for item in items
                if any(mark.args[0] in WITHOUT for mark in item.iter_markers("backend"))]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


@pytest.fixture(scope="session", autouse=True)
def _every_backend_is_available():
    unavailable = {name: registry.get_class(name).unavailable_reason() for name in BACKENDS}
    unavailable = {name: reason for name, reason in unavailable.items() if reason}
    if unavailable:
        pytest.exit("backends not available here (install them, or name them in "
                    f"PARFOR_TEST_WITHOUT): {unavailable}", returncode=3)


@pytest.fixture(scope="session")
def cluster_addresses(tmp_path_factory: pytest.TempPathFactory):
    """Starts a real cluster for each cluster backend on first need; its address is put in
    PARFOR_DASK_ADDRESS / PARFOR_RAY_ADDRESS, so that a plain ``backend="dask"`` (also in
    subprocesses the tests start) runs on it."""
    started: dict[str, DaskCluster | RayCluster] = {}

    def address_of(name: str) -> str:
        if name not in started:
            started[name] = CLUSTERS[name].start(tmp_path_factory.mktemp(f"{name}-cluster"))
            os.environ[registry.get_class(name).environment["address"]] = started[name].address
        started[name].wait_for_workers()
        return started[name].address

    yield address_of
    registry.shutdown()  # disconnect the pooled backends before their clusters go
    for name, cluster in started.items():
        os.environ.pop(registry.get_class(name).environment["address"], None)
        cluster.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of a registered backend; tests using it run on each in turn (the cluster
    backends on a real cluster)."""
    if request.param in CLUSTERS:
        request.getfixturevalue("cluster_addresses")(request.param)
    return request.param


PROCESS_BACKENDS = [name for name in BACKENDS if registry.get_class(name).crosses_process]


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request: pytest.FixtureRequest) -> str:
    """The name of a registered backend whose workers are other processes."""
    if request.param in CLUSTERS:
        request.getfixturevalue("cluster_addresses")(request.param)
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _gil_stays_disabled():
    """On a free-threaded Python the GIL must still be off when the suite ends: no import of
    parfor or its dependencies, in any test, turned it back on."""
    yield
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert not sys._is_gil_enabled(), "something imported during the tests re-enabled the GIL"
