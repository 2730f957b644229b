"""The installed distributions' entry points and versions, read straight from their metadata.

What ``importlib.metadata``'s ``entry_points(group=...)`` and ``version(name)`` find, without
importing it: that import alone (email, zipfile, csv, pathlib) costs about 20 ms, more than a
short parallel call. Distributions are looked for on ``sys.path`` in order, and the first of
a name wins, as importlib.metadata does; metadata inside zip files is not read (pip never
installs it there).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from importlib import import_module
from typing import Any, NamedTuple


class EntryPoint(NamedTuple):
    """One ``name = module:attribute`` line of a distribution's entry_points.txt."""

    name: str
    value: str
    dist_name: str
    dist_version: str

    def load(self) -> Any:
        """Import the module and return the attribute it names (the module itself if none)."""
        module, _, attribute = self.value.partition(":")
        found = import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            found = getattr(found, part)
        return found


def entry_points(group: str) -> list[EntryPoint]:
    """Every entry point of ``group``, one distribution of each name."""
    found: list[EntryPoint] = []
    for folder, kind, dist, version in _distributions():
        lines = _read_group(os.path.join(folder, "entry_points.txt"), group)
        if lines:
            dist, version = _name_and_version(_metadata_file(folder, kind), dist, version)
            found += [EntryPoint(key, value, dist, version) for key, value in lines]
    return found


def installed_version(name: str) -> str | None:
    """The version of the installed distribution ``name``, None if there is none."""
    wanted = _normalized(name)
    for folder, kind, dist, version in _distributions():
        if _normalized(dist) == wanted:
            return _name_and_version(_metadata_file(folder, kind), dist, version)[1]
    return None


def _distributions() -> Iterator[tuple[str, str, str, str]]:
    """``(metadata folder, kind, name, version)`` of each installed distribution, the first
    one on ``sys.path`` of each name; name and version as the folder's name spells them."""
    seen: set[str] = set()
    for folder in sys.path:
        try:
            names = sorted(os.listdir(folder or "."))
        except OSError:  # missing, a file, a zip: nothing installed there for us
            continue
        for name in names:
            stem, dot, kind = name.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            dist, _, version = stem.partition("-")
            key = _normalized(dist)
            if key not in seen:
                seen.add(key)
                yield os.path.join(folder or ".", name), kind, dist, version.partition("-")[0]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _metadata_file(folder: str, kind: str) -> str:
    return os.path.join(folder, "METADATA" if kind == "dist-info" else "PKG-INFO")


def _read_group(path: str, group: str) -> list[tuple[str, str]]:
    """The ``(name, value)`` lines of ``group`` in one entry_points.txt (an INI file)."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    found, inside = [], False
    for line in map(str.strip, lines):
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            inside = line == f"[{group}]"
        elif inside and "=" in line:
            name, _, value = line.partition("=")
            value = value.partition("[")[0].strip()  # "module:attr [extra]": the extra is no part
            found.append((name.strip(), value))
    return found


def _name_and_version(path: str, name: str, version: str) -> tuple[str, str]:
    """The distribution's own spelling of its name, and its version, from its metadata's
    headers; what the folder's name says where they cannot be read."""
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                if not line.strip():  # the headers end at the first empty line
                    break
                key, _, value = line.partition(":")
                if key == "Name":
                    name = value.strip()
                elif key == "Version":
                    version = value.strip()
    except OSError:
        pass
    return name, version or "unknown version"
