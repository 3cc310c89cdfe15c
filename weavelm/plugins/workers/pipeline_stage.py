"""A model runner's link to its neighbour pipeline stages: receive the previous stage's `IntermediateTensors`, run
this stage's layers, send the result on.

Every stage sees the same `SchedulerOutput`, so the receiving side knows the step's token count and allocates its
buffers (`model.make_empty_intermediate_tensors`) without any shape message. Sends are asynchronous (`isend`): a
stage starts its next micro-batch while the last one travels; a stage waits for its previous sends before issuing
new ones, so at most one step's tensors are in flight per link. Each step's compute span (after the receive, before
the send) is kept for the pipeline timeline (`benchmarks/pp_timeline.py`); on CUDA a span is the host's share
(launches), since the stage does not wait for its device.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from weavelm.distributed import TensorParallelGroup
from weavelm.layers.pipeline import IntermediateTensors

TIMELINE_STEPS = 4096  # compute spans kept per stage


@dataclass(frozen=True)
class StageSpan:
    """One step on one stage: `start`/`end` of its compute (time.perf_counter, seconds; the wait for the previous
    stage excluded), `recv_wait` seconds spent receiving before it, `num_tokens` the step's tokens."""

    start: float
    end: float
    recv_wait: float
    num_tokens: int


class PipelineLink:
    """Runs one step of this rank's stage. `forward` returns the last stage's hidden states, None elsewhere."""

    def __init__(self, pp: TensorParallelGroup, model: Any, dtype: torch.dtype, device: torch.device):
        if not getattr(model, "supports_pp", False):
            raise TypeError(f"{type(model).__name__} does not support pipeline parallelism")
        self.pp, self.model, self.dtype, self.device = pp, model, dtype, device
        self.is_first, self.is_last = pp.rank == 0, pp.rank == pp.world_size - 1
        self._sends: list[tuple[Any, torch.Tensor]] = []  # (work, tensor kept alive until sent)
        self.timeline: deque[StageSpan] = deque(maxlen=TIMELINE_STEPS)

    @classmethod
    def build(cls, pp: TensorParallelGroup, model: Any, dtype: torch.dtype,
              device: torch.device) -> PipelineLink | None:
        """The link of a rank in a pipeline of several stages; None with one stage."""
        return cls(pp, model, dtype, device) if pp.world_size > 1 else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor | None:
        waited = time.perf_counter()
        intermediate = None
        if not self.is_first:
            intermediate = self.model.make_empty_intermediate_tensors(input_ids.shape[0], self.dtype, self.device)
            for _, t in intermediate.items():
                self.pp.recv(t, self.pp.rank - 1)
        start = time.perf_counter()
        out = self.model(input_ids, positions, batch, intermediate_tensors=intermediate)
        if self.is_last:
            self._record(waited, start, input_ids.shape[0])
            return out
        if not isinstance(out, IntermediateTensors):
            raise TypeError(f"pipeline stage {self.pp.rank} of {type(self.model).__name__} returned "
                            f"{type(out).__name__}, not IntermediateTensors")
        self._record(waited, start, input_ids.shape[0])
        self.wait_sends()
        for _, t in out.items():
            t = t.contiguous()
            self._sends.append((self.pp.isend(t, self.pp.rank + 1), t))
        return None

    def wait_sends(self) -> None:
        """Block until this stage's earlier sends completed."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    def _record(self, waited: float, start: float, num_tokens: int) -> None:
        self.timeline.append(StageSpan(start, time.perf_counter(), start - waited, num_tokens))

    def take_timeline(self) -> list[StageSpan]:
        """The spans recorded since the last call (oldest first), then forgotten."""
        spans = list(self.timeline)
        self.timeline.clear()
        return spans
