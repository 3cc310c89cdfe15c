"""int4 weight-only checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized W4A16): picked by `quantization: auto`
from config.json's `quantization_config`, kept 4-bit, and equal to transformers running the exactly dequantized
weights (tests/int4_fixtures.py writes the checkpoints); the Triton int4 GEMM against the torch reference (triton's
interpreter on the CPU, the real kernel under `gpu`); corrupt checkpoints refused with a LoadError naming the field
or tensor.

Bounds: the engine's first-step logits against transformers' on the dequantized fp32 weights within 1e-4 absolute
(the native block kernels compute d * q + m in fp32, the reference (q - z) * s: rounding order only; measured ~1e-5),
and the same greedy tokens.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

from tests.int4_fixtures import float_model, write_checkpoint
from weavelm.errors import LoadError
from weavelm.ops import native
from weavelm.plugins.models.native_stack import NativeStack

def _triton_interpretable() -> bool:
    """Without CUDA: import triton under TRITON_INTERPRET=1 unless something imported it already (triton.language
    builds its own functions for the interpreter only then); True when the interpreter can run the kernels."""
    if torch.cuda.is_available():
        return False
    if "triton" not in sys.modules:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            importlib.import_module("triton")
        except ImportError:
            return False
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET")
            else:
                os.environ["TRITON_INTERPRET"] = old
    return type(sys.modules["triton.language"].sum).__name__ == "InterpretedFunction"


INTERPRETABLE = _triton_interpretable()
MODULES = ("weavelm.plugins.quantization.gptq", "weavelm.plugins.quantization.awq",
           "weavelm.plugins.quantization.compressed_tensors_w4a16")
PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 1, 300, 12], [400, 2, 9]]
STEPS = 6
CASES = {"gptq": dict(fmt="gptq"), "gptq_desc_act_sym": dict(fmt="gptq", desc_act=True, sym=True),
         "awq": dict(fmt="awq"), "ct_w4a16": dict(fmt="ct"), "ct_w4a16_sym": dict(fmt="ct", sym=True),
         "ct_w4a16_actorder": dict(fmt="ct", desc_act=True)}


def registry():
    from weavelm.core.registry import Registry

    reg = Registry.load()
    for module in MODULES:
        reg.register_module(module)
    return reg


def engine(path: str, **kw):
    from weavelm import LLM

    return LLM(model=path, device="cpu", dtype="float32", cache={"num_blocks": 32}, registry=registry(), **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    return root, float_model()


class Checkpoints(dict):
    """case -> (path, dequantized state dict), each written on first use (compressed-tensors ones need the
    library: skipped without it)."""

    def __init__(self, root, model):
        super().__init__()
        self.root, self.model = root, model

    def __missing__(self, case: str):
        kw = CASES[case]
        if kw["fmt"] == "ct":
            pytest.importorskip("compressed_tensors")
        path = str(self.root / case)
        self[case] = (path, write_checkpoint(model=self.model, path=path, **kw))
        return self[case]


@pytest.fixture(scope="module")
def checkpoints(base):
    return Checkpoints(*base)


def reference(model, dense: dict) -> tuple[list[list[int]], torch.Tensor]:
    """transformers on the dequantized weights: greedy tokens per prompt and the first prompt's first logits."""
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(model.config).float().eval()
    ref.load_state_dict(dense)
    tokens = []
    with torch.no_grad():
        first = ref(torch.tensor([PROMPTS[0]])).logits[0, -1]
        for p in PROMPTS:
            out = ref.generate(torch.tensor([p]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                               pad_token_id=0, min_new_tokens=STEPS)
            tokens.append(out[0, len(p):].tolist())
    return tokens, first


def run(llm) -> tuple[list[list[int]], torch.Tensor]:
    from weavelm import SamplingParams

    captured = []
    llm.collective_rpc("set_logits_hook", (lambda ids, logits: captured.append(logits.clone()) or None,))
    outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=1, temperature=0))
    first = captured[0][0]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs], first


