"""Shortest-prompt-first: admit the waiting request with the fewest prompt tokens (ties by arrival).

Reuses weavelm's scheduling mechanics and changes only the admission policy.
"""

from __future__ import annotations

from weavelm.plugin import BaseScheduler, hookimpl

WEAVELM_API_VERSION = "2.0"


class ShortestPromptFirst(BaseScheduler):
    name = "shortest_prompt"
    description = "Admits the waiting request with the shortest prompt first (example plugin)."

    def next_waiting_index(self) -> int:
        return min(range(len(self.waiting)),
                   key=lambda i: (self.waiting[i].num_prompt_tokens, self.waiting[i].arrival_time))


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("scheduler", ShortestPromptFirst.name, ShortestPromptFirst)
