"""Triton kernels of the `triton` attention backend: paged attention and split-KV reduction (the cache write is
the shared `weavelm.ops.cache_write.reshape_and_cache`).

Imported only by `backend.py` at first use, so listing plugins never imports triton. Cache tensors are one of K or V
in the layout `(num_blocks, block_size, num_kv_heads, head_size)` with a unit last stride (`kv_cache[0]`,
`kv_cache[1]` of the backend's `(2, ...)` cache). Every launcher reads only Python ints and tensor shapes: nothing
syncs with the device, so a forward built from them can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _find_request(qsl_ptr, target, num_reqs, BLOCK_Q: tl.constexpr):
    """Last request i with qsl[i] // BLOCK_Q + i <= target: request i owns q blocks from that index on."""
    left = 0
    right = num_reqs
    while left < right:
        mid = (left + right) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= target:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
                 stride_cb, stride_cs, d, dm, qk_scale, window, first_q, BLOCK_SIZE: tl.constexpr,
                 TILE_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """One online-softmax step over KV positions [tile * TILE_N, (tile + 1) * TILE_N) (base-2 exponents). A masked
    tile hides keys after each query (causal) and, with a window, keys at or before `q_pos - window`. Keys and
    values are converted to q's dtype as loaded (an fp8 cache: its scales are folded into `qk_scale` and the
    output by the caller)."""
    kpos = tile * TILE_N + tl.arange(0, TILE_N)
    kmask = (kpos < kv_end) | (not MASKED)
    if HAS_WINDOW and MASKED:  # keys before every query's window are not loaded: their blocks may be freed
        kmask = kmask & (kpos > first_q - window)
    blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
    off = blk * stride_cb + (kpos % BLOCK_SIZE) * stride_cs + kv_head_off
    k = tl.load(k_cache_ptr + off[None, :] + d[:, None], mask=kmask[None, :] & dm[:, None], other=0.0).to(q.dtype)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if MASKED:
        visible = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
        if HAS_WINDOW:
            visible = visible & (kpos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kmask[:, None] & dm[None, :], other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr, num_reqs, num_heads, qk_scale, v_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, QPK: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Grid (q blocks, kv heads, splits). A program takes BLOCK_Q query tokens of one request times the QPK query
    heads sharing one KV head (BLOCK_M rows), and streams that request's paged KV in TILE_N-token tiles with an
    online softmax in fp32. With NUM_SPLITS > 1 it covers 1/NUM_SPLITS of the tiles and writes unnormalised
    partials (acc, running max m, sum l; base-2 exponent) for `_reduce_splits_kernel`. `v_scale` multiplies the
    output (an fp8 cache's value scale; `qk_scale` carries its key scale). With HAS_WINDOW a query at
    position p sees keys p - window + 1 .. p: tiles wholly before the block's first query's window are never read
    (their blocks may have been freed)."""
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    req = _find_request(qsl_ptr, qb, num_reqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    local_qb = qb - (q_start // BLOCK_Q + req)
    if local_qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_local = local_qb * BLOCK_Q + rows // QPK
    head = kvh * QPK + rows % QPK
    row_ok = (rows < BLOCK_Q * QPK) & (q_local < q_len)
    q_tok = (q_start + q_local).to(tl.int64)
    q_pos = ctx_len + q_local
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD
    q = tl.load(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0)

    kv_end = tl.minimum(seq_len, ctx_len + (local_qb + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    first_q = ctx_len + local_qb * BLOCK_Q
    first_tile = 0  # tiles before it are outside every query's window
    full_lo = 0  # tiles from it on are inside every query's window
    if HAS_WINDOW:
        first_tile = tl.maximum(first_q - window + 1, 0) // TILE_N
        full_lo = tl.cdiv(tl.maximum(kv_end - window, 0), TILE_N)
    tile_lo = first_tile
    tile_hi = num_tiles
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
        tile_lo = first_tile + split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    # tiles wholly at or before the block's first query position (and inside the last query's window) need no
    # mask; the ones before (window edge) and after (causal edge) do
    num_full = (first_q + 1) // TILE_N
    for tile in range(tile_lo, tl.minimum(tile_hi, full_lo)):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr,
                                     kvh * stride_ch, stride_cb, stride_cs, d, dm, qk_scale, window, first_q, BLOCK_SIZE,
                                     TILE_N, PRECISION, True, HAS_WINDOW)
    for tile in range(tl.maximum(tile_lo, full_lo), tl.minimum(tile_hi, num_full)):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr,
                                     kvh * stride_ch, stride_cb, stride_cs, d, dm, qk_scale, window, first_q, BLOCK_SIZE,
                                     TILE_N, PRECISION, False, HAS_WINDOW)
    for tile in range(tl.maximum(tl.maximum(tile_lo, full_lo), num_full), tile_hi):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile, q_pos, kv_end, bt_row, k_cache_ptr, v_cache_ptr,
                                     kvh * stride_ch, stride_cb, stride_cs, d, dm, qk_scale, window, first_q, BLOCK_SIZE,
                                     TILE_N, PRECISION, True, HAS_WINDOW)

    if NUM_SPLITS == 1:
        out = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
        tl.store(out_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])
    else:
        idx = (q_tok * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + idx[:, None] * BLOCK_D + d[None, :], acc * v_scale, mask=row_ok[:, None])
        tl.store(part_m_ptr + idx, m_i, mask=row_ok)
        tl.store(part_l_ptr + idx, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_reqs"])
def _reduce_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, qsl_ptr, num_reqs, num_heads, stride_ot, stride_oh,
    HEAD: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Grid (num_tokens, num_heads): combine the split partials of one (token, head); padded rows get zeros."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    if t < tl.load(qsl_ptr + num_reqs):
        s = (t * num_heads + h) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
        m = tl.load(part_m_ptr + s)
        w = tl.exp2(m - tl.max(m, 0))
        denom = tl.sum(tl.load(part_l_ptr + s) * w, 0)
        acc = tl.load(part_acc_ptr + s[:, None] * BLOCK_D + d[None, :])
        out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dm)


def select_config(decode_only: bool, num_reqs: int, max_query_len: int, max_seq_len: int, num_kv_heads: int,
                  num_sms: int, forced_splits: int = 0) -> dict:
    """Launch parameters from Python ints only (no device sync). Split-KV is used for decode-only batches whose
    (request, kv head) programs would leave the card underfilled (aiming at ~4 programs per multiprocessor, at
    least 256 positions per split); `forced_splits` > 0 overrides the count."""
    if max_query_len >= 64:
        return dict(block_m=64, tile_n=64, num_splits=1, num_warps=4, num_stages=2)
    cfg = dict(block_m=16, tile_n=64, num_splits=1, num_warps=4, num_stages=3)
    if decode_only:
        splits = forced_splits
        if splits == 0:
            programs = max(1, num_reqs * num_kv_heads)
            splits = min(64, _pow2_floor(4 * num_sms // programs), _pow2_floor(max_seq_len // 256))
        cfg["num_splits"] = splits
        if splits == 1:  # long unsplit streams: bigger tiles, shallower pipeline (best on H100, see benchmarks/)
            cfg.update(tile_n=128, num_stages=2)
    return cfg


def _pow2_floor(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    num_reqs: int, scale: float, block_m: int = 16, tile_n: int = 64, num_splits: int = 1,
                    num_warps: int = 4, num_stages: int = 2, sliding_window: int | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Causal paged attention for a flat batch. q/out: (num_tokens, num_heads, head); caches as in the module
    docstring, in q's dtype or fp8 (read as `fp8 * k_scale` / `fp8 * v_scale`); `sliding_window` w: each query
    sees only its last w positions. Rows of `out` past query_start_loc[num_reqs] are left untouched, or zeroed when
    split."""
    num_tokens, num_heads, head = q.shape
    kv_heads = k_cache.shape[2]
    qpk = num_heads // kv_heads
    block_m = max(block_m, triton.next_power_of_2(qpk))
    block_q = block_m // qpk
    block_d = triton.next_power_of_2(head)
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    if num_tokens == 0 or num_reqs == 0:
        return out.zero_()
    num_splits = triton.next_power_of_2(num_splits)
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out
    grid = (num_tokens // block_q + num_reqs, kv_heads, num_splits)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, part_acc, part_m, part_l,
        num_reqs, num_heads, scale * k_scale * LOG2E, v_scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], QPK=qpk, HEAD=head, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE_N=tile_n, NUM_SPLITS=num_splits, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_WINDOW=sliding_window is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_m, part_l, query_start_loc, num_reqs, num_heads, out.stride(0), out.stride(1),
            HEAD=head, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=4 if block_d >= 128 else 2,
        )
    return out
