"""The runner's multimodal step (vLLM's `_execute_mm_encoder` and `_gather_mm_embeddings`): run the encoders the
scheduler scheduled, keep their outputs until the scheduler frees them, and build `inputs_embeds` for a step whose
chunks cover placeholder positions. Used by the paged runner for models that satisfy `SupportsMultiModal`."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from weavelm.core.multimodal import MultiModalFeature, batch_mm_kwargs, uses_mrope
from weavelm.core.outputs import SchedulerOutput


class EncoderRunner:
    """Per-request multimodal items and the encoder cache ({(req_id, item index): (num_embeds, hidden)})."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.features: dict[str, list[MultiModalFeature]] = {}
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        self.uses_mrope = uses_mrope(model)
        self.mrope: dict[str, tuple[torch.Tensor, int]] = {}  # req_id -> (prompt positions (3, L), delta)

    def update(self, scheduler_output: SchedulerOutput) -> None:
        """Take the step's new requests' items; drop the outputs the scheduler freed and finished requests'."""
        for key in scheduler_output.free_encoder_input_ids:
            self.cache.pop(tuple(key), None)
        finished = scheduler_output.finished_req_ids
        if finished and (self.features or self.mrope):
            for rid in finished:
                self.mrope.pop(rid, None)
                for index in range(len(self.features.pop(rid, ()))):
                    self.cache.pop((rid, index), None)
        for new in scheduler_output.scheduled_new_reqs:
            if new.mm_features:
                self.features[new.req_id] = new.mm_features
            if self.uses_mrope:
                positions, delta = self.model.get_mrope_input_positions(list(new.prompt_token_ids),
                                                                        list(new.mm_features or ()))
                self.mrope[new.req_id] = (positions.to(torch.int64).cpu(), int(delta))

    def execute_encoders(self, scheduler_output: SchedulerOutput) -> None:
        """Run the scheduled items' encoders, batched per modality, into the cache."""
        groups: dict[str, list[tuple[str, int, MultiModalFeature]]] = defaultdict(list)
        for rid, indices in scheduler_output.scheduled_encoder_inputs.items():
            features = self.features[rid]
            for index in indices:
                groups[features[index].modality].append((rid, index, features[index]))
        for items in groups.values():
            kwargs = batch_mm_kwargs([f.data for _, _, f in items], self.device, self.dtype)
            outputs = self.model.get_multimodal_embeddings(**kwargs)
            assert len(outputs) == len(items), f"{len(outputs)} encoder outputs for {len(items)} items"
            for (rid, index, feature), out in zip(items, outputs):
                assert out.shape[0] == feature.num_embeds, \
                    f"item {index} of {rid}: {out.shape[0]} embeddings for {feature.num_embeds} placeholders"
                self.cache[(rid, index)] = out

    def gather(self, req_ids: list[str], num_computed: np.ndarray, num_scheduled: np.ndarray
               ) -> tuple[list[int], list[torch.Tensor]]:
        """The flat token positions of this step that are placeholders, and their embeddings (a chunk that covers
        part of a run takes the matching rows of the item's output)."""
        positions: list[int] = []
        embeds: list[torch.Tensor] = []
        query_start = 0
        for row, rid in enumerate(req_ids):
            start, n = int(num_computed[row]), int(num_scheduled[row])
            features = self.features.get(rid)
            if features:
                end = start + n
                for index, feature in enumerate(features):
                    offset, run_end = feature.placeholder.offset, feature.placeholder.end
                    if offset >= end:
                        break
                    if run_end <= start:
                        continue
                    a, b = max(start, offset), min(end, run_end)
                    out = self.cache.get((rid, index))
                    assert out is not None, f"no encoder output for item {index} of {rid} (scheduler bug)"
                    positions.extend(range(query_start + a - start, query_start + b - start))
                    embeds.append(out[a - offset:b - offset])
            query_start += n
        return positions, embeds

    def mrope_positions(self, req_ids: list[str], num_computed: np.ndarray, num_scheduled: np.ndarray,
                        device: torch.device) -> torch.Tensor:
        """(3, total tokens) M-RoPE positions of this step's tokens, row by row: the prompt's from
        `get_mrope_input_positions`, later ones p + delta."""
        parts = []
        for row, rid in enumerate(req_ids):
            start, end = int(num_computed[row]), int(num_computed[row] + num_scheduled[row])
            prompt, delta = self.mrope[rid]
            length = prompt.shape[1]
            if start < length:
                parts.append(prompt[:, start:min(end, length)])
            if end > length:
                parts.append((torch.arange(max(start, length), end) + delta).expand(3, -1))
        return torch.cat(parts, dim=1).to(device)

    def preprocess(self, scheduler_output: SchedulerOutput, req_ids: list[str], num_computed: np.ndarray,
                   input_ids: torch.Tensor) -> torch.Tensor | None:
        """The step's `inputs_embeds`: text embeddings with the placeholder positions overwritten by encoder
        outputs; None when no scheduled token is a placeholder (the model embeds `input_ids` itself)."""
        if scheduler_output.scheduled_encoder_inputs:
            self.execute_encoders(scheduler_output)
        if not self.features:
            return None
        counts = scheduler_output.num_scheduled_tokens
        num_scheduled = np.fromiter((counts[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        positions, embeds = self.gather(req_ids, num_computed, num_scheduled)
        if not positions:
            return None
        inputs_embeds = self.model.get_input_embeddings(input_ids)
        index = torch.tensor(positions, dtype=torch.long, device=inputs_embeds.device)
        inputs_embeds[index] = torch.cat(embeds).to(inputs_embeds.dtype)
        return inputs_embeds
