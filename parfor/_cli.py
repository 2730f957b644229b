"""What the command line does: the backend listing and the demo run."""

from __future__ import annotations

from time import perf_counter
from typing import TextIO

from parfor_core import SETTINGS, BackendUnavailableError, available_cpus, pmap, registry
from parfor_core._arguments import settings_for
from parfor_core._config import current, project_config_path, user_config_path


def list_backends(out: TextIO) -> int:
    """Print every backend, its source, whether it runs here, and the one a plain call uses:
    the configured one, else the automatic choice."""
    infos = registry.infos()
    if not infos:
        out.write(f"No backend is loaded: {registry.why_none()}.\n")
        return 1
    settings = current()
    name = settings["backend"]
    if name is not None:
        cls = registry.get_class(name, settings.source("backend"))  # one that exists
        if cls.unavailable_reason() is not None:
            raise BackendUnavailableError(name, cls.unavailable_reason() or "")
        footer = (f"A plain pmap here uses {name!r}, as set by {settings.source('backend')}, "
                  f"for every input; it runs serially only inside a worker (nested calls).")
    else:
        choice = registry.auto()
        name = choice.name
        footer = (f"A plain pmap here uses {name!r}: {choice.reason}.\n"
                  f"It runs serially instead for inputs of fewer than 2 items, with "
                  f"n_processes=1, and inside a worker (nested calls); and it starts in the "
                  f"caller, staying there while items are too quick for workers to pay.")
    width = max(len(info.name) for info in infos)
    for info in infos:
        status = "available" if info.unavailable_reason is None else (
            f"unavailable: {info.unavailable_reason}")
        auto = "never chosen automatically" if info.auto_priority is None else (
            f"automatic priority {info.auto_priority}")
        marker = "*" if info.name == name else " "
        out.write(f"{marker} {info.name:<{width}}  {status}; {auto}; from {info.source}\n")
    out.write(f"\n{footer} {available_cpus()} CPUs are available.\n")
    return 0


def show_config(out: TextIO) -> int:
    """Print every setting's effective value and where it came from."""
    settings = current()
    width = max(map(len, SETTINGS))
    for name, setting in SETTINGS.items():
        value = settings[name]
        shown = "(automatic)" if value is None else repr(value)
        out.write(f"{name:<{width}}  {shown}  <- {settings.source(name)}\n"
                  f"{'':<{width}}  {setting.help}; environment: {setting.env or 'none'}\n")
    project = project_config_path()
    out.write(f"\nUser file: {user_config_path()}\n"
              f"Project file: {project or 'none found'} ([tool.parfor] in the nearest "
              "pyproject.toml, or a parfor.toml, from the working directory up)\n")
    return 0


def burn(seed: int, work: int) -> int:
    """A pure-Python CPU-bound item: a small linear congruential generator."""
    x = seed
    for _ in range(work):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


def demo(out: TextIO, items: int, work: int, backend: str | None,
         n_processes: int | None) -> int:
    """Run the same loop serially and in parallel, check the results agree, print the speedup.

    The parallel time includes starting the workers, as a user's first call would.
    """
    import tqdm.auto  # noqa: F401 - imported before timing, so neither run pays for it

    selected = registry.select(backend, serial=None, total=items,
                               settings=settings_for(backend, n_processes, None))
    start = perf_counter()
    expected = pmap(burn, range(items), (work,), serial=True, desc="serial  ")
    serial_seconds = perf_counter() - start
    with registry.lease(selected) as chosen:
        start = perf_counter()
        results = pmap(burn, range(items), (work,), backend=chosen, desc="parallel")
        parallel_seconds = perf_counter() - start
    if results != expected:
        out.write("The parallel results differ from the serial ones: this is a bug.\n")
        return 1
    out.write(f"{items} items on backend {chosen.name!r} with {chosen.n_workers} "
              f"workers: serial {serial_seconds:.2f} s, parallel {parallel_seconds:.2f} s, "
              f"speedup {serial_seconds / parallel_seconds:.2f}x\n")
    return 0