def layers(llm) -> dict:
    return dict(llm.collective_rpc("apply_model", (lambda model: model,))[0].named_modules())


@pytest.mark.parametrize("case", list(CASES))
def test_int4_checkpoint_matches_transformers_on_dequantized_weights(case, base, checkpoints):
    path, dense = checkpoints[case]
    llm = engine(path)
    mods = layers(llm)
    qkv, down = mods["layers.0.self_attn.qkv_proj"], mods["layers.1.mlp.down_proj"]
    scheme = CASES[case]["fmt"].replace("ct", "ct-w4a16")
    assert qkv.weight is None and qkv.quant_method.kind.startswith(scheme), qkv.quant_method.kind
    assert down.qpack.nbytes() < HIDDEN_X_INTER_FP32 / 4  # under a byte per weight: no dense copy kept
    if native.available():  # layers without an act-order gather hand their blocks to the native decoder stack
        model = llm.collective_rpc("apply_model", (lambda m: m,))[0]
        assert (NativeStack.build(model) is not None) == (not CASES[case].get("desc_act", False))
    tokens, first = run(llm)
    ref_tokens, ref_first = reference(base[1], dense)
    torch.testing.assert_close(first, ref_first, rtol=0, atol=1e-4)
    assert tokens == ref_tokens


HIDDEN_X_INTER_FP32 = 128 * 256 * 4


