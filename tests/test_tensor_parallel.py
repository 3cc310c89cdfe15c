"""Tensor parallelism on CPU in fp32.

- Layer math (one process plays each rank in turn with collectives left out, the test sums / concatenates what the
  ranks hold): QKV under GQA, MQA and replicated KV heads, merged gate/up, row-parallel with bias, vocabulary shards
  with padding, at tp=2 and tp=4.
- Loaders: every format's lazy shard reads (safetensors runs, pt mmap views, GGUF rows, tensorizer whole tensors)
  give a rank exactly the weights that narrowing the whole tensors gives.
- Models: 2 ranks spawned over gloo build each fixture (Llama, Qwen2, Qwen3, one KV head, tied embeddings)
  with their `TensorParallelGroup`, load their shards from safetensors, and run a prefill batch plus greedy decode
  steps through the paged cache with `torch_ref`: logits equal the single-rank model's to fp32 rounding and the
  greedy tokens are identical.
- Layers with the real collectives on 4 gloo ranks (replicated KV heads, padded vocabulary shards, all-reduce and
  all-gather order) against the same computation on whole weights.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tests.model_fixtures import TP_FIXTURES, build_tiny_model
from weavelm.distributed import TensorParallelGroup
from weavelm.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from weavelm.utils import cdiv

PROMPTS = [[5, 17, 42, 99, 3], list(range(10, 21)), [7, 300, 8], list(range(100, 117))]
DECODE_STEPS = 4
BLOCK_SIZE = 16


@dataclass(frozen=True)
class LocalGroup(TensorParallelGroup):
    """One rank's view without the collectives: each rank's partial result is returned as is."""

    def all_reduce(self, t):
        return t

    def all_gather(self, t, dim=-1):
        return t


# -- layer math (single process) ------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
def test_qkv_shards_by_heads_and_replicates_kv_heads(world, num_kv_heads):
    hidden, head_dim, num_heads = 32, 4, 8
    g = torch.Generator().manual_seed(0)
    wq, wk, wv = (torch.randn(n * head_dim, hidden, generator=g) for n in (num_heads, num_kv_heads, num_kv_heads))
    bq, bk, bv = (torch.randn(w.shape[0], generator=g) for w in (wq, wk, wv))
    x = torch.randn(3, hidden, generator=g)
    q_full = (x @ wq.T + bq).view(3, num_heads, head_dim)
    k_full = (x @ wk.T + bk).view(3, num_kv_heads, head_dim)
    v_full = (x @ wv.T + bv).view(3, num_kv_heads, head_dim)
    for rank in range(world):
        layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, True, LocalGroup(rank, world))
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.weight.weight_loader(layer.weight, w, sid)
            layer.bias.weight_loader(layer.bias, b, sid)
        assert layer.num_heads == num_heads // world
        assert layer.num_kv_heads == max(1, num_kv_heads // world)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        q, k, v = (t.reshape(3, -1, head_dim) for t in (q, k, v))
        group = layer.num_heads // layer.num_kv_heads
        for j in range(layer.num_heads):  # each local query head meets the KV head its global index uses
            h = rank * layer.num_heads + j
            kv = h // (num_heads // num_kv_heads)
            torch.testing.assert_close(q[:, j], q_full[:, h])
            torch.testing.assert_close(k[:, j // group], k_full[:, kv])
            torch.testing.assert_close(v[:, j // group], v_full[:, kv])


@pytest.mark.parametrize("world", [2, 4])
def test_merged_column_and_row_parallel_sum_to_the_full_mlp(world):
    hidden, inter = 16, 32
    g = torch.Generator().manual_seed(1)
    gate, up, down = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), \
        torch.randn(hidden, inter, generator=g)
    gate_b, up_b, down_b = torch.randn(inter, generator=g), torch.randn(inter, generator=g), torch.randn(hidden)
    x = torch.randn(5, hidden, generator=g)
    h_full = F.silu(x @ gate.T + gate_b) * (x @ up.T + up_b)
    total = torch.zeros(5, hidden)
    for rank in range(world):
        tp = LocalGroup(rank, world)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], True, tp)
        for i, (w, b) in enumerate(((gate, gate_b), (up, up_b))):
            gate_up.weight.weight_loader(gate_up.weight, w, i)
            gate_up.bias.weight_loader(gate_up.bias, b, i)
        row = RowParallelLinear(inter, hidden, True, tp)
        row.weight.weight_loader(row.weight, down)
        row.bias.weight_loader(row.bias, down_b)
        g_r, u_r = gate_up(x).chunk(2, dim=-1)
        h_r = F.silu(g_r) * u_r
        per = inter // world
        torch.testing.assert_close(h_r, h_full[:, rank * per:(rank + 1) * per])
        total += row(h_r)
    torch.testing.assert_close(total, h_full @ down.T + down_b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_shards_pad_the_last_rank_and_sum_to_the_full_embedding(world):
    vocab, dim = 10, 6
    weight = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 3, 9, 5, 2, 7, 9])
    hidden = torch.randn(4, dim)
    total, shards = torch.zeros(len(ids), dim), []
    for rank in range(world):
        emb = VocabParallelEmbedding(vocab, dim, LocalGroup(rank, world))
        emb.weight.weight_loader(emb.weight, weight)
        real = emb.vocab_end - emb.vocab_start
        assert emb.weight.shape[0] == cdiv(vocab, world) and not emb.weight[real:].any()
        total += emb(ids)
        shards.append(emb.compute_logits(hidden))  # this rank's columns (the gather is left out)
    torch.testing.assert_close(total, F.embedding(ids, weight))
    torch.testing.assert_close(torch.cat(shards, dim=-1)[:, :vocab], hidden @ weight.T)


def test_a_checkpoint_tensor_of_the_wrong_full_shape_is_named():
    layer = RowParallelLinear(8, 4, False, LocalGroup(1, 2))
    with pytest.raises(ValueError, match=r"has shape \(4, 6\), the model expects \(4, 8\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(4, 6))


def test_group_validates_rank_and_divisibility():
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        TensorParallelGroup(2, 2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) is not divisible by the tensor-parallel size"):
        QKVParallelLinear(24, 4, 6, 2, False, LocalGroup(0, 4))
    assert TensorParallelGroup(1, 4).shard_range(8) == (2, 4)


# -- loaders: lazy shard reads equal narrowed whole tensors (single process) ----------------------------------

LOADER_FORMATS = ("safetensors", "safetensors_sharded", "pt", "tensorizer", "gguf_F32", "gguf_F16", "gguf_Q4_K",
                  "convert_gguf_Q8_0")


@pytest.mark.parametrize("fmt", LOADER_FORMATS)
def test_each_format_reads_a_ranks_shard_lazily(fmt):
    from tests.gguf_fixtures import loader_of, model_zoo
    from weavelm.core.model_size import check_model_size
    from weavelm.core.registry import Registry

    path = model_zoo("llama")[fmt]  # 16 heads, 4 KV heads: tp=8 replicates KV heads
    registry = Registry.load()
    loader_cls = registry.get("loader", loader_of(fmt))
    loader = loader_cls(loader_cls.Options())
    cfg = loader.load_hf_config(path)
    model_cls = registry.find_model(cfg.architectures[0])
    for world, rank in ((2, 1), (8, 5)):
        tp = LocalGroup(rank, world)
        size = check_model_size(model_cls, cfg, torch.float32, torch.device("cpu"), loader, path, tp)
        lazy, eager = model_cls(cfg, tp), model_cls(cfg, tp)
        assert size.num_params == loader.checkpoint_num_elements(path)  # the whole model, not the shard
        assert size.num_bytes < size.num_params * 4
        loader.load_weights(lazy, path)  # LazyTensors: only the shard is read
        eager.load_weights(loader.iter_weights(path))  # whole tensors, narrowed
        got, want = dict(lazy.named_parameters()), dict(eager.named_parameters())
        for name, p in want.items():
            assert torch.equal(got[name], p), (fmt, world, rank, name)


# -- whole models over gloo (spawned ranks) ---------------------------------------------------------------------

class PagedRun:
    """Drives a model over a paged KV cache with `torch_ref`: one contiguous run of blocks per request."""

    def __init__(self, model, num_reqs: int, max_len: int):
        from weavelm.core.registry import Registry

        backend_cls = Registry.load().get("attention", "torch_ref")
        backend = backend_cls(backend_cls.Options())
        num_layers, num_heads, num_kv_heads, head_size = model.attention_layout()
        self.blocks_per_req = cdiv(max_len, BLOCK_SIZE)
        shape = backend.kv_cache_shape(num_reqs * self.blocks_per_req, BLOCK_SIZE, num_kv_heads, head_size)
        self.model, self.builder = model, backend.make_builder(torch.device("cpu"))
        self.kv_caches = [torch.zeros(shape) for _ in range(num_layers)]
        self.impls = [backend.make_impl(num_heads, num_kv_heads, head_size, head_size ** -0.5)
                      for _ in range(num_layers)]
        self.block_table = torch.arange(num_reqs * self.blocks_per_req, dtype=torch.int32).view(num_reqs, -1)
        self.computed = [0] * num_reqs

    def step(self, new_tokens: list[list[int]]) -> torch.Tensor:
        """Feed each request its new tokens; the logits of every new token (num_tokens, vocab)."""
        from weavelm.core.forward import CommonAttentionMetadata, ForwardBatch

        lens = [len(t) for t in new_tokens]
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(self.computed, lens)])
        rows = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
        slots = self.block_table[rows, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
        query_start_loc = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        self.computed = [c + n for c, n in zip(self.computed, lens)]
        seq_lens = torch.tensor(self.computed, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=self.block_table, slot_mapping=slots,
            query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens, num_reqs=len(lens),
            num_actual_tokens=int(sum(lens)), max_query_len=max(lens), max_seq_len=max(self.computed),
            block_size=BLOCK_SIZE)
        batch = ForwardBatch(self.builder.build(common), self.kv_caches, self.impls)
        ids = torch.tensor([t for toks in new_tokens for t in toks])
        return self.model.compute_logits(self.model(ids, positions, batch)).float()


@torch.inference_mode()
def greedy_run(path: str, tp: TensorParallelGroup) -> dict[str, torch.Tensor]:
    """Load `path` (safetensors) as `tp`'s rank; prefill PROMPTS as one batch, then DECODE_STEPS greedy steps."""
    from weavelm.core.model_size import build_model, check_model_size
    from weavelm.core.registry import Registry

    registry = Registry.load()
    loader_cls = registry.get("loader", "safetensors")
    loader = loader_cls(loader_cls.Options())
    cfg = loader.load_hf_config(path)
    model_cls = registry.find_model(cfg.architectures[0])
    check_model_size(model_cls, cfg, torch.float32, torch.device("cpu"), loader, path, tp)
    model = build_model(model_cls, cfg, tp)
    loader.load_weights(model, path)
    run = PagedRun(model.eval(), len(PROMPTS), max(map(len, PROMPTS)) + DECODE_STEPS)
    prefill = run.step(PROMPTS)
    last = torch.tensor([len(p) for p in PROMPTS]).cumsum(0) - 1
    tokens, decode = [prefill[last].argmax(-1)], []
    for _ in range(DECODE_STEPS - 1):
        decode.append(run.step([[t] for t in tokens[-1].tolist()]))
        tokens.append(decode[-1].argmax(-1))
    return {"prefill": prefill, "decode": torch.stack(decode), "tokens": torch.stack(tokens, dim=1)}


