"""Settings, and where each comes from. The first that sets one wins:

1. the call's own argument;
2. a ``with parfor.config(...):`` block (scoped with contextvars: other threads and async tasks
   do not see it);
3. an environment variable (``PARFOR_BACKEND``, ``PARFOR_N_PROCESSES``, ...; a backend may
   name variables for its own options, such as ``PARFOR_DASK_ADDRESS``);
4. the project file: ``[tool.parfor]`` in the nearest ``pyproject.toml`` that has it, or a
   ``parfor.toml``, looking from the working directory upwards;
5. the user file: ``config.toml`` in the platform's config folder (``PARFOR_CONFIG`` names
   another);
6. the default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from stat import S_ISREG
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ParforError, warn_once

if TYPE_CHECKING:
    from pathlib import Path


class ConfigError(ParforError, ValueError):
    """A setting has a value parfor cannot use; the message names where it was set."""


class ConfigWarning(UserWarning):
    """A configuration file has a key parfor does not know; it is ignored."""


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ValueError("must be true or false (1/0, yes/no, on/off)")


_WORDS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _whole(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, str):
            value = value.strip()
            if value.removeprefix("-").isascii() and value.removeprefix("-").isdigit():
                value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be a whole number of at least {minimum}")
        return value
    return parse


def _seconds(value: object) -> float:
    seconds = _seconds_or_zero(value)
    if not seconds > 0:
        raise ValueError("must be a number of seconds above 0")
    return seconds


def _seconds_or_zero(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not seconds >= 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return seconds


def _name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a backend name (see `parfor backends`)")
    return value.strip()


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return tuple(value)
    raise ValueError("must be a list of plugin names (or, in the environment, a comma-separated "
                     "string)")


GENERAL_OPTIONS = ("idle_timeout", "retries", "worker_output")


def _tables(value: object) -> dict[str, dict[str, Any]]:
    if not (isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values())):
        raise ValueError("must be a table of tables: [tool.parfor.backends.NAME] with options")
    tables = {str(name): dict(options) for name, options in value.items()}
    for name, options in tables.items():  # a general setting given for one backend: check it
        for key in GENERAL_OPTIONS:
            if key in options:
                try:
                    options[key] = SETTINGS[key].parse(options[key])
                except ValueError as exc:
                    raise ValueError(f"(in backends.{name}: {key} = {options[key]!r} {exc})"
                                     ) from None
    return tables


class Setting(NamedTuple):
    """One setting: how to read it, its environment variable, its default and what it does."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str

    @property
    def env(self) -> str | None:
        """Its environment variable; per-backend tables are set in files and blocks only."""
        return None if self.name == "backends" else f"PARFOR_{self.name.upper()}"


SETTINGS: dict[str, Setting] = {setting.name: setting for setting in [
    Setting("backend", _name, None, "the backend to use; default: chosen automatically"),
    Setting("n_processes", _whole(1), None, "the number of workers; default: every CPU"),
    Setting("bar", _boolean, None, "show a progress bar; default: yes, except in nested calls"),
    Setting("idle_timeout", _seconds, 600.0,
            "seconds a pool without work keeps its worker processes"),
    Setting("retries", _whole(0), 1, "how often an item that killed its worker is run again"),
    Setting("worker_output", _boolean, True, "show what workers print"),
    Setting("share_in_place", _boolean, True,
            "let a large numpy array become the shared memory its workers map, rather than be "
            "copied into it"),
    Setting("keep_shared", _seconds_or_zero, 5.0,
            "seconds a large numpy argument's shared memory is kept after its call, so that "
            "the next call sends the unchanged array without a copy (0: not kept)"),
    Setting("disable_plugins", _names, (), "backend plugins (entry-point names) not to load"),
    Setting("backends", _tables, {}, "options for one backend: [tool.parfor.backends.NAME]"),
]}


class Sourced(NamedTuple):
    value: Any
    source: str


class Configuration:
    """The effective settings, each with where it came from."""

    def __init__(self, values: Mapping[str, Sourced], layers: Sequence[Mapping[str, Sourced]],
                 environment_rank: int) -> None:
        self._values = dict(values)
        self._layers = list(layers)  # lowest rung first
        self._environment_rank = environment_rank  # where the environment's layer is

    def __getitem__(self, name: str) -> Any:
        return self._values[name].value

    def source(self, name: str) -> str:
        return self._values[name].source

    def backend_options(self, name: str, variables: Mapping[str, str] | None = None
                        ) -> dict[str, Any]:
        """The options of one backend: the general ones, then its own table over them.

        ``variables`` maps options to the environment variables that may set them (a backend's
        ``environment``, such as ``PARFOR_DASK_ADDRESS``); they rank with the other variables.
        """
        tables: list[Mapping[str, Mapping[str, Any]]] = []
        for rank, layer in enumerate(self._layers):
            if rank == self._environment_rank:
                tables.append({name: {option: os.environ[variable]
                                      for option, variable in (variables or {}).items()
                                      if os.environ.get(variable)}})
            if "backends" in layer:
                tables.append(layer["backends"].value)
        general = {key: self[key] for key in GENERAL_OPTIONS}
        return {**general, **_merged(tables).get(name, {})}


