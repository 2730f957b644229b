"""`import parfor` stays cheap: no plugin discovery and none of the heavy dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import parfor
from parfor_core import registry
heavy = [m for m in ("dill", "tqdm", "loky", "parfor_backends") if m in sys.modules]
print(json.dumps({"heavy": heavy, "discovered": registry._pm is not None}))
"""


def test_import_loads_nothing_heavy_and_discovers_no_plugins():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == {"heavy": [], "discovered": False}
