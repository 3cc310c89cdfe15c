"""fp8 weights through `weavelm.LLM` (plugins/quantization/fp8.py, compressed_tensors_fp8.py, fp8_layer.py).

A tiny random Qwen3 (hidden 320, q 4 x 48 = 192 rows, k/v 96 rows, intermediate 256) saved by transformers is
rewritten by these tests into the checkpoint formats, with the documented packings:
- block fp8 (Qwen3-FP8 / DeepSeek-V3): per 128 x 128 block of each linear weight W, `scale = max |block| / 448`,
  `weight = (block / scale)` cast to float8_e4m3fn, `weight_scale_inv = scale` (float32, one per block; the
  blocks at the right and bottom edges are partial: 320 = 128 + 128 + 64 columns); config.json
  `quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}`.
  The fused q/k/v layer's parts (192 and 96 rows) do not end on block rows (the layer keeps a scale per row);
  gate/up (256 + 256) do (the layer keeps the 128 x 128 blocks).
- per-tensor fp8 with static activations (vLLM's Fp8Config without blocks): `weight_scale` () and `input_scale` ().
- compressed-tensors float-quantized (per-channel weights, dynamic per-token activations), written by the
  `compressed-tensors` library itself (apply_quantization_config, scales = max |row| / 448, compress_model).
The reference is transformers running the exactly dequantized weights (`weight.float() * scale`), fp32, CPU:
greedy tokens must be identical. On-the-fly `quantization="fp8"` of the float checkpoint is checked against
transformers on the weights rounded per output channel the same way.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from weavelm import LLM, SamplingParams
from weavelm.core.quantization import summary
from weavelm.core.registry import Registry
from weavelm.errors import LoadError

from tests.model_fixtures import hf_greedy

FP8 = torch.float8_e4m3fn
PROMPTS = [[5, 17, 33, 9, 100], [7, 8, 9, 300, 41, 2, 11]]
MAX_TOKENS = 10
BLOCK_QUANT = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 16, "block_size": 16},
              scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 64})


def is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def block_pack(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, per-block scale, exactly dequantized weight) by the packing in the module docstring."""
    n, k = w.shape
    rows, cols = math.ceil(n / block), math.ceil(k / block)
    q, scale, deq = torch.empty(n, k, dtype=FP8), torch.empty(rows, cols), torch.empty(n, k)
    for i in range(rows):
        for j in range(cols):
            part = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = part.abs().max() / 448.0
            codes = (part / s).to(FP8)
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = codes
            deq[i * block:(i + 1) * block, j * block:(j + 1) * block] = codes.float() * s
    return q, scale, deq


def row_round(w: torch.Tensor) -> torch.Tensor:
    """w rounded through fp8 per output channel (scale = max |row| / 448): on-the-fly fp8's weights."""
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    return (w / s).to(FP8).float() * s


def write(src: str, dst: str, tensors: dict[str, torch.Tensor], quant: dict | None) -> str:
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if quant is not None:
        cfg["quantization_config"] = quant
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    if os.path.isfile(os.path.join(src, "generation_config.json")):
        shutil.copy(os.path.join(src, "generation_config.json"), dst)
    return dst


@pytest.fixture(scope="module")
def registry():
    reg = Registry.load()
    for module in ("weavelm.plugins.quantization.fp8", "weavelm.plugins.quantization.compressed_tensors_fp8"):
        reg.register_module(module)  # until the package is reinstalled with the new entry points
    return reg


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, Qwen3Config

    path = str(tmp_path_factory.mktemp("fp8") / "dense")
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=320, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=48, max_position_embeddings=512,
                      initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def state(dense) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(dense, "model.safetensors"))


@pytest.fixture(scope="module")
def block(dense, state) -> tuple[str, str]:
    """(block-fp8 checkpoint, its exactly dequantized float twin)."""
    out, ref = {}, {}
    for name, t in state.items():
        if is_linear(name):
            q, s, deq = block_pack(t)
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"], ref[name] = q, s, deq
        else:
            out[name] = ref[name] = t
    root = os.path.dirname(dense)
    return write(dense, f"{root}/block", out, BLOCK_QUANT), write(dense, f"{root}/block_ref", ref, None)


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def reference(path: str) -> list[list[int]]:
    return [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]


def model_of(llm: LLM):
    return llm.collective_rpc("apply_model", (lambda model: model,))[0]


