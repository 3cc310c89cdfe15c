"""CUDA graphs for decode steps: one graph per padded batch size, static input buffers, one memory pool.

A decode-only step (every request has exactly one new token) of n requests replays the smallest captured graph of
size >= n. Padded rows write no KV (slot -1) and attend to one position of block 0, so they stay finite; their
logits are never read. Prefill and mixed steps run eagerly. A component whose kernels vary by step declares its
variants (`weavelm.core.graph_variants.CudaGraphVariants`); each size is captured once per variant. The LoRA
manager declares two: with the LoRA kernels (replayed when a request in the step has an adapter) and without
(steps on the base model pay nothing for LoRA).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

from weavelm.core.forward import CommonAttentionMetadata, ForwardBatch
from weavelm.core.graph_variants import CudaGraphVariants

logger = logging.getLogger("weavelm.cuda_graphs")


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_bs (at most 512)."""
    max_bs = min(max_bs, 512)
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes and sizes[-1] < max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    """Captured decode forwards (model + logits) of a runner, replayed with this step's inputs."""

    def __init__(self, runner, max_bs: int, variants: CudaGraphVariants | None = None):
        self.runner = runner
        self.variants = variants or CudaGraphVariants()
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1] if self.sizes else 0
        dev, b = runner.device, self.max_bs
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(b, runner.max_blocks_per_req, dtype=torch.int32, device=dev)
        # (size, variant) -> (graph, its hidden-state and logits outputs)
        self.graphs: dict[tuple[int, Hashable], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _common(self, b: int) -> CommonAttentionMetadata:
        r = self.runner
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1], seq_lens=self.seq_lens[:b],
            block_table=self.block_table[:b], slot_mapping=self.slot_mapping[:b],
            query_start_loc_cpu=torch.arange(b + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((b,), r.max_model_len, dtype=torch.int32), num_reqs=b, num_actual_tokens=b,
            max_query_len=1, max_seq_len=r.max_model_len, block_size=r.block_size)

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.runner
        fb = ForwardBatch(r.attn_builder.build(self._common(b)), r.kv_caches, r.attn_impls)
        hidden = r.run_model(self.input_ids[:b], self.positions[:b], fb)
        return hidden, r.bundle.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        variants = self.variants.graph_variants()
        try:
            with torch.cuda.stream(stream):
                for variant in variants:
                    self.variants.set_capture_variant(variant)
                    for b in reversed(self.sizes):
                        self._forward(b)  # warm up: triton autotuning / compilation outside the graph
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool, stream=stream):
                            hidden, logits = self._forward(b)
                        self.graphs[(b, variant)] = (graph, hidden, logits)
        finally:
            self.variants.set_capture_variant(None)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s, variants %s)", len(self.graphs), self.sizes,
                    variants)

    def can_run(self, common: CommonAttentionMetadata) -> bool:
        return common.max_query_len == 1 and common.num_reqs <= self.max_bs and bool(self.graphs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, common: CommonAttentionMetadata
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (n, hidden_size) and logits (n, vocab) of a decode step of n requests."""
        n = common.num_reqs
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(common.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(common.seq_lens, non_blocking=True)
        w = common.block_table.shape[1]
        self.block_table[:n, :w].copy_(common.block_table, non_blocking=True)
        if b > n:
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(1)
            self.block_table[n:b, 0].zero_()
        graph, hidden, logits = self.graphs[(b, self.variants.graph_variant())]
        graph.replay()
        return hidden[:n], logits[:n]