def _merged(tables: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-backend option tables merged option by option, later ones winning."""
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for backend, options in table.items():
            merged.setdefault(backend, {}).update(options)
    return merged


_block: ContextVar[Mapping[str, Sourced]] = ContextVar("parfor_config",
                                                      default=MappingProxyType({}))


@contextmanager
def config(**settings: Any) -> Iterator[None]:
    """Use these settings for calls made in this block (and blocks nested in it).

    ``with parfor.config(backend="threads", n_processes=4): ...``. Scoped with contextvars:
    other threads and async tasks keep their own settings.
    """
    parsed = {}
    for name, value in settings.items():
        if name not in SETTINGS:
            raise TypeError(f"parfor.config() got an unknown setting {name!r}; known: "
                            f"{', '.join(SETTINGS)}")
        parsed[name] = Sourced(_check(name, value, "parfor.config()"), "a parfor.config() block")
    outer = _block.get()
    if "backends" in parsed and "backends" in outer:  # nested blocks merge option by option
        tables = _merged([outer["backends"].value, parsed["backends"].value])
        parsed["backends"] = Sourced(tables, parsed["backends"].source)
    token = _block.set({**outer, **parsed})
    try:
        yield
    finally:
        _block.reset(token)


def current(**arguments: Any) -> Configuration:
    """The settings for one call: its arguments (those not None) over every other source."""
    merged, layers, environment_rank = _sources()
    given = {name: Sourced(value, "the call's argument")
             for name, value in arguments.items() if value is not None}
    if given:
        merged = dict(merged)
        _merge_into(merged, given)
    return Configuration(merged, [*layers, given], environment_rank)


#: A file's modification time, size and inode: a change of any is a change of the file (the
#: clock that stamps files ticks in milliseconds, and a file rewritten within one tick keeps
#: its time).
Stamp = tuple[int, int, int]
#: The environment variables that the settings depend on: their own, and those that place the
#: user file.
_VARIABLES = (*(setting.env for setting in SETTINGS.values() if setting.env),
              "PARFOR_CONFIG", "XDG_CONFIG_HOME", "APPDATA", "HOME", "USERPROFILE")
#: What every call's settings but its own arguments came from last: the working directory, the
#: block, the variables that name settings or files, each file looked at and its stamp. Read
#: again only when one of them changes: reading costs a short call a visible share.
_last: tuple[tuple[Any, ...], list[tuple[str, Stamp | None]],
             tuple[dict[str, Sourced], list[dict[str, Sourced]], int]] | None = None


def _sources() -> tuple[dict[str, Sourced], list[dict[str, Sourced]], int]:
    """Every source but the call: merged, the layers lowest first, the environment's rank."""
    global _last
    key = (os.getcwd(), _block.get(), *map(os.environ.get, _VARIABLES))
    last = _last
    if last is not None and last[0] == key and all(_stamp(path) == stamp
                                                   for path, stamp in last[1]):
        return last[2]
    looked_at: list[tuple[str, Stamp | None]] = []
    layers = [_defaults(), *_files(looked_at)]
    environment_rank = len(layers)
    layers += [_environment(), dict(_block.get())]
    merged: dict[str, Sourced] = {}
    for layer in layers:
        _merge_into(merged, layer)
    _last = (key, looked_at, (merged, layers, environment_rank))
    return merged, layers, environment_rank


def _merge_into(merged: dict[str, Sourced], layer: Mapping[str, Sourced]) -> None:
    """Lay ``layer`` over ``merged``: a setting it has wins, per backend option by option."""
    for name, sourced in layer.items():
        if name == "backends" and name in merged:
            sourced = Sourced(_merged([merged[name].value, sourced.value]), sourced.source)
        merged[name] = sourced


def _defaults() -> dict[str, Sourced]:
    return {name: Sourced(setting.default, "the default") for name, setting in SETTINGS.items()}


def _check(name: str, value: object, where: str) -> Any:
    try:
        return SETTINGS[name].parse(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {name} = {value!r} {exc}") from None


def _environment() -> dict[str, Sourced]:
    found = {}
    for name, setting in SETTINGS.items():
        text = os.environ.get(setting.env) if setting.env else None
        if text:  # set to nothing (PARFOR_BACKEND=): unset, as for the backends' variables
            found[name] = Sourced(_check(name, text, f"environment variable {setting.env}"),
                                  f"environment variable {setting.env}")
    return found


def _files(looked_at: list[tuple[str, Stamp | None]]) -> list[dict[str, Sourced]]:
    """The user file's settings, then the project file's (so that the project's win); each
    file looked for goes into ``looked_at`` with its stamp (None: not there)."""
    layers = []
    for path, table in (_user_file(looked_at), _project_file(looked_at)):
        if path is None:
            continue
        pyproject = os.path.basename(path) == "pyproject.toml"
        where = f"{path} [tool.parfor]" if pyproject else path
        layer = {}
        for name, value in table.items():
            if name not in SETTINGS:
                warn_once(f"{where}: unknown setting {name!r} is ignored; known: "
                          f"{', '.join(SETTINGS)}", ConfigWarning)
                continue
            layer[name] = Sourced(_check(name, value, where), where)
        layers.append(layer)
    return layers


def user_config_path() -> Path:
    """Where the user file is: ``PARFOR_CONFIG``, else the platform's config folder."""
    from pathlib import Path

    return Path(_user_config_file())


def _user_config_file() -> str:
    named = os.environ.get("PARFOR_CONFIG")
    if named:
        return named
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(base, "parfor", "config.toml")


def _user_file(looked_at: list[tuple[str, Stamp | None]]) -> tuple[str | None, dict[str, Any]]:
    path = _user_config_file()
    stamp = _looked_at(path, looked_at)
    if stamp is None:
        if os.environ.get("PARFOR_CONFIG"):
            raise ConfigError(f"PARFOR_CONFIG names {path}, which is not a file")
        return None, {}
    return path, _read(path, stamp)


def project_config_path() -> Path | None:
    """The project file in use: the nearest parfor.toml or pyproject.toml with [tool.parfor]."""
    from pathlib import Path

    path = _project_file([])[0]
    return None if path is None else Path(path)


def _project_file(looked_at: list[tuple[str, Stamp | None]]
                  ) -> tuple[str | None, dict[str, Any]]:
    """Looked for from the working directory up (with plain strings: pathlib's objects cost a
    short call a visible share, and importing pathlib a cold start)."""
    directory = os.getcwd()
    while True:
        own = os.path.join(directory, "parfor.toml")
        stamp = _looked_at(own, looked_at)
        if stamp is not None:
            return own, _read(own, stamp)
        pyproject = os.path.join(directory, "pyproject.toml")
        stamp = _looked_at(pyproject, looked_at)
        if stamp is not None:
            try:
                tool = _read(pyproject, stamp, only_if=_may_set_tool_parfor).get("tool", {})
            except ConfigError as exc:  # perhaps not ours to read: say so, and look further up
                warn_once(f"{exc}; its [tool.parfor], if any, is ignored", ConfigWarning)
            else:
                table = tool.get("parfor") if isinstance(tool, dict) else None
                if table is not None:
                    if not isinstance(table, dict):
                        raise ConfigError(f"{pyproject}: [tool.parfor] must be a table")
                    return pyproject, table
        parent = os.path.dirname(directory)
        if parent == directory:
            return None, {}
        directory = parent


def _may_set_tool_parfor(text: str) -> bool:
    """Whether a pyproject.toml may set ``tool.parfor``: a ``[tool.parfor...]`` or ``[tool]``
    header, or a root key ``tool.`` or ``tool =``. Most set none, and parsing one (importing
    tomllib first) costs more than a short call's work."""
    for line in text.splitlines():
        key = "".join(line.split()).replace('"', "").replace("'", "")
        if key.startswith("["):
            if key.lstrip("[").startswith(("tool.parfor]", "tool.parfor.", "tool]")):
                return True
        elif key.startswith(("tool.", "tool=")):
            return True
    return False


def _looked_at(path: str, looked_at: list[tuple[str, Stamp | None]]) -> Stamp | None:
    """The stamp of ``path``, noted in ``looked_at``: the settings depend on it."""
    stamp = _stamp(path)
    looked_at.append((path, stamp))
    return stamp


def _stamp(path: str) -> Stamp | None:
    """The stamp of the file at ``path``; None where there is none (or something else)."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable, or a name no file can have
        return None
    if not S_ISREG(status.st_mode):
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


_parsed: dict[str, tuple[Stamp, dict[str, Any]]] = {}


def _read(path: str, stamp: Stamp, only_if: Callable[[str], bool] | None = None
          ) -> dict[str, Any]:
    """A TOML file's contents, read again only when its stamp changes; ``{}``, unparsed, where
    ``only_if`` says its text holds nothing of ours."""
    cached = _parsed.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(path, "rb") as file:
            text = file.read().decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 ({exc})") from None
    content = _parse(path, text) if only_if is None or only_if(text) else {}
    _parsed[path] = (stamp, content)
    return content


def _parse(path: str, text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
