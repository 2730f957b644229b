"""A local Dask cluster for the dask backend, in a process of its own.

``python -m parfor_backends._dask_local N`` starts a scheduler and N single-threaded worker
processes on loopback, prints the scheduler's address, and runs until its standard input
closes: the parent shut it down, or died. Its own process, not the caller's, spawns the
workers, so the caller's script is never re-imported (it needs no ``__main__`` guard).
"""

from __future__ import annotations

import logging
import sys

#: The line the address is printed on, after this prefix; other lines are the workers' output.
ADDRESS_PREFIX = "parfor-dask-scheduler "

if __name__ in ("__main__", "__mp_main__"):  # this helper, and the workers it spawns (which
    # import it as their main module), not a program that imports ADDRESS_PREFIX.
    # Whole lines, each in one write: the workers share one pipe, and lines printed at the same
    # moment must not mix.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]


def main() -> None:
    n_workers = int(sys.argv[1])
    import dask
    from distributed import LocalCluster

    # A task whose worker dies fails at once; the dask backend then reruns its items alone,
    # `retries` times, so that the one that kills is found and named. No sampling profiler:
    # it feeds the dashboard, which this cluster has not, and its thread, which walks the
    # frames of running threads, crashed (SIGSEGV) Dask's processes on free-threaded Python.
    dask.config.set({"distributed.scheduler.allowed-failures": 0,
                     "distributed.worker.profile.enabled": False})
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", scheduler_port=0, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        print(ADDRESS_PREFIX + cluster.scheduler_address, flush=True)
        sys.stdin.buffer.read()


if __name__ == "__main__":
    main()