def test_the_kernel_paths_agree_with_the_dequantized_weight():
    """Int4Weight's CPU paths (native fp32 blocks, torch's bf16 int4 kernel, each also with an act-order gather)
    against x @ dequantize().T, with group 64 and one group (-1 -> K); and the dequantize-per-call fallback with
    a group no 32-element block fits."""
    from weavelm.ops.int4_kernels import TORCH_INT4_OP, Int4Linear, Int4Weight, int4_linear

    g = torch.Generator().manual_seed(3)
    for k, group in ((256, 64), (96, 96)):
        codes = torch.randint(0, 16, (k, 48), generator=g)
        scales, zeros = torch.rand(k // group, 48, generator=g) * 0.1, torch.randint(0, 16, (k // group, 48),
                                                                                       generator=g).float()
        for perm in (None, torch.randperm(k, generator=g)):
            w = Int4Weight.from_codes(codes, scales, zeros, group, perm)
            x = torch.randn(5, k, generator=g)
            ref = x @ w.dequantize().t()
            for dtype in (torch.float32, torch.bfloat16):
                packed = Int4Linear.prepare(w, torch.device("cpu"), dtype)
                if dtype == torch.float32:
                    assert packed.kernel == ("int4-native-blocks" if native.available() else "int4-dequant-per-call")
                else:
                    assert packed.kernel == ("int4-torch-bf16" if hasattr(torch.ops.aten, TORCH_INT4_OP)
                                             else "int4-dequant-per-call")
                y = int4_linear(packed, x.to(dtype), None).float()
                tol = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
                torch.testing.assert_close(y, ref, rtol=0, atol=tol)
    w = Int4Weight.from_codes(torch.randint(0, 16, (80, 16), generator=g), torch.rand(2, 16, generator=g),
                              torch.full((2, 16), 8.0), 40)
    packed = Int4Linear.prepare(w, torch.device("cpu"), torch.float32)
    assert packed.kernel == "int4-dequant-per-call"
    x = torch.randn(3, 80, generator=g)
    torch.testing.assert_close(int4_linear(packed, x, None), x @ w.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def triton_interpreted():
    if not INTERPRETABLE:
        pytest.skip("CUDA present (test_gpu_* run the compiled kernels), or triton was imported without "
                    "TRITON_INTERPRET=1 earlier in this process: run this module alone")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module("weavelm.ops.triton_int_gemm")
    if type(mod._int4_gemm_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    yield mod
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


# (rows, K, N, group, split_k): decode with a ragged N, a split K, one group, prefill-sized tiles, and a group no
# power-of-two tile divides (scales read per feature)
TRITON_SHAPES = [(1, 128, 72, 32, 1), (5, 256, 64, 64, 3), (20, 96, 40, 96, 2), (70, 64, 136, 32, 1),
                 (3, 80, 48, 40, 1)]


TRITON_CASES = [(s, torch.float32) for s in TRITON_SHAPES] + [(TRITON_SHAPES[1], torch.float16),
                                                                (TRITON_SHAPES[3], torch.float16)]


@pytest.mark.parametrize("shape,dtype", TRITON_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple)
                         else str(c).removeprefix("torch."))
def test_triton_int4_and_int8_gemms_match_the_torch_reference(shape, dtype, triton_interpreted):
    """fp32: the same sums up to order (1e-4); fp16 (activations, weight tiles and output rounded to fp16, fp32
    accumulation, as on the GPU): within 1% of the output's max."""
    from weavelm.ops.int4_kernels import Int4Weight

    m, k, n, group, split = shape
    g = torch.Generator().manual_seed(m)
    w = Int4Weight.from_codes(torch.randint(0, 16, (k, n), generator=g), torch.rand(k // group, n, generator=g) * 0.1,
                              torch.randint(0, 16, (k // group, n), generator=g).float(), group)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02
    ref, ref8 = x @ w.dequantize().t(), x @ (q.float() * scale[:, None]).t()
    wd = w.to("cpu", dtype)
    y = triton_interpreted.int4_gemm(x.to(dtype), wd.qweight, wd.scales, wd.zeros, group, split_k=split)
    y8 = triton_interpreted.int8_gemm(x.to(dtype), q, scale.to(dtype), split_k=split)
    assert y.dtype == y8.dtype == dtype
    dense = triton_interpreted.int4_dequantize(wd.qweight, wd.scales, wd.zeros, group, dtype)
    torch.testing.assert_close(dense, wd.dequantize().t().to(dtype), rtol=0, atol=0)  # the same fp32 formula
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y8, ref8, rtol=1e-5, atol=1e-4)
    else:
        assert (y.float() - ref).abs().max() <= 0.01 * ref.abs().max()
        assert (y8.float() - ref8).abs().max() <= 0.01 * ref8.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 200, 300])
def test_gpu_int4_and_int8_kernels_match_cpu_reference(m, dtype):
    """Parity of the CUDA kernels with the fp32 CPU reference: within 1% of the output's max (fp16/bf16 weights
    tiles and activations, fp32 accumulation). m=300 takes the dequantize + cuBLAS path."""
    from weavelm.ops.int4_kernels import Int4Weight
    from weavelm.ops.triton_int_gemm import int8_gemm

    k, n, group = 4096, 1536, 128
    g = torch.Generator().manual_seed(0)
    w = Int4Weight.from_codes(torch.randint(0, 16, (k, n), generator=g), torch.rand(k // group, n, generator=g) * 0.01,
                              torch.randint(0, 16, (k // group, n), generator=g).float(), group)
    x = torch.randn(m, k, generator=g)
    ref = x @ w.dequantize().t()
    y = w.to("cuda", dtype).mm(x.to("cuda", dtype)).float().cpu()
    assert (y - ref).abs().max() <= 0.01 * ref.abs().max()
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.001
    ref8 = x @ (q.float() * scale[:, None]).t()
    y8 = int8_gemm(x.to("cuda", dtype), q.cuda(), scale.to("cuda", dtype)).float().cpu()
    assert (y8 - ref8).abs().max() <= 0.01 * ref8.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["gptq_desc_act_sym", "awq", "ct_w4a16"])
def test_gpu_int4_checkpoint_greedy_matches_cpu(case, checkpoints):
    """The same checkpoint on CUDA (fp16 activations, Triton int4 GEMM) against the CPU fp32 engine: first-step
    logits within 2% of their max, and the engine reports the Triton kernel."""
    from weavelm import LLM

    path, _ = checkpoints[case]
    gpu = LLM(model=path, device="cuda", dtype="float16", registry=registry())
    assert layers(gpu)["layers.0.mlp.down_proj"].quant_method.kind.endswith("int4-triton")
    _, first_gpu = run(gpu)
    _, first_cpu = run(engine(path))
    assert (first_gpu.float().cpu() - first_cpu).abs().max() <= 0.02 * first_cpu.abs().max()


def _mutate(src: str, dst: str, tensors=None, quant=None) -> str:
    """A copy of checkpoint `src` at `dst` with `tensors(dict) -> dict` and `quant(dict) -> dict` applied."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file(tensors(state) if tensors else state, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if quant:
        cfg["quantization_config"] = quant(cfg["quantization_config"])
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def _drop(name):
    return lambda state: {k: v for k, v in state.items() if k != name}


def _replace(name, fn):
    return lambda state: {**state, name: fn(state[name]).contiguous()}


CORRUPT = {
    "gptq_bits_3": ("gptq", dict(quant=lambda q: {**q, "bits": 3}), r"quantization_config\.bits: 3"),
    "gptq_missing_g_idx": ("gptq_desc_act_sym", dict(tensors=_drop("model.layers.1.self_attn.v_proj.g_idx")),
                           r"layers\.1\.self_attn\.(qkv|v)_proj\.g_idx"),
    "gptq_scales_shape": ("gptq", dict(tensors=_replace("model.layers.0.mlp.up_proj.scales", lambda t: t[:2])),
                          r"model\.layers\.0\.mlp\.up_proj\.scales' has shape \(2, 256\).*expects \(4, 256\)"),
    "gptq_bad_g_idx": ("gptq_desc_act_sym", dict(tensors=_replace("model.layers.0.mlp.down_proj.g_idx",
                                                                  lambda t: torch.zeros_like(t))),
                       r"layers\.0\.mlp\.down_proj\.g_idx: every group must hold exactly 32"),
    "gptq_qweight_dtype": ("gptq", dict(tensors=_replace("model.layers.0.self_attn.o_proj.qweight",
                                                         lambda t: t.float())),
                           r"o_proj\.qweight' has dtype (torch\.)?float32"),
    "awq_version_gemv": ("awq", dict(quant=lambda q: {**q, "version": "gemv"}), r"quantization_config\.version"),
    "awq_qzeros_shape": ("awq", dict(tensors=_replace("model.layers.0.self_attn.k_proj.qzeros",
                                                      lambda t: t[:, :4])), r"k_proj\.qzeros' has shape \(4, 4\)"),
    "ct_bits_3": ("ct_w4a16", dict(quant=lambda q: {**q, "config_groups": {"group_0": {
        **q["config_groups"]["group_0"], "weights": {**q["config_groups"]["group_0"]["weights"], "num_bits": 3}}}}),
                  r"num_bits: 3"),
    "ct_scale_shape": ("ct_w4a16", dict(tensors=_replace("model.layers.1.mlp.gate_proj.weight_scale",
                                                         lambda t: t[:, :1])),
                       r"gate_proj\.weight_scale' has shape \(256, 1\)"),
}


@pytest.mark.parametrize("corruption", list(CORRUPT))
def test_corrupt_int4_checkpoint_is_a_load_error_naming_it(corruption, checkpoints, tmp_path):
    case, edits, message = CORRUPT[corruption]
    path = _mutate(checkpoints[case][0], str(tmp_path / corruption), **edits)
    with pytest.raises(LoadError, match=message):
        engine(path)


def test_naming_an_int4_scheme_for_another_checkpoint_is_a_config_error(checkpoints):
    from weavelm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"quantization.name: 'gptq' needs a GPTQ checkpoint"):
        engine(checkpoints["awq"][0], quantization="gptq")
    with pytest.raises(ConfigError, match=r"quantization.name: 'awq' needs an AWQ checkpoint"):
        engine(checkpoints["gptq"][0], quantization="awq")
