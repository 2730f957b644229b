"""The conformance suite that plugin authors use, run on every registered backend."""

from __future__ import annotations

from conftest import BACKENDS

from parfor_core.testing import BackendConformance

for _name in BACKENDS:
    _class = f"TestConformance_{_name.replace('-', '_')}"
    globals()[_class] = type(_class, (BackendConformance,), {"backend": _name})
