"""KV block accounting: unit tests of the pool and the manager, and property tests that drive random add /
schedule / finish / abort sequences (preemption comes from the small pools) through the schedulers and the block
pool."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.scheduler_utils import Driver, FakeRunner, fake_token, make_request, make_scheduler, scheduler_names
from weavelm.core import kv_cache
from weavelm.core.kv_cache import BlockPool, KVCacheManager
from weavelm.core.request import RequestStatus

BS = 4


def admit(kv: KVCacheManager, req, compute: bool = True) -> list[int]:
    """Allocate a new request's whole prompt (taking prefix hits) and, optionally, mark it computed."""
    hits = kv.get_computed_blocks(req)
    ids = kv.allocate_slots(req, req.num_tokens - hits.num_tokens, hits)
    assert ids is not None
    req.num_computed_tokens = req.num_tokens if compute else hits.num_tokens
    if compute:
        kv.cache_computed(req)
    kv.check_invariants()
    return ids


def test_allocate_and_free_keep_counts():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", 9)
    assert kv.blocks_needed(a, 9) == 3 and kv.can_allocate(a, 9)
    assert len(admit(kv, a)) == 3
    assert kv.num_free_blocks == 7 and kv.usage == pytest.approx(0.3)
    assert kv.allocate_slots(a, 3) == []  # positions 9..11 fit in the third block
    a.num_computed_tokens = 12
    assert len(kv.allocate_slots(a, 1)) == 1
    assert kv.allocate_slots(make_request("huge", 40), 40) is None  # does not fit: nothing changes
    kv.check_invariants()
    assert kv.num_free_blocks == 6
    kv.free(a)
    kv.check_invariants()
    assert kv.num_free_blocks == 10 and kv.usage == 0.0


def test_double_free_is_caught():
    pool = BlockPool(4, enable_caching=True)
    [b] = pool.take(1)
    pool.free([b])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([b])


def test_shared_prefix_ref_counts_and_hit_rate():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", 14)
    ids_a = admit(kv, a)
    b = make_request("b", a.prompt_token_ids[:12] + [5, 6])
    hits = kv.get_computed_blocks(b)
    assert hits.num_tokens == 12 and [blk.block_id for blk in hits.blocks] == ids_a[:3]
    ids_b = admit(kv, b)
    assert ids_b[:3] == ids_a[:3] and ids_b[3] != ids_a[3]
    assert [kv.pool.blocks[i].ref_cnt for i in ids_a] == [2, 2, 2, 1]
    assert kv.prefix_hit_rate == pytest.approx(12 / (14 + 14))
    kv.free(a)
    kv.check_invariants()
    assert [kv.pool.blocks[i].ref_cnt for i in ids_a] == [1, 1, 1, 0]


def test_at_least_one_token_is_left_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", 12)
    admit(kv, a)
    kv.free(a)
    same = make_request("same", a.prompt_token_ids)
    assert kv.get_computed_blocks(same).num_tokens == 8  # the last block is recomputed for its logits


def test_blocks_are_shared_only_after_their_step_ran():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", 13)
    admit(kv, a, compute=False)  # scheduled, not yet computed (e.g. preempted in the same step)
    assert kv.get_computed_blocks(make_request("b", a.prompt_token_ids)).num_tokens == 0
    kv.free(a)
    assert kv.get_computed_blocks(make_request("c", a.prompt_token_ids)).num_tokens == 0
    assert kv.pool.num_cached_blocks() == 0


def test_freed_blocks_stay_reusable_until_evicted_lru():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a, b = make_request("a", 12), make_request("b", 12)
    ids_a, ids_b = admit(kv, a), admit(kv, b)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6 and kv.pool.num_cached_blocks() == 6
    # a new unrelated request takes the least recently freed blocks first: a's tail before a's head
    c = make_request("c", 8)
    assert admit(kv, c) == [ids_a[2], ids_a[1]]
    assert kv.get_computed_blocks(make_request("a2", a.prompt_token_ids + [9])).num_tokens == 4
    assert kv.get_computed_blocks(make_request("b2", b.prompt_token_ids + [9])).num_tokens == 12
    # reviving free cached blocks takes them out of the free queue: they count as needed blocks
    b2 = make_request("b2", b.prompt_token_ids + [9])
    hits = kv.get_computed_blocks(b2)
    assert kv.blocks_needed(b2, 1, hits) == 3 + 1
    assert admit(kv, b2)[:3] == ids_b
    assert kv.num_free_blocks == 6 - 2 - 4


def test_hash_collisions_never_share_wrong_blocks():
    with mock.patch.object(kv_cache, "hash_block", lambda parent, tokens: 0):  # every key collides
        kv = KVCacheManager(num_blocks=32, block_size=BS)
        a = make_request("a", 12)
        admit(kv, a)
        assert kv.get_computed_blocks(make_request("x", 13)).num_tokens == 0  # other tokens: no hit
        same = make_request("same", a.prompt_token_ids + [1])
        assert kv.get_computed_blocks(same).num_tokens == 4  # only the block that owns the key
        admit(kv, same)
        kv.check_invariants()


