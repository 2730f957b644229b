"""The cluster backends (dask, ray) against the local processes backend, on this machine.

    python benchmarks/bench_cluster.py            # the full run (a minute or two)
    python benchmarks/bench_cluster.py --quick    # a smoke run, as CI does

Needs ``pip install ".[dask,ray]"``. Each backend runs on a local cluster it starts itself
(no address configured) with one worker per CPU. Figures are medians of interleaved runs:
the per-item overhead over a plain serial loop on many trivial items, the speedup over serial on
CPU-bound items, and the time to the first result of a fresh backend (cluster start included).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from bench_backends import cpu_bound, median_ratios, print_table, timed, trivial

from parfor import pmap
from parfor_core import registry

CONTENDERS = ["processes", "dask", "ray"]


def run(name: str, fun, items: list, *args) -> list:
    return pmap(fun, items, args, backend=name, bar=False, serial=False)


def first_result(name: str) -> float:
    """Seconds for a 4-item call on a backend not started yet (its cluster start included)."""
    registry.shutdown()
    start = time.perf_counter()
    run(name, abs, [1, 2, 3, 4])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    quick = parser.parse_args().quick
    for variable in ("PARFOR_DASK_ADDRESS", "PARFOR_RAY_ADDRESS"):
        os.environ.pop(variable, None)  # local clusters, the same machine for every contender
    repeats = 1 if quick else 5
    n_workers = os.cpu_count() or 1
    print(f"# parfor cluster benchmark: {platform.python_implementation()} "
          f"{platform.python_version()}, {platform.machine()}, {n_workers} CPUs; "
          f"{'quick smoke run' if quick else f'medians of {repeats} interleaved runs'}")
    rows: dict[str, dict[str, str]] = {name: {} for name in CONTENDERS}
    try:
        for name in CONTENDERS:
            starts = [first_result(name) for _ in range(1 if quick else 3)]
            rows[name]["first result, fresh backend (s)"] = f"{statistics.median(starts):.2f}"

        items = list(range(2_000 if quick else 100_000))
        serial, ratios = median_ratios(
            CONTENDERS, {n: (lambda n=n: run(n, trivial, items)) for n in CONTENDERS},
            lambda: [trivial(x) for x in items], repeats)
        for name, ratio in ratios.items():
            overhead = (ratio - 1) * serial / len(items)
            rows[name]["overhead per trivial item (us)"] = f"{overhead * 1e6:.1f}"

        warm = {name: statistics.median(timed(lambda n=name: run(n, abs, [1, 2, 3, 4]))
                                        for _ in range(max(3, repeats))) for name in CONTENDERS}
        for name, seconds in warm.items():
            rows[name]["warm 4-item call (ms)"] = f"{seconds * 1000:.1f}"

        work = 20_000 if quick else 600_000
        jobs = list(range(4 if quick else 32))
        serial, ratios = median_ratios(
            CONTENDERS, {n: (lambda n=n: run(n, cpu_bound, jobs, work)) for n in CONTENDERS},
            lambda: [cpu_bound(x, work) for x in jobs], repeats)
        for name, ratio in ratios.items():
            rows[name]["CPU-bound speedup"] = f"{1 / ratio:.2f}"
            rows[name]["speedup vs processes"] = f"{ratios['processes'] / ratio:.2f}"
    finally:
        registry.shutdown()

    print_table("backend", rows)


if __name__ == "__main__":
    main()
