"""`LoRARequest`: which adapter a request runs with (vLLM's fields and positional order)."""

from __future__ import annotations

from dataclasses import dataclass

from weavelm.errors import LoRAError


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for one request: `lora_name` (what users see), `lora_int_id` (>= 1, unique per adapter in one
    engine: slots and prefix-cache keys use it) and `lora_path` (a PEFT directory holding `adapter_config.json`
    and `adapter_model.safetensors` or `adapter_model.bin`). `None` in its place means the base model."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise LoRAError(f"LoRARequest.lora_name: must be a non-empty string (got {self.lora_name!r})")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise LoRAError(f"LoRARequest.lora_int_id: must be an integer >= 1, unique per adapter "
                            f"(got {self.lora_int_id!r})")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise LoRAError(f"LoRARequest.lora_path: must name a PEFT adapter directory (got {self.lora_path!r})")
