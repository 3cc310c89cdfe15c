"""Peak-memory profiling of a worst-case step, for sizing the KV cache on CUDA."""

from __future__ import annotations

import numpy as np
import torch

from weavelm.core.forward import CommonAttentionMetadata, ForwardBatch
from weavelm.sample.sampler import SamplingMetadata, sample
from weavelm.utils import cdiv

PROFILE_CHUNK = 512


def profile_run(runner) -> int:
    """Forward `max_num_batched_tokens` tokens (in requests of <= 512) plus a full sampling batch; peak bytes."""
    dev, bs = runner.device, runner.block_size
    total = min(runner.max_num_tokens, runner.max_num_reqs * runner.max_model_len)
    lens = [PROFILE_CHUNK] * (total // PROFILE_CHUNK) + ([total % PROFILE_CHUNK] if total % PROFILE_CHUNK else [])
    blocks_per = cdiv(PROFILE_CHUNK, bs)
    num_layers, _, num_kv_heads, head_size = runner.layout
    shape = runner.attn_backend.kv_cache_shape(len(lens) * blocks_per, bs, num_kv_heads, head_size)
    kv = [torch.zeros(shape, dtype=runner.kv_cache_dtype, device=dev) for _ in range(num_layers)]
    n = len(lens)
    qsl = np.zeros(n + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(lens)
    seq = np.array(lens, dtype=np.int32)
    table = np.arange(n * blocks_per, dtype=np.int32).reshape(n, blocks_per)
    positions = np.concatenate([np.arange(x) for x in lens])
    req = np.repeat(np.arange(n), lens)
    slots = table[req, positions // bs].astype(np.int64) * bs + positions % bs
    common = CommonAttentionMetadata(
        torch.from_numpy(qsl).to(dev), torch.from_numpy(seq).to(dev), torch.from_numpy(table).to(dev),
        torch.from_numpy(slots).to(dev), torch.from_numpy(qsl), torch.from_numpy(seq), n, total, max(lens),
        max(lens), bs)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    fb = ForwardBatch(runner.attn_builder.build(common), kv, runner.attn_impls)
    ids = torch.zeros(total, dtype=torch.long, device=dev)
    hidden = runner.run_model(ids, torch.from_numpy(positions).to(dev), fb)
    if hidden is None:  # a pipeline stage before the last (its step's output went to the next stage)
        return _peak(dev)
    rows = min(runner.max_num_reqs, total)
    logits = runner.bundle.model.compute_logits(hidden[:rows]).float()
    one = torch.ones(rows, device=dev)
    sm = SamplingMetadata(one, torch.full((rows,), 50, device=dev, dtype=torch.long), one * 0.9, one * 0.0,
                          False, True, True, False, {}, True)
    sample(logits, sm)
    del hidden, logits, kv
    return _peak(dev)


def _peak(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev)
