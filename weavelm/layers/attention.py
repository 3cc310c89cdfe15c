"""The attention layer: one decoder layer's call into the attention backend the engine selected."""

from __future__ import annotations

import torch
from torch import nn

from weavelm.core.forward import ForwardBatch


class Attention(nn.Module):
    """Paged attention of layer `layer_idx` over this rank's heads. Holds no weights: the runner builds one
    `AttentionImpl` per layer from `ModelArchitecture.attention_layout()` (and its `sliding_window`, which
    `ModelArchitecture.attention_windows()` collects) and hands them, with the layer's KV cache
    and the step's metadata, in the `ForwardBatch`.

    q: (tokens, num_heads * head_dim), k / v: (tokens, num_kv_heads * head_dim); returns like q. `accepts_strided`
    says whether the selected impl takes q, k and v as column slices of one packed buffer (no copies)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window  # attends to its last `sliding_window` positions (None: all)

    def accepts_strided(self, batch: ForwardBatch) -> bool:
        return getattr(batch.attn_impls[self.layer_idx], "accepts_strided_qkv", False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        i = self.layer_idx
        return batch.attn_impls[i].forward(q, k, v, batch.kv_caches[i], batch.attn_metadata)
