"""The public model library `weavelm.layers` as a contract: its exports (ratchet), fused checkpoint tensors loaded
the same as their parts on every rank, and the rule that models are built from it alone and that LoRA reaches
them by layer type, never by an architecture's attribute names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.test_tensor_parallel import LocalGroup

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ["layer_windows", "TensorParallelGroup", "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
           "RowParallelLinear", "OutputSegment", "VocabParallelEmbedding", "ParallelLMHead", "RMSNorm", "SiluAndMul",
           "RotaryEmbedding", "RopeParameters", "rope_parameters", "ROPE_TYPES", "Attention", "WeightsMapper",
           "load_checkpoint", "copy_shard", "default_weight_loader", "linear_apply", "FusedMoE", "load_moe_checkpoint",
           "GemmaRMSNorm", "GeluAndMul", "ParallelContext", "ExpertParallel", "IntermediateTensors", "PipelineStage",
           "PPMissingLayer", "make_layers"]


def test_library_exports_are_frozen_and_the_facade_re_exports_them():
    import weavelm.layers as layers
    import weavelm.plugin as sdk
    from weavelm.core.interfaces import COMPONENT_KINDS

    assert sorted(layers.__all__) == sorted(LIBRARY)
    for name in ("QKVParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
                 "ParallelLMHead", "RMSNorm", "RotaryEmbedding", "SiluAndMul", "Attention", "LoRAManager"):
        assert name in sdk.__all__ and getattr(sdk, name) is not None, name
    assert set(sdk.KIND_ABCS) == set(COMPONENT_KINDS)
    for kind, abc in sdk.KIND_ABCS.items():
        assert abc.__name__ in sdk.__all__, kind


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_checkpoint_tensors_load_like_their_parts(world):
    from weavelm.layers import MergedColumnParallelLinear, QKVParallelLinear

    g = torch.Generator().manual_seed(0)
    hidden, head_dim, heads, kv_heads, inter = 16, 4, 4, 2, 24
    q, k, v = (torch.randn(n * head_dim, hidden, generator=g) for n in (heads, kv_heads, kv_heads))
    gate, up = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    for rank in range(world):
        tp = LocalGroup(rank, world)
        by_parts, fused = (QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, tp) for _ in range(2))
        for shard_id, part in zip("qkv", (q, k, v)):
            by_parts.weight.weight_loader(by_parts.weight, part, shard_id)
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]), None)
        assert torch.equal(by_parts.weight, fused.weight)
        by_parts, fused = (MergedColumnParallelLinear(hidden, [inter, inter], False, tp) for _ in range(2))
        for shard_id, part in enumerate((gate, up)):
            by_parts.weight.weight_loader(by_parts.weight, part, shard_id)
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]), None)
        assert torch.equal(by_parts.weight, fused.weight)
    with pytest.raises(ValueError, match=r"has shape \(40, 16\), the model expects \(48, 16\)"):
        fused.weight.weight_loader(fused.weight, torch.zeros(40, hidden), None)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", ["weavelm/plugins/models/decoder.py", "weavelm/plugins/models/llama.py",
                                  "weavelm/plugins/models/qwen3.py", "weavelm/plugins/models/moe_decoder.py",
                                  "weavelm/plugins/models/mixtral.py", "weavelm/plugins/models/qwen2_moe.py",
                                  "weavelm/plugins/models/qwen3_moe.py", "weavelm/plugins/models/llava.py",
                                  "weavelm/plugins/models/clip.py",
                                  "examples/weavelm-model-phi3/weavelm_model_phi3/model.py"])
def test_models_are_built_from_the_library_and_the_facade_only(path):
    own = {"weavelm.plugins.models.decoder", "weavelm.plugins.models.native_stack",  # the built-ins' own package
           "weavelm.plugins.models", "weavelm.plugins.models.moe_decoder", "weavelm.plugins.models.clip"}
    weavelm = {i for i in _imports(ROOT / path) if i.startswith("weavelm")}
    assert weavelm - own <= {"weavelm.layers", "weavelm.plugin"}, weavelm


def test_lora_names_no_architecture_attribute():
    """LoRA finds layers by type: no attribute of a particular model is read anywhere in weavelm/lora."""
    model_attrs = {"layers", "self_attn", "mlp", "dims", "qkv_proj", "gate_up_proj", "o_proj", "down_proj",
                   "embed_tokens", "lm_head", "model"}
    for path in (ROOT / "weavelm" / "lora").glob("*.py"):
        used = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        assert not used & model_attrs, (path.name, used & model_attrs)
