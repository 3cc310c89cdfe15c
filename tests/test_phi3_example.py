"""The out-of-tree model example (examples/weavelm-model-phi3): its own test suite (weavelm's model contract on a
tiny random Phi-3: transformers parity, two tensor-parallel ranks, LoRA against peft, n-gram speculation) passes,
run as its author runs it (`python -m pytest` in its folder, against the installed distribution)."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "weavelm-model-phi3")


@pytest.mark.slow
def test_example_suite_passes_in_its_folder():
    try:
        md.distribution("weavelm-model-phi3")
    except md.PackageNotFoundError:
        pytest.skip("weavelm-model-phi3 is not installed (pip install --no-deps ./examples/weavelm-model-phi3)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=EXAMPLE, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout and "error" not in out.stdout


def test_phi3_is_registered_through_its_entry_point():
    """Installed, the example's architecture serves `Phi3ForCausalLM` like a built-in."""
    try:
        md.distribution("weavelm-model-phi3")
    except md.PackageNotFoundError:
        pytest.skip("weavelm-model-phi3 is not installed")
    from weavelm.core.registry import Registry

    cls = Registry.load().find_model("Phi3ForCausalLM")
    assert cls.name == "phi3" and cls.__module__ == "weavelm_model_phi3.model"
