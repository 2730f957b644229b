"""How much CPU this machine gives N busy processes: the ceiling of any parallel speedup here.

Usage (Linux and macOS: it forks):
    python benchmarks/machine_capacity.py              # 1, 2, 4, ... up to every CPU
    python benchmarks/machine_capacity.py 8,16 --items 10

N processes are forked, released at once, and each runs the same items of W2's work, with no
pool and nothing sent anywhere. "Cores' worth" is N times the time one process alone takes,
divided by the time the N take together. Each process also reports the CPU time it used: more
than one process alone used means the cores themselves slowed as more were busy (CPUs shared
with other guests of the host, or a lower clock), where less wall time than CPU time means the
processes waited for a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_backends import cpu_bound

WORK = 600_000  # W2's item
REPEATS = 3


def busy(count: int, items: int) -> tuple[float, list[float]]:
    """Seconds for ``count`` processes to run ``items`` items each, and each one's CPU seconds."""
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(go_write)  # so that a parent that dies before the start ends the wait
            if not os.read(go_read, 1):
                os._exit(1)
            start = time.process_time()
            for item in range(items):
                cpu_bound(item, WORK)
            os.write(report_write, f"{time.process_time() - start}\n".encode())
            os._exit(0)
        children.append(pid)
    start = time.perf_counter()
    os.write(go_write, b"x" * count)
    for pid in children:
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    for fd in (go_read, go_write, report_write):
        os.close(fd)
    with os.fdopen(report_read) as reports:
        return elapsed, [float(line) for line in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="?", help="numbers of busy processes, comma-separated")
    parser.add_argument("--items", type=int, default=4, help="items per process (default: 4)")
    options = parser.parse_args()
    cpus = os.cpu_count() or 1
    counts = ([int(count) for count in options.counts.split(",")] if options.counts else
              sorted({min(2**k, cpus) for k in range(cpus.bit_length() + 1)}))
    alone = statistics.median(busy(1, options.items)[0] for _ in range(REPEATS))
    print(f"# {cpus} CPUs; one process alone: {alone:.3f} s for {options.items} items")
    print("| busy processes | cores' worth | share of them | CPU time per process, x alone |")
    print("|---|---|---|---|")
    for count in counts:
        runs = [busy(count, options.items) for _ in range(REPEATS)]
        elapsed = statistics.median(seconds for seconds, _ in runs)
        cpu = statistics.median(used for _, each in runs for used in each)
        print(f"| {count} | {count * alone / elapsed:.2f} | {100 * alone / elapsed:.0f}% "
              f"| {cpu / alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
