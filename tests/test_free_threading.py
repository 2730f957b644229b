"""Free-threaded Python: threads are chosen, and nothing parfor imports turns the GIL back on."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig

FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

PROBE = """
import json, sys
import cloudpickle, dill, loky, pluggy, tqdm, tqdm.auto
import parfor, parfor_core, parfor_core.testing
import parfor_backends.loky, parfor_backends.processes, parfor_backends.serial
import parfor_backends.threads
from parfor import pmap
from parfor_core import registry
assert pmap(abs, range(-50, 50), bar=False) == [abs(x) for x in range(-50, 50)]
is_enabled = getattr(sys, "_is_gil_enabled", None)
print(json.dumps({"gil": None if is_enabled is None else is_enabled(),
                  "auto": registry.auto().name, "reason": registry.auto().reason}))
"""


def test_importing_and_using_parfor_keeps_the_gil_as_the_build_has_it():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    if FREE_THREADED_BUILD:
        assert probe["gil"] is False, "an import re-enabled the GIL"
        assert probe["auto"] == "threads" and "the GIL is disabled" in probe["reason"]
    else:
        assert probe["gil"] in (None, True)
        assert probe["auto"] == "processes" and "the GIL is enabled" in probe["reason"]

