"""Which layers attend through a sliding window, read from a transformers config.

`config.layer_types` (Gemma 3, Qwen2's `max_window_layers`, Qwen3, Ministral) names each layer
"sliding_attention" or "full_attention"; without it (Mistral) `config.sliding_window` applies to every layer, and
`sliding_window: null` means full attention. Qwen2/Qwen3 with `use_sliding_window: false` have no window.
"""

from __future__ import annotations

from typing import Any

from weavelm.errors import LoadError

SLIDING = "sliding_attention"


def layer_windows(hf_config: Any, num_layers: int) -> list[int | None]:
    """Layer i's window (it attends to its last `w` positions) or None (its whole context)."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise LoadError(f"config.json: sliding_window must be a positive integer or null (got {window!r})")
    types = getattr(hf_config, "layer_types", None)
    if not types:
        return [window] * num_layers
    if len(types) < num_layers:
        raise LoadError(f"config.json: layer_types names {len(types)} layers but num_hidden_layers is {num_layers}")
    return [window if t == SLIDING else None for t in types[:num_layers]]
