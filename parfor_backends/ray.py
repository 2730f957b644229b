"""The ray backend: chunks run as Ray tasks (``pip install "parfor[ray]"``).

Give a cluster's address (``address`` option, ``[tool.parfor.backends.ray]``, or
``PARFOR_RAY_ADDRESS``), or none for a local Ray instance. Ray's runtime is one per process:
when the program has called ``ray.init`` itself, parfor uses that runtime as it is. Each call's
function and extra arguments are put in the object store once; the workers need parfor.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from parfor_backends._cluster import CONNECT_TIMEOUT, ClusterBackend, local_python_path
from parfor_core import Backend, ParforError, execute_call, hookimpl, mark_worker_process

_runtime_lock = threading.Lock()
_runtime_users = 0  # RayBackend instances connected to a runtime that parfor started
_runtime_address: str | None = None  # the address that runtime was started for (None: local)


def _execute(call_id: str, shipped: list[Any], items: bytes) -> bytes:
    """Runs in a Ray worker: one chunk of a call. ``shipped`` holds the reference to the call
    in the object store, in a list so that Ray hands over the reference and not its value:
    the worker fetches and loads the call once, not once per task."""
    import ray

    mark_worker_process()
    return execute_call(call_id, lambda: ray.get(shipped[0]), items)


def _check_listening(address: str) -> None:
    """Fail at once, naming it, where nothing listens at a cluster's ``host:port``: there,
    ``ray.init`` retries for minutes. Other forms ("auto") are Ray's to resolve."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ParforError(f"Cannot connect to the Ray cluster at {address!r}: nothing answers "
                          f"at {host}:{port} ({type(exc).__name__}: {exc}). Is it running, and is "
                          f"that its address (`ray status` on its head node shows it)?") from exc


class RayBackend(ClusterBackend):
    """Runs each chunk as one Ray task that takes one CPU."""

    name = "ray"
    module = "ray"
    extra = "ray"
    environment = {"address": "PARFOR_RAY_ADDRESS"}

    def _connect(self) -> int:
        global _runtime_users, _runtime_address
        import ray

        with _runtime_lock:
            if _runtime_users > 0 and self.address != _runtime_address:
                started, wanted = (address or "a local instance"
                                   for address in (_runtime_address, self.address))
                raise ParforError(
                    f"Ray allows one runtime per process, and this one was started for "
                    f"{started}, not {wanted}; call parfor_core.registry.shutdown() first to "
                    f"switch")
            self._owns_runtime = _runtime_users > 0 or not ray.is_initialized()
            if not ray.is_initialized():
                local = self.address is None
                if not local:
                    _check_listening(self.address)
                try:
                    ray.init(address="local" if local else self.address,  # "local": a new one
                             num_cpus=self.n_workers if local else None,
                             include_dashboard=False, log_to_driver=self.worker_output,
                             logging_level=logging.WARNING,
                             runtime_env={"env_vars": {"PYTHONPATH": local_python_path()}}
                             if local else None)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                            " (a cluster with token authentication also needs RAY_AUTH_MODE=token "
                            "and its token here: RAY_AUTH_TOKEN or ~/.ray/auth_token)")
                    raise ParforError(f"Cannot connect to the Ray cluster at {self.address!r}: "
                                      f"{type(exc).__name__}: {exc}{hint}") from exc
            if self._owns_runtime:
                _runtime_users += 1
                _runtime_address = self.address
        self._remote = ray.remote(max_retries=0, num_cpus=1)(_execute)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 1:
            self._disconnect(kill=True)
            raise ParforError("The Ray cluster has no CPU to run tasks on; start a node with "
                              "`ray start --address=...`")
        return cpus

    def _disconnect(self, kill: bool) -> None:
        global _runtime_users
        import ray

        with _runtime_lock:
            if not self._owns_runtime:
                return
            _runtime_users -= 1
            if _runtime_users == 0:
                ray.shutdown()

    def _ship(self, data: bytes) -> Any:
        import ray

        return ray.put(data)

    def _start_remote(self, call_id: str, shipped: Any, items: bytes) -> Any:
        reference = self._remote.remote(call_id, [shipped], items)
        return reference, reference.future()  # the future fetches the answer once

    def _when_done(self, remote: Any, callback: Callable[[], object]) -> None:
        # Let go of once called: the callback holds the remote, whose future keeps its
        # callbacks, and that cycle kept each call's arguments until a garbage collection.
        once = [callback]
        remote[1].add_done_callback(lambda _: once.pop()())

    def _outcome(self, remote: Any) -> bytes:
        return remote[1].result()

    def _cancel(self, remotes: list[Any], hard: bool) -> None:
        """Only for Ctrl-C: Ray's driver can abort when a cancel races with the task's end
        ("Check failed: it != submissible_tasks_.end()", ray-project/ray#54846), which an ordinary
        cancel (an error in one item, a closed gmap) would risk for nothing: at most two tasks
        per CPU are out, and their results are dropped."""
        import ray

        if hard:
            for reference, done in remotes:
                if not done.done():
                    ray.cancel(reference, force=True)

    def _lost_worker(self, error: BaseException) -> tuple[str, bool] | None:
        from ray import exceptions

        if isinstance(error, (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError)):
            return f"Ray reports {type(error).__name__}: {error}", False
        if isinstance(error, (exceptions.NodeDiedError, exceptions.ObjectLostError)):
            return f"Ray reports {type(error).__name__}: {error}", True
        return None


@hookimpl
def parfor_register_backends() -> list[type[Backend]]:
    return [RayBackend]
