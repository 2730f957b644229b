"""The hook specifications a parfor plugin implements, and the markers for both sides."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backend import Backend

hookspec = pluggy.HookspecMarker("parfor")
"""Marks the hook specifications below."""
hookimpl = pluggy.HookimplMarker("parfor")
"""Marks a plugin's hook implementations: ``@hookimpl def parfor_register_backends(): ...``."""


@hookspec
def parfor_register_backends() -> list[type[Backend]]:
    """Return the Backend classes this plugin provides.

    Called whenever parfor looks its backends up (each call that picks one, and the listing),
    never at import. Return classes, not instances: parfor makes an instance only when the
    backend is used, so this must stay cheap.
    """