def _rank_main(rank: int, world: int, port: int, paths: dict[str, str], out_dir: str) -> None:
    from weavelm.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    tp = init_distributed(rank, world, f"tcp://127.0.0.1:{port}", "gloo")
    try:
        for name, path in paths.items():
            torch.save(greedy_run(path, tp), os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        destroy_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp_models")
    return {name: build_tiny_model(arch, str(root / name), seed=20 + i, **kw)
            for i, (name, (arch, kw)) in enumerate(TP_FIXTURES.items())}


@pytest.fixture(scope="module")
def references(tp_paths) -> dict[str, dict[str, torch.Tensor]]:
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: greedy_run(path, TensorParallelGroup()) for name, path in tp_paths.items()}
    finally:
        torch.set_num_threads(torch_threads)


@pytest.fixture(scope="module")
def tp_outputs(tp_paths, tmp_path_factory) -> tuple[int, str]:
    """Spawn 2 gloo ranks once; each writes every fixture's results."""
    import torch.multiprocessing as mp

    world, out_dir = 2, str(tmp_path_factory.mktemp("tp2"))
    try:
        mp.spawn(_rank_main, args=(world, free_port(), tp_paths, out_dir), nprocs=world, join=True)
    except Exception:  # the free port can be taken between free_port() and the ranks binding it: once more
        mp.spawn(_rank_main, args=(world, free_port(), tp_paths, out_dir), nprocs=world, join=True)
    return world, out_dir