def test_block_fp8_checkpoint_matches_transformers_on_dequantized_weights(block, registry):
    path, ref = block
    with LLM(model=path, registry=registry, **ENGINE) as llm:  # quantization: auto picks fp8
        assert greedy(llm) == reference(ref)
        model = model_of(llm)
        info = llm.collective_rpc("model_info")[0]
    qkv, gate_up = model.layers[0].self_attn.qkv_proj, model.layers[0].mlp.gate_up_proj
    assert qkv.weight.dtype == FP8 and gate_up.weight.dtype == FP8
    assert qkv.quant_method.group == (1, 128) and gate_up.quant_method.group == (128, 128)
    assert tuple(gate_up.weight_scale_inv.shape) == (4, 3)  # 512 rows, 320 columns: the last column block partial
    assert info["quantization"] == summary(model).methods == {"fp8-block/weight-only": 8}
    assert info["weight_bytes"] == summary(model).weight_bytes
    dense_bf16 = sum(m.weight.numel() * 2 for m in model.modules() if getattr(m, "quant_method", None))
    fp8_bytes = sum(m.weight.numel() + m.weight_scale_inv.numel() * 4 for m in model.modules()
                    if getattr(m, "quant_method", None))
    assert fp8_bytes < 0.53 * dense_bf16  # 1 byte a weight plus the scales (a row's per block on q/k/v)


def test_per_tensor_fp8_with_static_activation_scales(dense, state, registry):
    out, ref = {}, {}
    for name, t in state.items():
        if is_linear(name):
            s = t.abs().max() / 448.0
            q = (t / s).to(FP8)
            prefix = name.removesuffix("weight")
            out[name], out[prefix + "weight_scale"], out[prefix + "input_scale"] = q, s.reshape(()), torch.tensor(0.05)
            ref[name] = q.float() * s
        else:
            out[name] = ref[name] = t
    root = os.path.dirname(dense)
    path = write(dense, f"{root}/tensor", out, {"quant_method": "fp8", "activation_scheme": "static"})
    with LLM(model=path, registry=registry, **ENGINE) as llm:
        assert greedy(llm) == reference(write(dense, f"{root}/tensor_ref", ref, None))
        qkv = model_of(llm).layers[0].self_attn.qkv_proj
    # each part keeps its own scale (repeated per row); the static input scales are kept for W8A8
    q_scale, k_scale = state["model.layers.0.self_attn.q_proj.weight"].abs().max() / 448, \
        state["model.layers.0.self_attn.k_proj.weight"].abs().max() / 448
    torch.testing.assert_close(qkv.weight_scale[0, 0], q_scale)
    torch.testing.assert_close(qkv.weight_scale[192, 0], k_scale)
    assert qkv.input_scale.item() == pytest.approx(0.05)


def test_compressed_tensors_float_quantized_written_by_the_library(dense, registry):
    from compressed_tensors import ModelCompressor, QuantizationConfig
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, apply_quantization_config
    from transformers import AutoModelForCausalLM

    path = os.path.join(os.path.dirname(dense), "ct")
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True),
        input_activations=QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True,
                                           symmetric=True))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized",
                                                        ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data = module.weight.abs().amax(dim=1, keepdim=True) / 448.0
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["quantization_config"]["format"] == "float-quantized"
    saved = load_file(os.path.join(path, "model.safetensors"))
    ref = {n: t for n, t in saved.items() if not n.endswith("weight_scale")}
    for name in list(ref):
        if ref[name].dtype == FP8:
            ref[name] = ref[name].float() * saved[name.removesuffix("weight") + "weight_scale"]
    ref_path = write(dense, os.path.join(os.path.dirname(dense), "ct_ref"), ref, None)
    with LLM(model=path, registry=registry, **ENGINE) as llm:
        assert greedy(llm) == reference(ref_path)
        assert summary(model_of(llm)).methods == {"fp8-channel/weight-only": 8}


def test_on_the_fly_fp8_of_a_float_checkpoint(dense, state, registry):
    ref = {n: row_round(t) if is_linear(n) else t for n, t in state.items()}
    ref_path = write(dense, os.path.join(os.path.dirname(dense), "otf_ref"), ref, None)
    with LLM(model=dense, quantization="fp8", registry=registry, **ENGINE) as llm:
        assert greedy(llm) == reference(ref_path)
        model = model_of(llm)
    assert model.layers[1].mlp.down_proj.weight.dtype == FP8
    assert model.embed_tokens.weight.dtype == torch.float32  # the embedding and LM head stay dense


# -- corrupt checkpoints: a LoadError naming the tensor, before the model's memory is allocated --------------------

