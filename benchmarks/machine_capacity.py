"""How much CPU this machine gives N busy processes: the ceiling of any parallel speedup here.

Usage (Linux and macOS: it forks):
    python benchmarks/machine_capacity.py              # 1, 2, 4, ... up to every CPU
    python benchmarks/machine_capacity.py 8,16 --items 10

N processes are forked, released at once, and each runs the same number of W2's items, with no
pool and nothing sent anywhere (the benchmark's `fixed_shares`). "Cores' worth" is N times the
time one process alone takes, divided by the time the N take together. The CPU time each
process used tells why: more than one process alone used means the cores themselves slowed as
more were busy (CPUs shared with other guests of the host, or a lower clock); the same CPU
time in more wall time means the processes waited for a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_backends import cpu_bound, fixed_shares

WORK = 600_000  # W2's item
REPEATS = 3


def busy(count: int, items_each: int) -> list[tuple[float, list[float]]]:
    """For each repeat: the seconds ``count`` processes took, and each one's CPU seconds."""
    items = list(range(count * items_each))
    runs = [fixed_shares(count, cpu_bound, items, WORK) for _ in range(REPEATS)]
    return [(float(run), run.cpu) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="?", help="numbers of busy processes, comma-separated")
    parser.add_argument("--items", type=int, default=4, help="items per process (default: 4)")
    options = parser.parse_args()
    cpus = os.cpu_count() or 1
    counts = ([int(count) for count in options.counts.split(",")] if options.counts else
              sorted({min(2**k, cpus) for k in range(cpus.bit_length() + 1)}))
    alone = statistics.median(seconds for seconds, _ in busy(1, options.items))
    print(f"# {cpus} CPUs; one process alone: {alone:.3f} s for {options.items} items")
    print("| busy processes | cores' worth | share of them | CPU time per process, x alone |")
    print("|---|---|---|---|")
    for count in counts:
        runs = busy(count, options.items)
        elapsed = statistics.median(seconds for seconds, _ in runs)
        cpu = statistics.median(used for _, each in runs for used in each)
        print(f"| {count} | {count * alone / elapsed:.2f} | {100 * alone / elapsed:.0f}% "
              f"| {cpu / alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
