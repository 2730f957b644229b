"""`import parfor` stays cheap: no plugin discovery and none of the heavy dependencies, nor
the standard library modules that only running a call needs."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
before = set(sys.modules)
import parfor
from parfor_core import registry
lazy = ("dill", "tqdm", "loky", "cloudpickle", "pluggy", "parfor_backends", "pickle",
        "tempfile", "inspect", "dataclasses", "pathlib", "concurrent.futures", "uuid",
        "traceback", "importlib.metadata")
loaded = [m for m in lazy if m in sys.modules and m not in before]
print(json.dumps({"loaded": loaded, "discovered": registry._pm is not None}))
"""


def test_import_loads_nothing_heavy_and_discovers_no_plugins():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == {"loaded": [], "discovered": False}