def corrupt(block: tuple[str, str], name: str, edit) -> str:
    path, _ = block
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    with open(os.path.join(path, "config.json")) as f:
        quant = json.load(f)["quantization_config"]
    return write(path, os.path.join(os.path.dirname(path), name), tensors, quant)


SCALE = "model.layers.1.self_attn.k_proj.weight_scale_inv"
WEIGHT = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("case, edit, message", [
    ("scale_shape", lambda t: t.__setitem__(SCALE, torch.ones(2, 2)),
     f"tensor '{SCALE}' has shape (2, 2), the model config expects (1, 3)"),
    ("weight_dtype", lambda t: t.__setitem__(WEIGHT, t[WEIGHT].to(torch.bfloat16)),
     f"tensor '{WEIGHT}' has dtype bfloat16, the checkpoint's quantization_config expects float8_e4m3fn"),
    ("missing_scale", lambda t: t.pop(SCALE), f"missing tensor(s) {SCALE}"),
])
def test_corrupt_block_checkpoint_is_a_load_error_naming_the_tensor(block, registry, case, edit, message,
                                                                     monkeypatch):
    def allocate(model, device):
        raise AssertionError("the model's memory was allocated before the checkpoint was checked")

    monkeypatch.setattr("weavelm.plugins.workers.model_loading.materialize", allocate)
    with pytest.raises(LoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(model=corrupt(block, case, edit), registry=registry, **ENGINE)


def test_malformed_quantization_config_names_the_field(block, registry):
    path = corrupt(block, "bad_config", lambda t: None)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["weight_block_size"] = [128]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(LoadError, match=r"quantization_config.weight_block_size: \[128\] must be two positive"):
        LLM(model=path, registry=registry, **ENGINE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_runs_w8a8_and_agrees_with_the_reference(block, dense, registry):
    from weavelm.ops.fp8_kernels import fp8_supported

    if not fp8_supported(torch.device("cuda")):
        pytest.skip("needs fp8 (sm89+)")
    path, ref = block
    expected = reference(ref)
    gpu = dict(ENGINE, dtype="bfloat16", device="cuda")
    with LLM(model=path, registry=registry, **gpu) as llm:
        tokens = greedy(llm)
        assert summary(model_of(llm)).methods == {"fp8-block/w8a8-block-triton": 8}
    assert [t[0] for t in tokens] == [t[0] for t in expected]  # bf16 + fp8 activations: the first token agrees
    with LLM(model=dense, quantization="fp8", registry=registry, **gpu) as llm:
        greedy(llm)
        assert summary(model_of(llm)).methods == {"fp8-channel/w8a8-scaled-mm": 8}


# -- tensor-parallel shards, layer by layer (no processes: each rank's layer is built with its TensorParallelGroup) --

def tp_layers(tp):
    from weavelm.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    # hidden 320 (columns 128 + 128 + 64); q 4 x 64, k/v 2 x 64; at TP 2 a rank holds 128 q rows and 64 k/v rows
    # (k/v off the 128-row blocks: a scale per row), 128 + 128 gate/up rows (blocks kept), 128 o_proj columns
    return {"qkv": (QKVParallelLinear(320, 64, 4, 2, False, tp), [("q", 256), ("k", 128), ("v", 128)], 320),
            "gate_up": (MergedColumnParallelLinear(320, [256, 256], False, tp), [(0, 256), (1, 256)], 320),
            "o": (RowParallelLinear(256, 320, False, tp), [(None, 320)], 256)}


@pytest.mark.parametrize("fmt", ["block", "tensor", "float"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_each_rank_holds_its_slice_of_the_dequantized_checkpoint(fmt, world_size):
    from weavelm.distributed import TensorParallelGroup
    from weavelm.ops.fp8_kernels import dequantize
    from weavelm.plugins.quantization.fp8_layer import Fp8Format, Fp8LinearMethod

    form = {"block": Fp8Format(block=(128, 128)), "tensor": Fp8Format(), "float": Fp8Format(from_float=True)}[fmt]
    gen = torch.Generator().manual_seed(1)
    parts = {name: [(sid, torch.randn(rows, k, generator=gen)) for sid, rows in spec]
             for name, (_, spec, k) in tp_layers(TensorParallelGroup()).items()}
    for rank in range(world_size):
        tp = TensorParallelGroup(rank, world_size)
        for name, (layer, _, _) in tp_layers(tp).items():
            method = Fp8LinearMethod(form)
            layer.quant_method = method
            method.create_weights(layer)
            expected = []
            for sid, w in parts[name]:
                if fmt == "block":
                    q, s, deq = block_pack(w)
                elif fmt == "tensor":
                    s = w.abs().max() / 448.0
                    q, deq = (w / s).to(FP8), (w / s).to(FP8).float() * s
                else:
                    q, s, deq = w, None, None
                layer.weight.weight_loader(layer.weight, q, sid)
                if s is not None:
                    scale = getattr(layer, form.scale_name)
                    scale.weight_loader(scale, s, sid)
                if name == "o":
                    cols = slice(rank * 256 // world_size, (rank + 1) * 256 // world_size)
                    expected.append(row_round(w[:, cols]) if deq is None else deq[:, cols])
                else:
                    rows = w.shape[0] // world_size if name != "qkv" or sid == "q" else 128 // world_size
                    part = w[rank * rows:(rank + 1) * rows]
                    expected.append(row_round(part) if deq is None else deq[rank * rows:(rank + 1) * rows])
            method.process_weights_after_loading(layer)
            want = torch.cat(expected)
            got = dequantize(layer.weight, getattr(layer, form.scale_name), method.group)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} rank {rank}")
            x = torch.randn(3, want.shape[1], generator=gen)
            torch.testing.assert_close(method.apply(layer, x), x @ want.t())


def test_quantized_build_allocates_only_what_methods_keep():
    """`parameters_on_meta` + `materialize` (the loading code's build for a quantized model): the dense weight an fp8
    method replaces is never allocated, the others are, with their weight loaders; the size check counts fp8."""
    from weavelm.core.model_size import measure
    from weavelm.core.quantization import attach, materialize, parameters_on_meta
    from weavelm.plugins.models.qwen3 import Qwen3ForCausalLM
    from weavelm.plugins.quantization.fp8 import Fp8Config
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=512, hidden_size=320, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=48)
    with parameters_on_meta():
        model = Qwen3ForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert not model.rotary.cos_cache.is_meta  # buffers are built as usual
    config = Fp8Config(Fp8Config.Options())
    attach(model, config)
    materialize(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8 and callable(qkv.weight.weight_loader)
    embed = model.embed_tokens.weight
    assert embed.dtype == torch.get_default_dtype() and callable(embed.weight_loader)
    dense = measure(Qwen3ForCausalLM, cfg, torch.bfloat16, "cfg")
    fp8 = measure(Qwen3ForCausalLM, cfg, torch.bfloat16, "cfg", quant=config)
    linear = sum(m.weight.numel() for m in model.modules() if getattr(m, "quant_method", None))
    assert dense.num_bytes - fp8.num_bytes >= linear * 0.9  # 2 bytes -> 1 byte a weight, less the scales


def test_plugins_listing_says_how_fp8_computes_here():
    from weavelm.cli import _can_run
    from weavelm.plugins.quantization.fp8 import Fp8Config

    status = _can_run("quantization", Fp8Config)
    assert status.startswith("ok: ") and ("W8A8" in status if torch.cuda.is_available() else "weight-only" in status)


def test_checkpoint_schema_takes_the_tensors_a_method_declares():
    """The hook the loaders' schema check reads (`QuantizeMethodBase.checkpoint_tensors`): a method's declared tensors
    replace each checkpoint part's dense weight, with their shapes, dtypes and optional ones (int4 methods declare
    qweight / scales / g_idx the same way)."""
    from transformers import Qwen3Config

    from weavelm.core.quantization import CheckpointTensor, QuantizeMethodBase, checkpoint_schema
    from weavelm.plugins.loaders.common import expected_tensors
    from weavelm.plugins.models.qwen3 import Qwen3ForCausalLM

    class Packed(QuantizeMethodBase):
        def create_weights(self, layer):
            pass

        def process_weights_after_loading(self, layer):
            pass

        def apply(self, layer, x, bias=None):
            raise AssertionError("not called")

        def checkpoint_tensors(self, layer, shape):
            return {"qweight": CheckpointTensor((shape[1] // 8, shape[0]), torch.int32),
                    "g_idx": CheckpointTensor(None, required=False)}

    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model.layers[0].self_attn.qkv_proj.quant_method = Packed()
    schema = checkpoint_schema(model, *expected_tensors(cfg))
    k = "model.layers.0.self_attn.k_proj."
    assert k + "weight" not in schema.shapes and schema.shapes[k + "qweight"] == (8, 32)
    assert schema.dtypes[k + "qweight"] == torch.int32 and k + "g_idx" in schema.optional
    assert schema.shapes["model.layers.0.mlp.down_proj.weight"] == (64, 64)  # layers without a method: dense
