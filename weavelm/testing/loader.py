"""The loader contract: given a checkpoint in its format, a loader yields the Hugging Face-named tensors of the
reference safetensors checkpoint, and an engine using it generates the same greedy tokens; it recognises its own
format, claims no unrelated path, and never runs code from a pickle.

Subclass it in your distribution's tests, naming the loader you registered and converting the suite's reference
checkpoint (a tiny random Llama saved by transformers as safetensors) into your format:

    from weavelm.testing.loader import LoaderContract

    class TestMyLoader(LoaderContract):
        loader = "my_format"                        # registered name, found through your installed entry point

        def make_checkpoint(self, hf_model_dir, tmp_path):
            return my_converter(hf_model_dir, tmp_path / "model.myfmt")   # the path users would pass as `model:`

Without `make_checkpoint` only the format-independent tests run (shape, `detect`, pickle safety). A lossy format
overrides `compare_weights`; a selector that delegates to other loaders (like `auto`) sets `detects = False`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from weavelm.testing._registry import component, names

PROMPTS = ([1, 17, 300, 42, 5, 99, 250, 7, 3, 128, 64, 200], [31, 400, 8], [77, 123, 6, 19, 2, 88, 160])
MAX_TOKENS = 6


@lru_cache(maxsize=1)
def reference_checkpoint() -> str:
    """A tiny random Llama (2 layers, hidden 64, GQA 4/2, vocab 512) saved by transformers as safetensors, once per
    process; removed at exit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tempfile.mkdtemp(prefix="weavelm-loader-contract-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(1234)
    path = os.path.join(root, "llama")
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


def reference_state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(reference_checkpoint(), "model.safetensors"))


def greedy_tokens(model: str, loader: Any) -> list[list[int]]:
    """Greedy tokens of `PROMPTS` from an engine (float32, CPU) reading `model` with `loader` (a name or a
    section dict)."""
    from weavelm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", device="cpu", loader=loader)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@lru_cache(maxsize=1)
def reference_greedy() -> tuple[tuple[int, ...], ...]:
    return tuple(map(tuple, greedy_tokens(reference_checkpoint(), "safetensors")))


class _RunsCode:
    """Unpickling this calls `os.system` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class LoaderContract:
    """The suite; pytest collects it through your `Test...` subclass."""

    loader: ClassVar[str] = ""
    """Registered name of the loader under test."""
    options: ClassVar[dict[str, Any]] = {}
    """Keyword arguments of the loader's `Options`."""
    detects: ClassVar[bool] = True
    """Whether `detect` recognises the checkpoint `make_checkpoint` writes (False for selectors such as `auto`)."""

    def make_checkpoint(self, hf_model_dir: str, tmp_path: Path) -> str:
        """Write the checkpoint in `hf_model_dir` (config.json + model.safetensors) in your format under
        `tmp_path`; return the path a user would give as `model:`."""
        pytest.skip(f"{type(self).__name__} has no make_checkpoint: the format-dependent tests do not run")

    def compare_weights(self, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
        """Assert the loaded tensors equal the reference (default: bit for bit, in the reference dtype)."""
        for name, tensor in ref.items():
            assert got[name].shape == tensor.shape, name
            assert torch.equal(got[name].to(tensor.dtype), tensor), name

    # -- helpers -----------------------------------------------------------------------------------------------
    @property
    def loader_cls(self) -> Any:
        assert self.loader, f"{type(self).__name__} must set `loader` to a registered loader name"
        return component("loader", self.loader)

    def build(self) -> Any:
        """The loader as the engine builds it (`select` among all registered loaders)."""
        cls = self.loader_cls
        candidates = {name: component("loader", name) for name in names("loader")}
        return cls.select(cls.Options(**self.options), candidates)

    @pytest.fixture
    def checkpoint(self, tmp_path) -> str:
        return str(self.make_checkpoint(reference_checkpoint(), tmp_path))

    # -- the contract ------------------------------------------------------------------------------------------
    def test_registered_shape(self):
        cls = self.loader_cls
        assert cls.name == self.loader
        assert cls.description and "\n" not in cls.description
        assert cls.Options.model_config.get("extra") == "forbid"
        with pytest.raises(Exception):
            cls.Options(**self.options, no_such_option=1)

    def test_detect_claims_no_unrelated_path(self, tmp_path):
        cls = self.loader_cls
        assert cls.detect(str(tmp_path / "missing")) is None
        assert cls.detect(str(tmp_path)) is None  # an empty directory is nobody's format
        (tmp_path / "notes.txt").write_text("not a model\n")
        assert cls.detect(str(tmp_path)) is None
        assert cls.detect(str(tmp_path / "notes.txt")) is None

    def test_detects_its_checkpoint(self, checkpoint):
        reason = self.loader_cls.detect(checkpoint)
        if self.detects:
            assert isinstance(reason, str) and reason, f"{self.loader} does not recognise {checkpoint}"
        else:
            assert reason is None

    def test_config_and_weights_equal_safetensors(self, checkpoint):
        from transformers import AutoConfig

        loader = self.build()
        ref_config = AutoConfig.from_pretrained(reference_checkpoint(), trust_remote_code=False)
        config = loader.load_hf_config(checkpoint)
        for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
            assert getattr(config, key) == getattr(ref_config, key), key
        got: dict[str, torch.Tensor] = {}
        for name, tensor in loader.iter_weights(checkpoint):
            assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
            assert name not in got, f"{name} yielded twice"
            got[name] = tensor
        ref = reference_state_dict()
        assert set(got) == set(ref), (sorted(set(got) - set(ref))[:5], sorted(set(ref) - set(got))[:5])
        self.compare_weights(got, ref)

    def test_engine_greedy_equals_safetensors(self, checkpoint):
        section = {"name": self.loader, **self.options} if self.options else self.loader
        assert greedy_tokens(checkpoint, section) == [list(t) for t in reference_greedy()]

    def test_never_runs_pickled_code(self, tmp_path):
        """Whatever the loader makes of a folder of code-running pickles, the code never runs."""
        marker = tmp_path / "ran"
        folder = tmp_path / "model"
        folder.mkdir()
        shutil.copy(os.path.join(reference_checkpoint(), "config.json"), folder)
        payload = {name: _RunsCode(marker) for name in reference_state_dict()}
        for file in ("pytorch_model.bin", "model.pt", "model.pth", "model.pkl"):
            torch.save(payload, folder / file)
        loader = self.build()
        for path in (folder, folder / "pytorch_model.bin"):
            self.loader_cls.detect(str(path))
            try:
                loader.load_hf_config(str(path))
                for _ in loader.iter_weights(str(path)):
                    pass
            except Exception:  # refusing is the right answer; running the payload is not
                pass
            assert not marker.exists(), f"{self.loader} ran code from a pickle in {path}"
