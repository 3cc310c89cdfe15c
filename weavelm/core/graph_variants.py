"""A capability a component declares when its part of the forward launches different kernels from step to step:
CUDA-graph capture asks it which variants of the decode forward to capture, and which one a step replays.

A captured graph replays exactly the kernels launched while it was captured, so a forward whose kernels depend on
host-side state (the LoRA layers skip their kernels while no row of the step has an adapter) needs one graph per
variant. The model runner asks the components it owns that declare this capability (today the `lora_manager`;
`weavelm.core.interfaces.LoRAManager` inherits it), in its own process:

1. once, before capture: `graph_variants()`;
2. for each variant v: `set_capture_variant(v)`, then the graphs of every batch size are captured; after the last
   one, `set_capture_variant(None)` (forwards run as usual again);
3. every step replayed from a graph, after the step's inputs were prepared (`LoRAManager.prepare`):
   `graph_variant()` names the variant whose graph to replay.
"""

from __future__ import annotations

from collections.abc import Hashable


class CudaGraphVariants:
    """Default: a single variant (None), for a component whose forward launches the same kernels every step."""

    def graph_variants(self) -> tuple[Hashable, ...]:
        """The variants to capture, each a hashable key (the runner keys its graphs by (batch size, variant))."""
        return (None,)

    def set_capture_variant(self, variant: Hashable | None) -> None:
        """While graphs of `variant` are captured, make the forward launch that variant's kernels whatever this
        step's inputs are; None: capture is over."""

    def graph_variant(self) -> Hashable:
        """The variant this step's forward needs (one of `graph_variants()`); asked after the step's inputs were
        prepared."""
        return None
