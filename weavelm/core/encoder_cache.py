"""The scheduler's side of multimodal encoder work (vLLM's `EncoderCacheManager` and the encoder part of
`_try_schedule_encoder_inputs`).

An item's encoder runs in the step whose chunk first reaches its placeholder run; its output stays in the runner's
encoder cache until the request's computed tokens pass the run's end, so a run split across chunks is served from
the cache. Two budgets, both counted in encoder output tokens (= placeholder tokens): the encoder compute budget
of one step (`max_num_encoder_input_tokens`) and the cache's capacity (`encoder_cache_size`). When an item does
not fit, the chunk stops right before its run, so no chunk ever needs an encoder output the runner lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from weavelm.core.request import Request


class EncoderCacheManager:
    """Which items' encoder outputs the runner holds, and the space they take. `take_freed()` returns the
    `(req_id, index)` pairs released since the last call, for `SchedulerOutput.free_encoder_input_ids`."""

    def __init__(self, cache_size: int):
        self.cache_size = cache_size
        self.num_free = cache_size
        self.cached: dict[str, dict[int, int]] = {}  # req_id -> {item index: its tokens}
        self._freed: list[tuple[str, int]] = []

    def has(self, request_id: str, index: int) -> bool:
        return index in self.cached.get(request_id, ())

    def can_allocate(self, num_tokens: int) -> bool:
        return num_tokens <= self.num_free

    def allocate(self, request_id: str, index: int, num_tokens: int) -> None:
        assert num_tokens <= self.num_free, "allocate() without can_allocate()"
        self.cached.setdefault(request_id, {})[index] = num_tokens
        self.num_free -= num_tokens

    def free_input(self, request_id: str, index: int) -> None:
        items = self.cached.get(request_id)
        if items is None or index not in items:
            return
        self.num_free += items.pop(index)
        self._freed.append((request_id, index))
        if not items:
            del self.cached[request_id]

    def free_computed(self, request: Request) -> None:
        """Release the items whose placeholder runs lie wholly within the request's computed tokens."""
        items = self.cached.get(request.request_id)
        if not items:
            return
        done = request.num_computed_tokens
        for index in [i for i in items if request.mm_features[i].placeholder.end <= done]:
            self.free_input(request.request_id, index)

    def free(self, request_id: str) -> None:
        """Release every item of a request (finished or preempted)."""
        for index in list(self.cached.get(request_id, ())):
            self.free_input(request_id, index)

    def forget(self, request_id: str) -> None:
        """Release a finished request's items without reporting them (the runner drops finished requests)."""
        self.num_free += sum(self.cached.pop(request_id, {}).values())

    def take_freed(self) -> list[tuple[str, int]]:
        freed, self._freed = self._freed, []
        return freed


@dataclass
class EncoderPlan:
    """`plan_encoder_inputs`' answer: the tokens to schedule (maybe fewer than asked), the items whose encoder runs
    for them and the encoder tokens that costs."""

    num_tokens: int
    items: list[int]
    cost: int


NO_ENCODER_WORK = EncoderPlan(0, [], 0)


def plan_encoder_inputs(request: Request, num_computed: int, num_tokens: int, budget: int,
                        cache: EncoderCacheManager) -> EncoderPlan:
    """The encoder work a chunk of `num_tokens` tokens from `num_computed` needs: every item whose placeholder run
    overlaps the chunk and is neither computed nor cached. An item that exceeds the step's encoder `budget` or the
    cache's free space cuts the chunk right before its run (possibly to 0 tokens)."""
    end = num_computed + num_tokens
    items: list[int] = []
    cost = 0
    for index, feature in enumerate(request.mm_features):
        start, length = feature.placeholder.offset, feature.placeholder.length
        if start >= end:
            break
        if start + length <= num_computed or cache.has(request.request_id, index):
            continue
        if cost + length > budget or not cache.can_allocate(cost + length):
            return EncoderPlan(max(0, start - num_computed), items, cost)
        items.append(index)
        cost += length
    return EncoderPlan(num_tokens, items, cost)


def check_encoder_limits(request: Request, max_encoder_tokens: int, cache_size: int,
                         chunked_prefill: bool = True) -> str | None:
    """Why the request's items can never be encoded under these limits, or None. Without chunked prefill a prompt
    runs in one step, so all its items must fit the limits together."""
    limit = min(max_encoder_tokens, cache_size)
    features = request.mm_features or ()
    for index, feature in enumerate(features):
        if feature.num_embeds > limit:
            return (f"multi_modal_data: {feature.modality} {index} needs {feature.num_embeds} encoder tokens but "
                    f"the encoder budget is {limit} (scheduler.max_num_encoder_input_tokens="
                    f"{max_encoder_tokens}, scheduler.encoder_cache_size={cache_size}); send a smaller "
                    f"{feature.modality} or raise both limits")
    total = sum(f.num_embeds for f in features)
    if not chunked_prefill and total > limit:
        return (f"multi_modal_data: the prompt's items need {total} encoder tokens in its one prefill step but the "
                f"encoder budget is {limit}; send fewer images, raise scheduler.max_num_encoder_input_tokens and "
                f"scheduler.encoder_cache_size, or enable chunked prefill")
    return None
