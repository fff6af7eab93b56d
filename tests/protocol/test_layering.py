"""The protocol layer stands alone: importing it (or `ember` itself) loads neither torch nor transformers.

Each check runs in a fresh interpreter, since this one has long since imported both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")


def _loaded_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; what it printed last, as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


_REPORT = f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], **extra}}))"


def test_every_protocol_module_imports_without_torch():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import ember.protocol\n"
        "names = [m.name for m in pkgutil.walk_packages(ember.protocol.__path__, 'ember.protocol.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "extra = {'modules': names}\n" + _REPORT
    )
    got = _loaded_after(code)
    # The walk found the modules that matter, so an empty package cannot pass for a clean one.
    assert {"ember.protocol.requests", "ember.protocol.format", "ember.protocol.tools"} <= set(got["modules"])
    assert got["heavy"] == []


@pytest.mark.parametrize(
    "module", ["ember", "ember.sampling_params", "ember.errors", "ember.outputs", "ember.structured_outputs"]
)
def test_the_request_side_imports_without_torch(module: str):
    got = _loaded_after(f"import json, sys\nimport {module}\nextra = {{}}\n" + _REPORT)
    assert got["heavy"] == []


def test_the_public_names_still_resolve_from_ember():
    code = (
        "import json, sys\n"
        "from ember import SamplingParams, RequestOutput\n"
        "light = [m for m in ('torch',) if m in sys.modules]\n"
        "from ember import LLM, AsyncEngine, EngineConfig, LLMEngine\n"
        "import ember\n"
        "extra = {'light': light, 'all': sorted(ember.__all__), 'llm': LLM.__module__}\n" + _REPORT
    )
    got = _loaded_after(code)
    assert got["light"] == []  # SamplingParams alone stays light
    assert got["llm"] == "ember.llm" and "torch" in got["heavy"]  # the engine loads when asked for
    assert {"LLM", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput"} <= set(got["all"])
