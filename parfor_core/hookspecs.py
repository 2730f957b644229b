"""The hook specifications a parfor plugin implements, and the markers for both sides."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backend import Backend

hookspec = pluggy.HookspecMarker("parfor")
hookimpl = pluggy.HookimplMarker("parfor")


@hookspec
def parfor_register_backends() -> list[type[Backend]]:
    """Return the Backend classes this plugin provides.

    Called when parfor first needs a backend, never at import. Return classes, not instances:
    parfor makes an instance when the backend is used, so registering costs nothing.
    """
