"""The machinery of batched LoRA serving, used by the built-in `lora_manager` plugin (plugins/lora/punica.py).

Two halves, one class, each instance used on one side:
- in the engine core, `check_request` reads and checks an adapter before its request is queued (a bad adapter
  fails that request only) and `can_admit` keeps at most `max_loras` distinct adapters among running requests,
  so every batch fits the device slots (the others wait). It also keeps the adapters selectable by name: the
  configured ones, plus those added and removed at run time (`add_lora`, `load_lora`, `remove_lora`). An id is
  never reused for another adapter (the runners' slot and host caches and the prefix cache are keyed by it), and
  a removed adapter serves no new request until it is added again; requests already queued on it finish;
- in each model runner, `attach` wraps the model's layers by type (`weavelm.lora.model`), and `prepare` maps each
  batch row's adapter to a device slot (an LRU of `max_loras` slots, filled from an LRU of `max_cpu_loras` adapters
  in host memory) and writes the per-token slot index the wrapped layers read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from weavelm.errors import LoRAError
from weavelm.lora.adapter import LoRAAdapter, load_adapter
from weavelm.lora.batch import LoRABatchState
from weavelm.lora.layers import BaseLayerWithLoRA
from weavelm.lora.model import lora_targets, wrap_model
from weavelm.lora.request import LoRARequest
from weavelm.lora.targets import LoRATargets

MAX_CHECKED = 4096  # adapters remembered as checked by the engine core
MAX_REMOVED = 4096  # adapters remembered as removed (refused for new requests) by the engine core


class LoRAOptions(BaseModel):
    """The `lora:` section."""

    model_config = ConfigDict(extra="forbid")
    max_loras: int = Field(1, ge=1, le=256, description="Distinct adapters in one batch (device slots).")
    max_lora_rank: int = Field(16, ge=1, le=1024, description="Largest adapter rank accepted.")
    max_cpu_loras: int | None = Field(None, ge=1, le=65536, description="Adapters kept in host memory "
                                      "(LRU); default: max_loras.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Named adapters {name: PEFT directory}, "
                                     "selectable by name (server `model`, CLI `--lora`); ids 1, 2, ... in order.")

    @model_validator(mode="after")
    def _cpu_holds_device(self) -> LoRAOptions:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self


def named_lora_requests(options: LoRAOptions) -> dict[str, LoRARequest]:
    """The configured adapters as requests, by name (ids 1, 2, ... in the order given)."""
    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(options.adapters.items())}


class LoRASlots:
    """Runner side: adapters in device slots (LRU of `max_loras`) and in host memory (LRU of `max_cpu_loras`)."""

    def __init__(self, options: LoRAOptions, wrapped: dict[str, BaseLayerWithLoRA], targets: LoRATargets,
                 device: torch.device, dtype: torch.dtype):
        self.options, self.wrapped, self.targets = options, wrapped, targets
        self.device, self.dtype = device, dtype
        self.on_device: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recently used first
        self.in_host: OrderedDict[int, LoRAAdapter] = OrderedDict()

    def slot_of(self, lora: LoRARequest | None, pinned: set[int]) -> int:
        """The device slot holding `lora` (loading it, evicting the least recently used slot not in `pinned`)."""
        if lora is None:
            return -1
        lid = lora.lora_int_id
        if lid in self.on_device:
            self.on_device.move_to_end(lid)
            return self.on_device[lid]
        used = set(self.on_device.values())
        free = [s for s in range(self.options.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next((v for v in self.on_device if v not in pinned), None)
            if victim is None:
                raise LoRAError(f"a batch needs more than lora.max_loras={self.options.max_loras} adapters; the "
                                f"scheduler must keep batches within it")
            slot = self.on_device.pop(victim)
        self._write(slot, self._host_copy(lora))
        self.on_device[lid] = slot
        return slot

    def _host_copy(self, lora: LoRARequest) -> LoRAAdapter:
        adapter = self.in_host.get(lora.lora_int_id)
        if adapter is None:
            adapter = load_adapter(lora, self.targets, self.options.max_lora_rank)
            self.in_host[lora.lora_int_id] = adapter
            while len(self.in_host) > (self.options.max_cpu_loras or self.options.max_loras):
                self.in_host.popitem(last=False)
        else:
            self.in_host.move_to_end(lora.lora_int_id)
        return adapter

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for module in self.wrapped.values():
            module.clear_slot(slot)
        for name, (a, b) in adapter.weights.items():
            target = self.targets.modules[name]
            self.wrapped[target.module].set_lora(slot, target.part, a.to(self.device, self.dtype),
                                                 b.to(self.device, self.dtype))


class LoRAManagerBase:
    """Both halves of batched LoRA serving (see the module docstring); a plugin subclass picks the compute."""

    def __init__(self, options: LoRAOptions):
        self.options = options
        self.named = named_lora_requests(options)
        self.targets: LoRATargets | None = None
        self._checked: OrderedDict[int, LoRARequest] = OrderedDict()
        self._removed: OrderedDict[int, LoRARequest] = OrderedDict()  # by id, oldest first
        self._next_id = len(self.named) + 1  # above every id seen: what `load_lora` gives a new adapter
        self.state: LoRABatchState | None = None
        self.slots: LoRASlots | None = None

    # -- engine core side ---------------------------------------------------------------------------------
    def lora_request(self, name: str) -> LoRARequest:
        """The configured adapter called `name`; LoRAError listing the configured names otherwise."""
        if name not in self.named:
            known = ", ".join(sorted(self.named)) or "none configured"
            raise LoRAError(f"unknown LoRA adapter {name!r}; configured adapters: {known} (add it under "
                            f"lora.adapters, pass --lora {name}=PATH, or add it at run time with add_lora)")
        return self.named[name]

    def set_targets(self, targets: LoRATargets) -> None:
        """What adapters may touch; then every configured adapter is read and checked (a LoRAError at startup
        instead of on every request that names it)."""
        self.targets = targets
        for lora in self.named.values():
            self.check_request(lora)

    def check_request(self, lora: Any) -> None:
        """Raise LoRAError when `lora` (a LoRARequest or None) cannot serve a request on this model."""
        if lora is None:
            return
        if not isinstance(lora, LoRARequest):
            raise LoRAError(f"lora_request: expected a weavelm.LoRARequest or None (got {type(lora).__name__})")
        removed = self._removed.get(lora.lora_int_id)
        if removed is not None:
            raise LoRAError(f"LoRA adapter {removed.lora_name!r} (lora_int_id {lora.lora_int_id}) was removed; add "
                            f"it again (add_lora, or POST /v1/load_lora_adapter) before sending requests on it")
        seen = self._checked.get(lora.lora_int_id)
        if seen is not None:
            if seen != lora:
                raise LoRAError(f"lora_int_id {lora.lora_int_id} already names adapter {seen.lora_name!r} at "
                                f"{seen.lora_path}; give each adapter its own id")
            self._checked.move_to_end(lora.lora_int_id)
            return
        configured = next((r for r in self.named.values() if r.lora_int_id == lora.lora_int_id), None)
        if configured is not None and configured != lora:
            raise LoRAError(f"lora_int_id {lora.lora_int_id} is taken by the adapter {configured.lora_name!r}; "
                            f"use an id of {self._next_id} or above")
        assert self.targets is not None, "set_targets before check_request"
        load_adapter(lora, self.targets, self.options.max_lora_rank)
        self._checked[lora.lora_int_id] = lora
        self._next_id = max(self._next_id, lora.lora_int_id + 1)
        while len(self._checked) > MAX_CHECKED:
            self._checked.popitem(last=False)

    def add_lora(self, lora: Any) -> bool:
        """vLLM's `add_lora`: read and check the adapter of `lora` (a LoRARequest; LoRAError naming the problem
        otherwise), then make it selectable by its name. False when this very adapter is added already; a name
        or id taken by another adapter is a LoRAError. An adapter removed earlier may come back only as it was
        (same name, id and path): ids are never reused."""
        if not isinstance(lora, LoRARequest):
            raise LoRAError(f"add_lora: expected a weavelm.LoRARequest (got {type(lora).__name__})")
        current = self.named.get(lora.lora_name)
        if current == lora:
            return False
        if current is not None:
            raise LoRAError(f"a LoRA adapter named {lora.lora_name!r} is loaded already; remove it first, or "
                            f"choose another name")
        removed = self._removed.get(lora.lora_int_id)
        if removed is not None and removed != lora:
            raise LoRAError(f"lora_int_id {lora.lora_int_id} belonged to the removed adapter "
                            f"{removed.lora_name!r}; ids are never reused, use an id of {self._next_id} or above")
        self._removed.pop(lora.lora_int_id, None)
        try:
            self.check_request(lora)
        except LoRAError:
            if removed is not None:
                self._removed[lora.lora_int_id] = removed
            raise
        self.named[lora.lora_name] = lora
        return True

    def load_lora(self, lora_name: str, lora_path: str, replace: bool = False) -> LoRARequest:
        """Add the PEFT adapter at `lora_path` as `lora_name` under a new id (`add_lora`'s checks); returns its
        request. What the server's /v1/load_lora_adapter does, from any API server. `replace` (vLLM's
        `load_inplace`): an adapter of that name is removed once the new one passed its checks."""
        old = self.named.get(lora_name)
        if old is not None and not replace:
            raise LoRAError(f"a LoRA adapter named {lora_name!r} is loaded already; unload it first, choose "
                            f"another name, or replace it (load_inplace)")
        lora = LoRARequest(lora_name, self._next_id, lora_path)
        if old is not None:
            self.check_request(lora)
            self.remove_lora(lora_name)
        self.add_lora(lora)
        return lora

    def remove_lora(self, lora: int | str) -> bool:
        """vLLM's `remove_lora`: forget the adapter with this id (or name); False when none has it. Requests
        already queued on it run to their end; new ones on it are refused until it is added again."""
        found = next((r for r in self.named.values() if lora in (r.lora_int_id, r.lora_name)), None)
        if found is None:
            return False
        del self.named[found.lora_name]
        self._checked.pop(found.lora_int_id, None)
        self._removed[found.lora_int_id] = found
        while len(self._removed) > MAX_REMOVED:
            self._removed.popitem(last=False)
        return True

    def named_loras(self) -> dict[str, LoRARequest]:
        """The adapters selectable by name now: the configured ones and those added at run time."""
        return dict(self.named)

    def can_admit(self, request: Any, running: list) -> bool:
        """Whether `request` may join `running` without more than `max_loras` distinct adapters among them."""
        lora = request.lora_request
        if lora is None:
            return True
        active = {r.lora_request.lora_int_id for r in running if r.lora_request is not None}
        return lora.lora_int_id in active or len(active) < self.options.max_loras

    @staticmethod
    def num_active(running: list) -> int:
        return len({r.lora_request.lora_int_id for r in running if r.lora_request is not None})

    # -- runner side --------------------------------------------------------------------------------------
    def attach(self, model: Any, device: torch.device, dtype: torch.dtype, max_tokens: int) -> LoRATargets:
        """Wrap `model`'s layers by type (once, after its weights are loaded) and return what adapters may target."""
        self.state = LoRABatchState(self.options.max_loras, max_tokens, device)
        wrapped = wrap_model(model, self.state, self.options.max_loras, self.options.max_lora_rank, dtype, device)
        self.targets = lora_targets(model, wrapped)
        self.slots = LoRASlots(self.options, wrapped, self.targets, device, dtype)
        return self.targets

    def prepare(self, row_loras: list, counts: np.ndarray, logits_rows: np.ndarray) -> None:
        """Before a forward: row i of the batch (with `counts[i]` tokens) runs adapter `row_loras[i]`; the head
        sees rows `logits_rows`."""
        pinned = {r.lora_int_id for r in row_loras if r is not None}
        row_slots = np.fromiter((self.slots.slot_of(r, pinned) for r in row_loras), dtype=np.int64,
                                count=len(row_loras))
        self.state.tokens.set(np.repeat(row_slots, counts))
        self.state.head.set(row_slots[logits_rows])

    def set_head_rows(self, lora: Any, n: int) -> None:
        """The next `compute_logits` call sees `n` rows of one request running `lora`."""
        slot = self.slots.slot_of(lora, set())
        self.state.head.set(np.full(n, slot, dtype=np.int64))

    # -- CUDA-graph variants (weavelm.core.graph_variants): graphs with the LoRA kernels (True) and without ------
    def graph_variants(self) -> tuple[bool, ...]:
        return (False, True)

    def set_capture_variant(self, variant: bool | None) -> None:
        self.state.force_kernels = bool(variant)

    def graph_variant(self) -> bool:
        return self.state.any_active
