"""What ships beside the code: the license pyproject names, a Makefile that passes flags, and a
Dockerfile that installs what the Makefile installs (the CPU torch, the default models' packages)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name} :?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert m, name
    return m.group(1).strip()


def test_license_is_the_one_pyproject_names():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def test_dockerfile_installs_what_the_makefile_does_and_downloads_nothing_at_run_time():
    docker = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in docker
    for pkg in _makefile_var("MODEL_PKGS").split():
        assert pkg in docker, pkg
    assert "HF_HUB_OFFLINE=1" in docker
    compose = (ROOT / "compose.yaml").read_text()
    assert "build: ." in compose and "/health" in compose


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_serve_passes_args():
    out = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "serve", "ARGS=--port 9000 --api-key k1"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert ".venv/bin/ember serve --port 9000 --api-key k1" in out