def test_reregistered_parent_does_not_adopt_old_children():
    """A child block hangs under its parent's registration, not under whatever now has the parent's key."""
    pool = BlockPool(3, enable_caching=True)
    x0, x1 = pool.take(2)
    s0 = pool.register(x0, 100, kv_cache.ROOT_SERIAL, (1, 2))
    pool.register(x1, 200, s0, (3, 4))
    pool.free([x0])  # x1 stays referenced
    assert pool.lookup(100, kv_cache.ROOT_SERIAL, (1, 2)) is x0  # freed but still reusable
    z, evicted = pool.take(2)
    assert evicted is x0 and pool.lookup(100, kv_cache.ROOT_SERIAL, (1, 2)) is None
    sz = pool.register(z, 100, kv_cache.ROOT_SERIAL, (9, 9))  # same key as x0, other tokens
    assert pool.lookup(100, kv_cache.ROOT_SERIAL, (9, 9)) is z
    assert pool.lookup(200, sz, (3, 4)) is None  # x1's KV was computed after (1, 2), not (9, 9)
    assert pool.lookup(200, s0, (3, 4)) is x1


def test_register_same_content_twice_keeps_one_chain():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a, b = make_request("a", 10), make_request("b", 10)
    b.prompt_token_ids[:] = b.all_token_ids[:] = a.prompt_token_ids
    admit(kv, a, compute=False)
    admit(kv, b, compute=False)  # computed side by side: no sharing possible yet
    a.num_computed_tokens = b.num_computed_tokens = 10
    kv.cache_computed(a)
    kv.cache_computed(b)
    kv.check_invariants()
    assert kv.pool.num_cached_blocks() == 2
    c = make_request("c", a.prompt_token_ids + [7, 7, 7])
    assert kv.get_computed_blocks(c).num_tokens == 8


# -- property tests through the schedulers ---------------------------------------------------------------------

BASES = [[3 + (17 * i + 5 * j) % 400 for j in range(40)] for i in range(3)]

add_op = st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 24), st.integers(1, 12), st.integers(1, 16),
                   st.integers(0, 3), st.booleans())
op = st.one_of(
    add_op, add_op,
    st.tuples(st.just("step"), st.integers(1, 6)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
)
program = st.builds(lambda first, rest: first + rest, st.lists(add_op, min_size=2, max_size=8),
                    st.lists(op, max_size=30))


@pytest.mark.parametrize("name", scheduler_names())
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=program, caching=st.booleans(), num_blocks=st.integers(6, 14),
       budget=st.sampled_from([1, 3, 7, 16, 64]), max_seqs=st.sampled_from([2, 8]), collide=st.booleans())
def test_random_sequences_keep_the_books(name, ops, caching, num_blocks, budget, max_seqs, collide):
    """collide: a hash with 3 values, so prefix lookups collide all the time and must still never mix up KV."""
    hash_fn = (lambda parent, tokens: hash(tokens) % 3) if collide else kv_cache.hash_block
    with mock.patch.object(kv_cache, "hash_block", hash_fn):
        _run_program(name, ops, caching, num_blocks, budget, max_seqs)


def _run_program(name, ops, caching, num_blocks, budget, max_seqs=8):
    max_len = num_blocks * BS
    sched = make_scheduler(name, num_blocks=num_blocks, block_size=BS, max_model_len=max_len,
                           enable_prefix_caching=caching, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    d = Driver(sched, FakeRunner(BS, budget))
    reqs, aborted = {}, set()
    for o in ops:
        if o[0] == "add":
            _, base, prefix, suffix, max_tokens, priority, stop = o
            rid = f"r{len(reqs)}"
            prompt = (BASES[base][:prefix] + [3 + (len(reqs) * 31 + j) % 400 for j in range(suffix)])[:max_len - 1]
            stops = [fake_token(rid, len(prompt) + 1)] if stop else []
            reqs[rid] = make_request(rid, prompt, max_tokens=max_tokens, priority=priority, stop_token_ids=stops)
            d.add(reqs[rid])
        elif o[0] == "step":
            for _ in range(o[1]):
                if sched.has_unfinished_requests():
                    d.step()
                    if sched.get_stats().num_preempted:
                        event("preempted in a step")
        elif o[0] == "abort" and reqs:
            rid = f"r{o[1] % len(reqs)}"
            if rid not in d.finishes:
                aborted.add(rid)
            d.abort([rid])
        _check_books(sched, num_blocks)
    d.run(max_steps=5000)
    _check_books(sched, num_blocks)
    assert set(d.finishes) == set(reqs) and all(len(v) == 1 for v in d.finishes.values()), "end exactly once"
    for rid, req in reqs.items():
        reason = d.finishes[rid][0]
        if rid in aborted:
            assert reason == "abort"
            continue
        toks = d.tokens[rid]
        assert toks == [fake_token(rid, req.num_prompt_tokens + i) for i in range(len(toks))]
        if reason == "stop":
            assert toks[-1] in req.sampling_params.stop_token_ids
        else:
            assert reason == "length"
            assert len(toks) == min(req.sampling_params.max_tokens, max_len - req.num_prompt_tokens)
    stats = sched.get_stats()
    assert stats.kv_usage == 0.0 and stats.num_running == stats.num_waiting == 0


def _check_books(sched, num_blocks):
    kv = getattr(sched, "kv", None)
    if kv is None:
        return
    kv.check_invariants()  # ref counts == table membership, no double free, free + used == total
    used = sum(1 for b in kv.pool.blocks if b.ref_cnt > 0)
    assert used + kv.num_free_blocks == num_blocks
    assert all(r.status != RequestStatus.RUNNING for r in getattr(sched, "waiting", []))
