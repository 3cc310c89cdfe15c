"""`attention: auto`: the highest-priority registered backend whose `check(spec)` passes, logged when chosen.

Built-ins rank flash_attn (30) > triton (20) > cpu (10) > torch_ref (0); a third-party backend declaring a higher `priority`
wins wherever its `check` passes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from weavelm.core.forward import AttentionSpec
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import AttentionBackend, AttentionImpl, NoOptions
from weavelm.errors import PluginError

logger = logging.getLogger("weavelm.attention")


class AutoAttention(AttentionBackend):
    name = "auto"
    description = "Picks the highest-priority installed backend that can run here (flash_attn > triton > cpu > torch_ref)."
    Options = NoOptions
    priority = -(1 << 30)  # never a candidate of itself
    checks_kv_cache_dtype = True  # each candidate's own reasons decide (an fp8 cache skips those that refuse it)

    @classmethod
    def select(cls, options: NoOptions, spec: AttentionSpec,
               candidates: Mapping[str, type[AttentionBackend]]) -> AttentionBackend:
        ranked = sorted(((name, c) for name, c in candidates.items() if c is not cls),
                        key=lambda item: (-item[1].priority, item[0]))
        skipped = []
        for name, candidate in ranked:
            reasons = candidate.reasons(spec, for_auto=True)
            if not reasons:
                logger.info("attention: auto picked %s (priority %d)%s", name, candidate.priority,
                            f"; skipped {skipped}" if skipped else "")
                return candidate(candidate.Options())
            skipped.append(f"{name}: {'; '.join(reasons)}")
        raise PluginError("attention: auto found no backend that can run: " + " | ".join(skipped))

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        raise PluginError("attention: auto is a selector; the engine builds the backend it selects")


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", AutoAttention.name, AutoAttention)
