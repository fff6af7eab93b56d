"""benchmarks/gpu.py's path on CPU: --dry-run runs every section on tiny shapes (kernels under Triton's
interpreter, the CUDA graphs' buffers and padding eagerly), so the one prepared GPU run does not fail on
a typo. Its numbers here mean nothing; that the sections run and the checks pass does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember.kernels.triton import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_gpu_benchmark_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "benchmarks/gpu.py", "--dry-run", "--out", str(tmp_path)]
    subprocess.run(
        cmd + ["--only", "kernels", "hf", "decode", "lora"], cwd=ROOT, env=env, check=True, timeout=300
    )
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert {name: s["ok"] for name, s in sections.items()} == {
        n: True for n in ("kernels", "hf", "decode", "lora")
    }
    assert sections["kernels"]["all_pass"]
    assert sections["hf"]["identical_greedy"] == sections["hf"]["prompts"]
    assert {(r["batch"], r["cuda_graphs"]) for r in sections["decode"]["steps"]} == {
        (1, True),
        (3, True),
        (1, False),
        (3, False),
    }
    assert "| decode_attention GQA 8 |" in (tmp_path / "results.md").read_text()
