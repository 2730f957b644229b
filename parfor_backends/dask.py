"""The dask backend: chunks run as tasks on a Dask cluster (``pip install "parfor[dask]"``).

Give the scheduler's address (``address`` option, ``[tool.parfor.backends.dask]``, or
``PARFOR_DASK_ADDRESS``), or none for a local cluster of worker processes. Each call's function
and extra arguments are scattered to the cluster once; the workers need parfor installed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import IO, Any

from parfor_backends._cluster import CONNECT_TIMEOUT, ClusterBackend, local_python_path
from parfor_backends._dask_local import ADDRESS_PREFIX
from parfor_core import Backend, ParforError, execute_call, hookimpl, mark_worker_process

#: Items of a task above this size are scattered first rather than sent inside the task.
LARGE_ITEMS_BYTES = 1 << 20
#: Seconds a local cluster may take to start: importing Dask and starting its processes takes
#: seconds on a busy machine, however short the timeouts for a scheduler that stops answering.
LOCAL_START_TIMEOUT = 30.0


def _execute(call_id: str, call: bytes, items: bytes) -> bytes:
    """Runs on a Dask worker: one chunk of a call (``call``: the scattered call, which Dask
    copies to each worker once)."""
    mark_worker_process()
    return execute_call(call_id, lambda: call, items)


class DaskBackend(ClusterBackend):
    """Runs each chunk as one task on a ``dask.distributed`` cluster."""

    name = "dask"
    module = "distributed"
    extra = "dask"
    environment = {"address": "PARFOR_DASK_ADDRESS"}

    def _connect(self) -> int:
        from distributed import Client

        self._local: _LocalCluster | None = None
        address = self.address
        if address is None:
            self._local = _LocalCluster(self.n_workers, self.worker_output)
            address = self._local.address
        self._scheduler = f"the Dask scheduler at {address}"
        try:
            self._client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            self._stop_local(kill=True)
            raise ParforError(f"Cannot connect to the Dask scheduler at {address!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            self._client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except TimeoutError:
            self._disconnect(kill=True)
            raise ParforError(f"The Dask scheduler at {address!r} has had no worker for "
                              f"{CONNECT_TIMEOUT:.0f} s; start some with `dask worker "
                              f"{address}`") from None
        if self._local is not None:
            return self.n_workers
        return sum(self._client.nthreads().values())

    def _disconnect(self, kill: bool) -> None:
        self._client.close()
        self._stop_local(kill)

    def _stop_local(self, kill: bool) -> None:
        if self._local is not None:
            self._local.stop(kill)
            self._local = None

    def interrupt(self) -> None:
        """Cancel this backend's tasks; a local cluster is stopped at once (Dask cannot stop a
        running task, and its workers may be deep in a long item) and a new one starts with the
        next task."""
        super().interrupt()
        with self._lock:
            local, self._local = self._local, None
            if local is None:
                return
            self._connected = False
            self._shipped.clear()
        local.stop(kill=True)  # first the cluster, so that closing the client waits on nothing
        self._client.close()

    def _ship(self, data: bytes) -> Any:
        # On every worker: one lost worker then loses no call (scattered data has no recipe).
        try:
            return self._client.scatter(data, hash=False, broadcast=True)
        except KeyError as error:  # the scheduler's replicate, about a worker that just left:
            raise ConnectionResetError(  # sent again (ClusterBackend._send), to those left
                f"a Dask worker ({error}) left while the call was sent to every worker"
            ) from error

    def _start_remote(self, call_id: str, shipped: Any, items: bytes) -> Any:
        if self._client.status != "running":  # closing: it would take the task, and never
            raise ConnectionResetError("the Dask client is closed")  # run it nor answer
        sent: Any = items
        if len(items) > LARGE_ITEMS_BYTES:  # keep big items out of the scheduler's task graph
            sent = self._client.scatter(items, hash=False)
        return self._client.submit(_execute, call_id, shipped, sent, pure=False)

    def _when_done(self, remote: Any, callback: Callable[[], object]) -> None:
        remote.add_done_callback(lambda _: callback())

    def _outcome(self, remote: Any) -> bytes:
        return remote.result()

    def _cancel(self, remotes: list[Any], hard: bool) -> None:
        from distributed.client import ClosedClientError

        with contextlib.suppress(ClosedClientError):  # then its tasks are cancelled already
            self._client.cancel(remotes)  # Dask cannot stop a running task; see interrupt()

    def _lost_connection(self, error: BaseException, sending: bool) -> str | None:
        # A client that lost its scheduler reconnects for CONNECT_TIMEOUT, then closes and
        # cancels its tasks. Sending, an OSError is Dask's network (CommClosedError is one);
        # as a task's outcome, it may be the task's own error.
        if self._client.status != "running" or (sending and isinstance(error, OSError)):
            return self._scheduler
        return None

    def _lost_worker(self, error: BaseException) -> tuple[str, bool] | None:
        from distributed.scheduler import KilledWorker

        if isinstance(error, KilledWorker):
            return f"the Dask scheduler reports KilledWorker: {error}", False
        if isinstance(error, CancelledError):  # not by us: its input or result went with a worker
            return f"the task's data was lost with its worker ({error})", True
        return None


class _LocalCluster:
    """A scheduler and worker processes on loopback, in a process group of their own (a Ctrl-C
    in the terminal reaches the caller, which decides); they stop when the caller's end of
    their standard input closes, also when the caller is killed."""

    def __init__(self, n_workers: int, worker_output: bool) -> None:
        env = {**os.environ, "PYTHONPATH": local_python_path()}
        env.pop("PYTHONUNBUFFERED", None)  # line-buffered instead: see _dask_local
        self.process = subprocess.Popen(
            [sys.executable, "-m", "parfor_backends._dask_local", str(n_workers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, text=True,
        )
        started: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_relay, args=(self.process.stdout, started, worker_output),
                         daemon=True).start()
        try:
            said = started.get(timeout=LOCAL_START_TIMEOUT)
        except queue.Empty:
            said = f"(nothing within {LOCAL_START_TIMEOUT:.0f} s)"
        if not said.startswith(ADDRESS_PREFIX):
            self.stop(kill=True)
            raise ParforError(f"The local Dask cluster did not start (exit code "
                              f"{self.process.returncode}):\n{said}")
        self.address = said[len(ADDRESS_PREFIX):].strip()

    def stop(self, kill: bool) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()  # the cluster's cue to shut down
            if not kill:
                self.process.wait(timeout=CONNECT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            kill = True
        if kill:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


def _relay(lines: IO[str], started: queue.Queue[str], show: bool) -> None:
    """Hand the scheduler's address line to the starting caller (or, when the cluster ends
    before it starts, what it said); then show what the workers print, above any bar."""
    from tqdm import tqdm

    said: list[str] | None = []
    with lines:
        for line in lines:
            if said is None:
                if show:
                    tqdm.write(line.rstrip("\n"), file=sys.stdout)
            elif line.startswith(ADDRESS_PREFIX):
                started.put(line)
                said = None
            else:
                said.append(line)
    if said is not None:
        started.put("".join(said[-20:]))


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [DaskBackend]
