"""parfor's backends against their peers, measured side by side in one run.

    pip install ".[benchmarks]"                    # joblib, mpire, matplotlib, numpy, psutil
    python benchmarks/bench_backends.py            # the full run (a few minutes)
    python benchmarks/bench_backends.py --plot docs/img/benchmarks.png   # ... and a chart
    python benchmarks/bench_backends.py --quick    # a smoke run (seconds), as CI does
    python benchmarks/bench_backends.py --scaling  # W2 with 1, 2, 4, ... workers (many cores)
    python benchmarks/bench_backends.py --scaling --workers 2,4,8,16 --items 160   # ... chosen

Every figure is a median of repeated, interleaved runs, given as a ratio to a plain serial loop
measured in the same run (lower is better, except speedup). Memory is the extra proportional
set size (PSS) of the whole process tree at its peak, sampled while the work runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import psutil

from parfor import gmap, pmap
from parfor_core import available_cpus, registry
from parfor_core._kept import release_all
from parfor_core._registry import gil_enabled

#: "auto" is a plain call: no backend named, a progress bar (drawn to /dev/null), as users run it.
#: joblib and mpire come from the benchmarks extra; they are left out where it is not installed.
INSTALLED = [name for name in ("joblib", "mpire") if importlib.util.find_spec(name)]
CONTENDERS = ["auto", "processes", "threads", "loky", "serial", "multiprocessing.Pool",
              "concurrent.futures", *INSTALLED]
#: W3 only: a plain call whose big argument is a parfor.SharedArray.
SHARED = "auto, SharedArray"
#: W2 only, where fork exists: the machine's own ceiling, with nothing of a pool's work.
LIMIT = "fixed shares, no pool (W2's limit)"
W2_ONLY = [LIMIT] if hasattr(os, "fork") else []
#: The contenders that are not parfor; pools made once and reused, as a user would.
PEERS = ("multiprocessing.Pool", "concurrent.futures", "joblib", "mpire")
_NOWHERE = open(os.devnull, "w")  # noqa: SIM115 - for the whole run


def trivial(x: int) -> int:
    return x * x


def cpu_bound(seed: int, work: int) -> int:
    x = seed
    for _ in range(work):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


def array_sum(i: int, array: Any) -> float:
    return float(array.sum()) + i


def doubled(array: Any) -> Any:
    return array * 2


class Peers:
    """The non-parfor contenders, with pools started once and reused, as a user would."""

    def __init__(self, n_workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(n_workers)
        self.executor = concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=context)
        self.mpire: Any = None
        if "mpire" in INSTALLED:
            from mpire import WorkerPool

            self.mpire = WorkerPool(n_workers, keep_alive=True)  # its default: fork
        self.n_workers = n_workers

    def map(self, name: str, fun: Callable[..., Any], items: list[Any], *args: Any) -> list[Any]:
        chunksize = max(1, len(items) // (4 * self.n_workers))
        if name == "joblib":  # its own automatic batching, on its reused loky pool
            from joblib import Parallel, delayed

            return Parallel(self.n_workers)(delayed(fun)(x, *args) for x in items)
        if name == "mpire" and args:  # mpire's way with big arguments: forked, copy-on-write
            from mpire import WorkerPool

            with WorkerPool(self.n_workers, shared_objects=args) as pool:
                return pool.map(_Shared(fun), items, chunk_size=chunksize)
        if args:
            fun = _Bound(fun, args)
        if name == "multiprocessing.Pool":
            return self.pool.map(fun, items, chunksize=chunksize)
        if name == "mpire":
            return self.mpire.map(fun, items, chunk_size=chunksize)
        return list(self.executor.map(fun, items, chunksize=chunksize))

    def stream(self, name: str, items: Iterator[int]) -> int:
        """Sum of ``trivial`` over a generator, through each peer's lazy API."""
        if name == "multiprocessing.Pool":
            return sum(self.pool.imap(trivial, items, chunksize=1000))
        if name == "joblib":
            from joblib import Parallel, delayed

            return sum(Parallel(self.n_workers, return_as="generator")(
                delayed(trivial)(i) for i in items))
        if name == "mpire":
            return sum(self.mpire.imap(trivial, items, chunk_size=1000))
        # concurrent.futures: Executor.map reads the whole input before yielding
        return sum(self.executor.map(trivial, items, chunksize=1000))

    def close(self) -> None:
        self.pool.terminate()
        self.executor.shutdown(cancel_futures=True)
        if self.mpire is not None:
            self.mpire.terminate()


