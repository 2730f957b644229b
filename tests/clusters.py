"""Real Dask and Ray clusters on loopback, started as the separate commands an operator runs.

The cluster backends' tests run against these by address, exactly as users connect to theirs.
Workers get the test process's import path, so that they import the tests' own functions.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

BIN = Path(sys.executable).parent
#: Backends this run leaves out, by name (comma-separated): for an interpreter that a backend's
#: engine does not support (Ray on a free-threaded Python). Tests of a backend left out are
#: deselected; any other backend that is not available fails the run (conftest.py).
WITHOUT = {name.strip() for name in os.environ.get("PARFOR_TEST_WITHOUT", "").split(",")
           if name.strip()}
START_TIMEOUT = 60.0
#: Dask's sampling profiler off, as docs/cluster.md recommends on free-threaded Python: its
#: thread walks the frames of running threads, which crashed (SIGSEGV) Dask's scheduler and
#: workers there.
DASK_SETTINGS = {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}


def _environment(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(entry for entry in sys.path if entry)
    # A crash of the engine's own processes (seen: the Dask scheduler, on free-threaded
    # Python) leaves its Python stack in the cluster's logs.
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1", **extra}


def _wait_for(condition, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


@dataclass
class DaskCluster:
    """``dask scheduler`` and ``dask worker`` commands, each a process group of its own."""

    folder: Path
    address: str = ""
    scheduler: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    client: Any = None  # the tests' own connection, to watch the workers
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    @classmethod
    def start(cls, folder: Path, n_workers: int = 2) -> DaskCluster:
        cluster = cls(folder)
        cluster._start_scheduler()
        for number in range(n_workers):
            cluster.add_worker(f"worker-{number}")
        cluster.wait_for_workers(n_workers)
        return cluster

    def _start_scheduler(self, port: int = 0) -> None:
        """Start the scheduler (on ``port``, or any free one) and wait for its address."""
        scheduler_file = self.folder / "scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        # parfor's `retries` then decides how often an item whose worker died is tried again
        # (Dask's own default, 3, would multiply with it); docs/cluster.md recommends the same.
        env = _environment(DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0", **DASK_SETTINGS)
        self.scheduler = self._run(
            ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
             "--scheduler-file", str(scheduler_file)], "scheduler", env)
        _wait_for(lambda: scheduler_file.exists() and scheduler_file.stat().st_size > 0,
                  "the Dask scheduler writing its address")
        self.address = json.loads(scheduler_file.read_text())["address"]

    def kill_scheduler(self) -> None:
        """Kill the scheduler, as a crash or a lost machine would end it."""
        assert self.scheduler is not None
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait()

    def _run(self, arguments: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
        with open(self.folder / f"{log}.log", "ab") as output:
            return subprocess.Popen([str(BIN / "dask"), *arguments], stdout=output,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)

    def add_worker(self, name: str) -> subprocess.Popen:
        worker = self._run(["worker", self.address, "--nthreads", "1", "--nworkers", "1",
                            "--no-dashboard", "--name", name, "--death-timeout", "30"],
                           name, _environment(**DASK_SETTINGS))
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, n: int | None = None) -> None:
        """Until ``n`` workers (default: every one started) are connected: a test that killed
        one leaves the next test a whole cluster. Workers that do not come back (a nanny that
        gave up on a busy machine) are replaced, so one bad moment does not fail every later
        test."""
        if self.scheduler is not None and self.scheduler.poll() is not None:
            # Crashed (seen on free-threaded Python; its stack is in scheduler.log): the test
            # it died in fails, and the next ones run.
            print(f"\nThe Dask scheduler died (exit code {self.scheduler.returncode}; its log: "
                  f"{self.folder / 'scheduler.log'}); starting it again.", file=sys.stderr)
            self.restart()
        if self.client is None:
            from distributed import Client

            self.client = Client(self.address, timeout=START_TIMEOUT, set_as_default=False)
        wanted = n or len(self.workers)
        try:
            self.client.wait_for_workers(wanted, timeout=START_TIMEOUT / 2)
        except Exception:
            self._replace_workers()
            self.client.wait_for_workers(wanted, timeout=START_TIMEOUT)

    def restart(self) -> None:
        """After the scheduler stopped: start it again at its address, with new workers, and
        wait for them."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self._start_scheduler(int(self.address.rpartition(":")[2]))
        self._replace_workers()
        self.wait_for_workers()

    def _replace_workers(self) -> None:
        """Kill every worker and start as many new ones (a worker that lost its scheduler
        does not join a new one at the same address)."""
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        count, self.workers = len(self.workers), []
        for _ in range(count):
            self.add_worker(f"worker-{next(self._names)}")

    def task_processes(self) -> dict[int, subprocess.Popen]:
        """The processes that run tasks (children of the `dask worker` commands' nannies), each
        with the command it belongs to."""
        return {child.pid: worker for worker in self.workers if worker.poll() is None
                for child in psutil.Process(worker.pid).children(recursive=True)}

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for process in [*self.workers, self.scheduler]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass
class RayCluster:
    """``ray start --head`` on loopback; ``ray stop`` ends it."""

    folder: Path
    address: str = ""

    @classmethod
    def start(cls, folder: Path, cpus: int = 2) -> RayCluster:
        cluster = cls(folder)
        port = _free_port()
        # Token authentication, whatever the Ray release's default (it changed: `ray start`
        # turned it on unasked, then only where a token already exists); the driver given an
        # address needs the same two settings. One token for every cluster of the session.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        with open(folder / "ray-start.log", "ab") as output:
            subprocess.run(
                [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                 "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard", "false",
                 "--disable-usage-stats"],
                stdout=output, stderr=subprocess.STDOUT, env=_environment(), check=True,
                timeout=START_TIMEOUT)
        cluster.address = f"127.0.0.1:{port}"
        return cluster

    def wait_for_workers(self) -> None:
        """Ray starts worker processes as tasks need them: nothing to wait for."""

    @staticmethod
    def worker_pids() -> list[int]:
        """Ray worker processes running a parfor task right now."""
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if "ray::_execute" in " ".join(p.info["cmdline"] or ())]

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True,
                       timeout=START_TIMEOUT)


#: The backends on a cluster engine, and how the tests start a cluster for each.
CLUSTERS = {name: cls for name, cls in {"dask": DaskCluster, "ray": RayCluster}.items()
            if name not in WITHOUT}
#: Every cluster backend as a test parameter, marked with its backend: PARFOR_TEST_WITHOUT
#: deselects it (conftest.py) as it does every other test of a backend left out.
CLUSTER_NAMES = [pytest.param(name, marks=pytest.mark.backend(name)) for name in ("dask", "ray")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before it runs: SIGKILL it when the test process ends, however it ends
    (the session fixture starts the clusters from the main thread, which lives as long)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
