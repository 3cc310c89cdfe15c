"""The out-of-tree attention example (examples/weavelm-attention-sdpa): its own test suite passes, run as its author
runs it (`python -m pytest` in its folder, against the installed distribution). The main attention contract also
covers it (`tests/test_attention_backends.py::TestContract_sdpa`) once installed, through its entry point."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "weavelm-attention-sdpa")


@pytest.mark.slow
def test_example_suite_passes_in_its_folder():
    try:
        md.distribution("weavelm-attention-sdpa")
    except md.PackageNotFoundError:
        pytest.skip("weavelm-attention-sdpa is not installed (pip install --no-deps ./examples/weavelm-attention-sdpa)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=EXAMPLE, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout and "error" not in out.stdout