class _Shared:
    """fun(item, *args) for mpire, which passes its shared objects first."""

    def __init__(self, fun: Callable[..., Any]) -> None:
        self.fun = fun

    def __call__(self, shared: tuple[Any, ...], item: Any) -> Any:
        return self.fun(item, *shared)


class _Bound:
    """fun with extra arguments, picklable for the standard library's pools."""

    def __init__(self, fun: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fun, self.args = fun, args

    def __call__(self, item: Any) -> Any:
        return self.fun(item, *self.args)


def run(name: str, peers: Peers, fun: Callable[..., Any], items: list[Any], *args: Any) -> Any:
    if name == LIMIT:
        return fixed_shares(peers.n_workers, fun, items, *args)
    if name in PEERS:
        return peers.map(name, fun, items, *args)
    if name in ("auto", SHARED):  # default settings, where the worker count is the default
        asked = None if peers.n_workers == available_cpus() else peers.n_workers
        return pmap(fun, items, args, file=_NOWHERE, n_processes=asked)
    return pmap(fun, items, args, backend=name, bar=False, n_processes=peers.n_workers,
                serial=False if name != "serial" else None)


def fixed_shares(n_workers: int, fun: Callable[..., Any], items: list[Any], *args: Any
                 ) -> OwnTime:
    """The speedup this machine allows: ``n_workers`` processes, forked before the clock starts
    and then released at once, each given every n-th item up front, and nothing sent back: no
    pool, no messages, no scheduling. Also the CPU seconds each process used."""
    go_read, go_write = os.pipe()
    children = []
    for share in range(n_workers):
        with warnings.catch_warnings():  # 3.12 on warns of forking with threads: these only
            warnings.simplefilter("ignore", DeprecationWarning)  # compute, and exit at once
            pid = os.fork()
        if pid == 0:
            os.close(go_write)  # so that a parent that dies before the start ends the wait
            if not os.read(go_read, 1):
                os._exit(1)
            for item in items[share::n_workers]:
                fun(item, *args)
            os._exit(0)
        children.append(pid)
    os.close(go_read)
    start = time.perf_counter()
    os.write(go_write, b"x" * n_workers)
    used = []
    for pid in children:
        usage = os.wait4(pid, 0)[2]
        used.append(usage.ru_utime + usage.ru_stime)
    elapsed = OwnTime(time.perf_counter() - start)
    os.close(go_write)
    elapsed.cpu = used
    return elapsed


def stream(name: str, peers: Peers, n: int) -> int:
    """Sum the results of a lazy map over a generator of ``n`` items."""
    items = (i for i in range(n))
    if name in PEERS:
        return peers.stream(name, items)
    if name == "auto":
        return sum(gmap(trivial, items, file=_NOWHERE))
    return sum(gmap(trivial, items, backend=name, bar=False))


def _check(total: int, expected: int) -> None:
    assert total == expected, (total, expected)


class OwnTime(float):
    """Seconds that a contender measured itself, leaving out what it set up first (the
    machine's limit: the forks of its processes); ``cpu``: the CPU seconds of each process."""

    cpu: list[float]


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - start
    return result if isinstance(result, OwnTime) else elapsed


class PeakMemory:
    """Samples the PSS of this process and all its children while a block runs."""

    def __enter__(self) -> PeakMemory:
        self.baseline = _tree_pss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _tree_pss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_pss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def _tree_pss() -> int:
    total = 0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return total


#: A serial loop quicker than this is run again before every contender, and each contender is
#: compared with the loop run just before it: how fast a short loop runs depends on the state
#: the previous contender left (the allocator's, the caches'), by up to a third.
PAIRED_SECONDS = 0.05


def median_ratios(names: list[str], actions: dict[str, Callable[[], Any]],
                  baseline: Callable[[], Any], repeats: int) -> tuple[float, dict[str, float]]:
    """Median time of the serial loop, and each contender's median time as a ratio to it."""
    ratios: dict[str, list[float]] = {name: [] for name in names}
    base: list[float] = []
    paired = timed(baseline) < PAIRED_SECONDS
    for repeat in range(repeats):  # interleaved, so that noise hits every contender alike
        if not paired:
            base.append(timed(baseline))
        for name in _rotated(names, repeat, repeats):
            if paired:
                base.append(timed(baseline))
            elapsed = timed(actions[name])
            ratios[name].append(elapsed / base[-1] if paired else elapsed)
    serial = statistics.median(base)
    return serial, {name: statistics.median(r) / (1.0 if paired else serial)
                    for name, r in ratios.items()}


def _rotated(names: list[str], repeat: int, repeats: int) -> list[str]:
    """The contenders in the order of one repeat: each repeat starts further along the list, so
    that each contender runs early and late alike (a run's place in the round was seen to shift
    its time by a few %)."""
    shift = repeat * len(names) // max(1, repeats)
    return names[shift:] + names[:shift]


#: How often W4b's call of about a millisecond runs: one late wake-up of a thread moves a
#: median of 5 by half.
WARM_REPEATS = 21

#: What each peer runs for the cold start; parfor backends run a plain pmap.
COLD = {
    "multiprocessing.Pool": "import multiprocessing as mp\n"
                            "with mp.get_context('spawn').Pool(2) as p: p.map(abs, range(4))",
    "concurrent.futures": "import concurrent.futures as cf\n"
                          "with cf.ProcessPoolExecutor(2) as e: list(e.map(abs, range(4)))",
    "joblib": "from joblib import Parallel, delayed\n"
              "Parallel(2)(delayed(abs)(i) for i in range(4))",
    "mpire": "from mpire import WorkerPool\nwith WorkerPool(2) as p: p.map(abs, range(4))",
    "auto": "from parfor import pmap\npmap(abs, range(4))",  # its bar goes to the captured stderr
}


def cold_start(name: str) -> float:
    """Seconds from a fresh interpreter to the first result of a 4-item map, and its exit."""
    code = COLD.get(name, f"from parfor import pmap\npmap(abs, range(4), backend={name!r}, "
                          f"bar=False, serial={None if name == 'serial' else False})")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def byte_compile() -> None:
    """Compile parfor's modules as pip does when it installs them: run from a source checkout
    with PYTHONDONTWRITEBYTECODE set, each fresh interpreter would compile them again."""
    import compileall

    for package in ("parfor", "parfor_core", "parfor_backends"):
        compileall.compile_dir(os.path.dirname(importlib.import_module(package).__file__),
                               quiet=1)


def versions() -> str:
    """The versions of what is compared, for the record."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("parfor", "loky", *INSTALLED))


def shared_memory_pages() -> str:
    """Linux's setting for huge pages in shared memory, on which W3 depends (large-data.md)."""
    from parfor_core._shared import shmem_huge_pages

    return f"shmem huge pages: {shmem_huge_pages() or 'none'}"


def plot(rows: dict[str, dict[str, str]], path: str, title: str) -> None:
    """A bar chart per figure of the table, parfor's contenders in one colour, peers in another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    figure, axes = plt.subplots(2, (len(columns) + 1) // 2, figsize=(20, 8))
    names = list(rows)
    for axis, column in zip(axes.flat, columns, strict=False):
        shown = [n for n in names if column in rows[n]]
        values = [float(rows[n][column].rstrip("xMB ").lstrip("+")) for n in shown]
        axis.barh(shown, values, color=["tab:gray" if n in PEERS else "tab:olive" if n == LIMIT
                                       else "tab:blue" for n in shown])
        axis.set_title(column, fontsize=9)
        if "x serial" in column:
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges label minor ticks
        axis.invert_yaxis()
        axis.tick_params(labelsize=8)
    for axis in list(axes.flat)[len(columns):]:
        axis.set_visible(False)
    figure.suptitle(title + " (blue: parfor; grey: peers; olive: the machine's limit)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def scaling(quick: bool, repeats: int, counts: list[int], n_items: int | None) -> None:
    """W2's speedup with each number of workers in ``counts``: how parallel work scales.
    ``threads`` runs only where the GIL is disabled: with it, its speedup is 1 at every count."""
    contenders = [name for name in CONTENDERS
                  if name != "serial" and (name != "threads" or not gil_enabled())] + W2_ONLY
    work = 20_000 if quick else 600_000
    jobs = list(range(n_items or (4 if quick else 32)))
    rows: dict[str, dict[str, str]] = {name: {} for name in contenders}
    for count in counts:
        peers = Peers(count)
        try:
            for name in contenders:  # warm every pool first, each of its workers started
                run(name, peers, cpu_bound, jobs, work // 20)
            _, ratios = median_ratios(
                contenders, {n: (lambda n=n, p=peers: run(n, p, cpu_bound, jobs, work))
                             for n in contenders},
                lambda: [cpu_bound(x, work) for x in jobs], repeats)
        finally:
            peers.close()
            registry.shutdown()  # the next count starts parfor's pools afresh too
        # Each count's figures as they come, should the run be cut short before the table:
        print(f"# {count} workers: " + ", ".join(f"{name} {1 / ratio:.2f}"
                                                 for name, ratio in ratios.items()), flush=True)
        for name, ratio in ratios.items():
            rows[name][f"{count} workers"] = f"{1 / ratio:.2f}"
            if count == counts[-1]:
                rows[name][f"share of {count} cores"] = f"{100 / ratio / count:.0f}%"
    print_table("W2 speedup", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--plot", metavar="PNG", help="also draw the table as a chart")
    parser.add_argument("--scaling", action="store_true",
                        help="only W2, with 1, 2, 4, ... workers up to every CPU")
    parser.add_argument("--workers", metavar="N,N,...", type=_counts,
                        help="--scaling's worker counts (default: 1, 2, 4, ... up to every CPU)")
    parser.add_argument("--items", type=int,
                        help="--scaling's number of W2 items (default: 32; 4 if --quick)")
    parser.add_argument("--repeats", type=int, help="runs per median (default: 5; 1 if --quick)")
    options = parser.parse_args()
    quick = options.quick
    n_workers = os.cpu_count() or 1
    repeats = options.repeats or (1 if quick else 5)
    print(f"# parfor benchmark: {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {n_workers} CPUs, {psutil.virtual_memory().total / 2**30:.0f} "
          f"GiB; {'quick smoke run' if quick else f'medians of {repeats} interleaved runs'}")
    print(f"# {versions()}; {shared_memory_pages()}")
    if options.scaling:
        scaling(quick, repeats, options.workers or
                sorted({min(2**k, n_workers) for k in range(n_workers.bit_length() + 1)}),
                options.items)
        return
    peers = Peers(n_workers)
    for name in CONTENDERS:  # warm every pool first
        run(name, peers, trivial, list(range(100)))
    try:
        rows: dict[str, dict[str, str]] = {name: {} for name in CONTENDERS}

        items = list(range(2_000 if quick else 100_000))
        serial, ratios = median_ratios(
            CONTENDERS, {n: (lambda n=n: run(n, peers, trivial, items)) for n in CONTENDERS},
            lambda: [trivial(x) for x in items], repeats)
        for name, ratio in ratios.items():
            rows[name]["W1 100k trivial items (x serial)"] = f"{ratio:.2f}x"

        work = 20_000 if quick else 600_000
        jobs = list(range(4 if quick else 32))
        serial, ratios = median_ratios(
            [*CONTENDERS, *W2_ONLY], {n: (lambda n=n: run(n, peers, cpu_bound, jobs, work))
                                      for n in [*CONTENDERS, *W2_ONLY]},
            lambda: [cpu_bound(x, work) for x in jobs], repeats)
        for name, ratio in ratios.items():
            rows.setdefault(name, {})["W2 CPU-bound (speedup)"] = f"{1 / ratio:.2f}"

        import numpy

        array = numpy.ones((2 if quick else 200) * 2**20 // 8)
        tasks = list(range(4 if quick else 32))
        from parfor import SharedArray

        shared = SharedArray.from_array(array)  # as a user who makes the data there from the start
        for name in CONTENDERS:  # every pool's workers import numpy before, not during, W3
            run(name, peers, array_sum, [0, 1], numpy.ones(8))
        for name in [*CONTENDERS, SHARED]:
            argument = shared if name == SHARED else array
            action = partial(run, name, peers, array_sum, tasks, argument)
            release_all()  # each contender pays for its own copy: no block kept from the last
            time.sleep(0.5)  # workers let go of the previous contender's shared memory
            with PeakMemory() as memory:  # a first call: what it holds, its copy included
                action()
            # Timed apart: the sampler's reads of each process's page tables take CPU that the
            # workers need (12% of W3's time on `auto`, with 4 KiB pages; 1% on mpire's).
            release_all()
            seconds = statistics.median(timed(action) for _ in range(repeats))
            base = statistics.median(timed(lambda: [array_sum(i, array) for i in tasks])
                                     for _ in range(min(3, repeats)))
            rows.setdefault(name, {})["W3 big argument (x serial)"] = f"{seconds / base:.1f}x"
            rows[name]["W3 extra memory"] = f"{memory.extra_mb:+.0f} MB"
        del shared

        byte_compile()
        colds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        cold_repeats = repeats if quick else max(3, repeats)
        for repeat in range(cold_repeats):  # interleaved, as everywhere else
            for name in _rotated(CONTENDERS, repeat, cold_repeats):
                colds[name].append(cold_start(name))
        for name in CONTENDERS:
            rows[name]["W4a cold start (ms)"] = f"{statistics.median(colds[name]) * 1000:.0f}"
            warm = statistics.median(timed(lambda n=name: run(n, peers, abs, [1, 2, 3, 4]))
                                     for _ in range(repeats if quick else WARM_REPEATS))
            rows[name]["W4b warm 4 items (ms)"] = f"{warm * 1000:.1f}"

        n_stream = 10_000 if quick else 1_000_000
        expected = sum(i * i for i in range(n_stream))
        streams = {name: partial(lambda n: _check(stream(n, peers, n_stream), expected), name)
                   for name in CONTENDERS}
        extra_mb = {}
        for name, action in streams.items():
            with PeakMemory() as memory:
                action()
            extra_mb[name] = memory.extra_mb
        # Timed apart, as W3 (the sampler takes the GIL from the caller), and interleaved.
        _, ratios = median_ratios(CONTENDERS, streams,
                                  lambda: sum(trivial(i) for i in range(n_stream)), repeats)
        for name, ratio in ratios.items():
            rows[name]["W5 stream 1M generator (x serial)"] = f"{ratio:.1f}x"
            rows[name]["W5 extra memory"] = f"{extra_mb[name]:+.0f} MB"

        images = [numpy.full((1 if quick else 25) * 2**20 // 8, float(i)) for i in range(16)]
        serial, ratios = median_ratios(
            CONTENDERS, {n: lambda n=n: run(n, peers, doubled, images) for n in CONTENDERS},
            lambda: [doubled(image) for image in images], repeats)
        for name, ratio in ratios.items():
            rows[name]["W6 big items and results (x serial)"] = f"{ratio:.1f}x"
    finally:
        peers.close()

    print_table("contender", rows)
    if options.plot:
        plot(rows, options.plot, f"{platform.python_implementation()} "
             f"{platform.python_version()}, {n_workers} CPUs")


def _counts(text: str) -> list[int]:
    """``--workers``' value: worker counts, comma-separated."""
    return sorted({int(count) for count in text.split(",")})


def print_table(first: str, rows: dict[str, dict[str, str]]) -> None:
    """Print rows of figures as a Markdown table, one column per figure."""
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    print(f"| {first} | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row.get(c, "-") for c in columns) + " |")


if __name__ == "__main__":
    main()
