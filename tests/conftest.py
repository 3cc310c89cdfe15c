import os

import pytest

from tests.model_fixtures import ARCHS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny llama / qwen2 / qwen3 models saved by transformers (safetensors, fp32)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {a: build_tiny_model(a, str(root / a), seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]
