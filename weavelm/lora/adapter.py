"""Reading a PEFT LoRA adapter directory and checking it against the model it is meant for.

`adapter_config.json` + `adapter_model.safetensors` (or `adapter_model.bin`, read with `weights_only=True` so a
pickle that would run code is refused). Tensor names are PEFT's: `base_model.model.model.layers.3.self_attn.
q_proj.lora_A.weight` (A: (r, in)), `...lora_B.weight` (B: (out, r)); the embedding's are `lora_embedding_A`
(r, vocab) and `lora_embedding_B` (hidden, r). Which modules exist, and their shapes, is the model's
`LoRATargets` (weavelm/lora/targets.py). Every module's B is returned pre-scaled by `lora_alpha / r`
(`lora_alpha / sqrt(r)` with rsLoRA; `alpha_pattern` overrides alpha per module, and r is each module's own rank,
which covers `rank_pattern`), so the forward adds `x A^T B^T`: what `peft`'s `merge_and_unload` folds in.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from weavelm.errors import LoRAError
from weavelm.lora.targets import LoRATargets


@dataclass
class LoRAAdapter:
    """A loaded adapter: `weights[target name] = (A (r, in), B (out, r) pre-scaled)`, fp32 on the host (target
    names are `LoRATargets.modules` keys)."""

    name: str
    int_id: int
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def modules(self) -> set[str]:
        return {m.rsplit(".", 1)[-1] for m in self.weights}


def load_adapter(lora_request, targets: LoRATargets, max_lora_rank: int) -> LoRAAdapter:
    """Read and check the adapter of `lora_request`; LoRAError naming the problem and its fix otherwise."""
    path, name = lora_request.lora_path, lora_request.lora_name
    where = f"LoRA adapter {name!r} ({path})"
    cfg = _read_config(path, where)
    targets.check_target_modules(cfg.get("target_modules"), where)
    tensors = _read_tensors(path, where)
    alpha = cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    module_paths: dict[str, str] = {}
    for key, tensor in tensors.items():
        parsed = targets.parse(key, where)
        if parsed is None:
            targets.check_base_copy(key, tensor, where)
            continue
        module, which, module_paths[module] = parsed
        parts.setdefault(module, {})[which] = tensor
    adapter = LoRAAdapter(name, lora_request.lora_int_id, 0)
    for module, ab in sorted(parts.items()):
        label = module
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{where}: {label} has lora_{''.join(ab)} but not its pair; the adapter file is "
                            f"incomplete, save it again with peft")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        in_f, out_f = targets.modules[module].in_features, targets.modules[module].out_features
        if a.dim() != 2 or b.dim() != 2 or a.shape != (r, in_f) or b.shape != (out_f, r):
            raise LoRAError(f"{where}: {label} has A {tuple(a.shape)} and B {tuple(b.shape)}, but this model needs "
                            f"A (r, {in_f}) and B ({out_f}, r); the adapter was made for a different base model")
        if r > max_lora_rank:
            raise LoRAError(f"{where}: {label} has rank {r}, above lora.max_lora_rank={max_lora_rank}; raise "
                            f"max_lora_rank to at least {r}")
        declared = _alpha_for(cfg.get("rank_pattern") or {}, module_paths[module], cfg.get("r", r))
        if declared != r:
            raise LoRAError(f"{where}: {label} has tensors of rank {r} but adapter_config.json declares rank "
                            f"{declared} (`r` / `rank_pattern`); the config does not belong to these weights, "
                            f"save the adapter again with peft")
        a_alpha = _alpha_for(cfg.get("alpha_pattern") or {}, module_paths[module], alpha)
        scale = a_alpha / math.sqrt(r) if rslora else a_alpha / r
        scaled_b = b * scale
        _check_finite(where, label, a, b, scaled_b, a_alpha, scale)
        adapter.weights[module] = (a.contiguous(), scaled_b.contiguous())
        adapter.rank = max(adapter.rank, r)
    if not adapter.weights:
        raise LoRAError(f"{where}: holds no LoRA tensors; save the adapter with peft's save_pretrained")
    return adapter


def _check_finite(where: str, label: str, a: torch.Tensor, b: torch.Tensor, scaled_b: torch.Tensor, alpha: float,
                  scale: float) -> None:
    """NaN or infinite weights (or a lora_alpha whose scaling overflows fp32) would turn every logit into NaN and
    silently sample token 0 for the whole request."""
    for name, t in (("lora_A", a), ("lora_B", b)):
        if not bool(torch.isfinite(t).all()):
            raise LoRAError(f"{where}: {label}.{name} holds values that are not finite (NaN or inf); the adapter "
                            f"is corrupt, train or save it again")
    if not math.isfinite(scale) or not bool(torch.isfinite(scaled_b).all()):
        raise LoRAError(f"{where}: {label}: lora_alpha={alpha!r} scales lora_B by {scale!r}, which is not finite "
                        f"in float32; use a sensible lora_alpha (peft's default is 8)")


def _read_config(path: str, where: str) -> dict:
    if not isinstance(path, str) or not os.path.isdir(path):
        raise LoRAError(f"{where}: no such directory; lora_path must name a PEFT adapter directory")
    cfg_path = os.path.join(path, "adapter_config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise LoRAError(f"{where}: cannot read adapter_config.json ({e.strerror}); save the adapter with peft's "
                        f"save_pretrained") from e
    except ValueError as e:
        raise LoRAError(f"{where}: adapter_config.json is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoRAError(f"{where}: adapter_config.json must hold a JSON object")
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are served")
    if cfg.get("use_dora"):
        problems.append("use_dora is true; DoRA adapters are not supported (merge them into the model instead)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias is {cfg.get('bias')!r}; only bias='none' adapters are supported")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']!r} replaces whole modules, which batched LoRA "
                        f"cannot do per request; merge the adapter instead")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out is true (GPT-2 Conv1D layout); this model uses Linear layers")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a number (got {alpha!r})")
    if problems:
        raise LoRAError(f"{where}: " + "; ".join(problems))
    return cfg


def _read_tensors(path: str, where: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    binf = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise LoRAError(f"{where}: adapter_model.safetensors is truncated or corrupt ({e})") from e
    if os.path.isfile(binf):
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise LoRAError(f"{where}: adapter_model.bin holds Python objects besides tensors, and loading it would "
                            f"run code; refused. Convert it to adapter_model.safetensors from a trusted "
                            f"environment") from e
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise LoRAError(f"{where}: adapter_model.bin is truncated or corrupt ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LoRAError(f"{where}: adapter_model.bin must hold a dict of tensors")
        return state
    raise LoRAError(f"{where}: neither adapter_model.safetensors nor adapter_model.bin is there")


def _alpha_for(pattern: dict, module_path: str, default: float) -> float:
    """peft's rule: the first `alpha_pattern` key that matches the end of the module's name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default