@pytest.mark.parametrize("name", list(TP_FIXTURES))
def test_tensor_parallel_matches_one_rank(name, tp_outputs, references):
    world, out_dir = tp_outputs
    ref = references[name]
    for rank in range(world):  # every rank ends with the full logits
        got = torch.load(os.path.join(out_dir, f"{name}-rank{rank}.pt"))
        torch.testing.assert_close(got["prefill"], ref["prefill"], atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(got["decode"], ref["decode"], atol=5e-5, rtol=1e-5)
        assert got["tokens"].tolist() == ref["tokens"].tolist()
        assert torch.equal(got["prefill"].argmax(-1), ref["prefill"].argmax(-1))


def _layers_rank_main(rank: int, world: int, port: int) -> None:
    """Embedding -> QKV -> (a per-head product standing in for attention) -> o_proj -> tied head, with the real
    collectives, against the same computation on whole weights in this process."""
    from weavelm.distributed import destroy_distributed, init_distributed
    from weavelm.layers import ParallelLMHead

    torch.set_num_threads(1)
    tp = init_distributed(rank, world, f"tcp://127.0.0.1:{port}", "gloo")
    vocab, hidden, head_dim, num_heads, num_kv_heads = 10, 16, 4, 8, 2  # 2 KV heads on 4 ranks: replicated
    g = torch.Generator().manual_seed(0)
    emb_w = torch.randn(vocab, hidden, generator=g)
    wq, wk, wv = (torch.randn(n * head_dim, hidden, generator=g) for n in (num_heads, num_kv_heads, num_kv_heads))
    wo, bo = torch.randn(hidden, num_heads * head_dim, generator=g), torch.randn(hidden, generator=g)
    ids = torch.tensor([0, 9, 3, 4, 7, 2])
    try:
        emb, head = VocabParallelEmbedding(vocab, hidden, tp), ParallelLMHead(vocab, hidden, tp)
        qkv = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, False, tp)
        o_proj = RowParallelLinear(num_heads * head_dim, hidden, True, tp)
        for layer in (emb, head):
            layer.weight.weight_loader(layer.weight, emb_w)
        for sid, w in (("q", wq), ("k", wk), ("v", wv)):
            qkv.weight.weight_loader(qkv.weight, w, sid)
        o_proj.weight.weight_loader(o_proj.weight, wo)
        o_proj.bias.weight_loader(o_proj.bias, bo)

        def mix(q, k, v, heads, kv_heads):  # each query head times its KV head's k and v
            n, group = q.shape[0], heads // kv_heads
            k = k.view(n, kv_heads, head_dim).repeat_interleave(group, 1)
            v = v.view(n, kv_heads, head_dim).repeat_interleave(group, 1)
            return (q.view(n, heads, head_dim) * k * v).reshape(n, heads * head_dim)

        x = emb(ids)
        q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        logits = head.compute_logits(o_proj(mix(q, k, v, qkv.num_heads, qkv.num_kv_heads)))
        x_full = F.embedding(ids, emb_w)
        y_full = mix(x_full @ wq.T, x_full @ wk.T, x_full @ wv.T, num_heads, num_kv_heads) @ wo.T + bo
        torch.testing.assert_close(x, x_full)
        torch.testing.assert_close(logits, y_full @ emb_w.T, atol=1e-4, rtol=1e-4)
    finally:
        destroy_distributed()


def test_layers_with_real_collectives_on_four_ranks():
    import torch.multiprocessing as mp

    mp.spawn(_layers_rank_main, args=(4, free_port()), nprocs=4, join=True)

