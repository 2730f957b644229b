"""parfor's command line: list the backends, or run a demonstration loop."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parfor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("backends", help="list every backend, whether it runs here, "
                                         "and which one a plain pmap would use")
    commands.add_parser("config", help="show the effective settings and where each comes from")
    demo = commands.add_parser("demo", help="run a CPU-bound loop serially and in parallel, "
                                            "and print the speedup")
    demo.add_argument("--items", type=_at_least(2), default=32,
                      help="number of items, at least 2 (default 32)")
    demo.add_argument("--work", type=_at_least(1), default=1_000_000,
                      help="loop iterations per item (default 1000000)")
    demo.add_argument("--backend", default=None, help="backend name (default: automatic)")
    demo.add_argument("--n-processes", type=_at_least(1), default=None,
                      help="number of workers (default: every CPU)")
    options = parser.parse_args(argv)
    from parfor_core import ParforError

    from ._cli import demo, list_backends, show_config

    try:
        if options.command == "backends":
            return list_backends(sys.stdout)
        if options.command == "config":
            return show_config(sys.stdout)
        return demo(sys.stdout, options.items, options.work, options.backend,
                    options.n_processes)
    except (ParforError, ValueError) as error:
        parser.exit(2, f"parfor: error: {error}\n")
    except BrokenPipeError:  # the reader left (`parfor config | head`): no traceback for it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit's flush
        return 141  # as a shell reports a program ended by SIGPIPE


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argument type: a whole number of at least ``minimum``, else a message saying so."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be a whole number of at least {minimum}, got {text!r}")
        return value
    return whole_number


if __name__ == "__main__":
    raise SystemExit(main())
