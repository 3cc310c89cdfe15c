"""The scheduler's side of speculative decoding, driven by hand-built runner outputs (no model): drafts granted
with blocks, rollback of `num_computed_tokens`, blocks of rejected drafts returned to the pool, and no prefix-cache
registration of a block holding unverified tokens."""

from weavelm.core.outputs import ModelRunnerOutput
from weavelm.core.request import Request, SamplingParams
from weavelm.plugin import SchedulerContext
from weavelm.plugins.schedulers.fcfs import FCFSScheduler
from weavelm.scheduling import SchedulerOptions


def _scheduler(k: int, lookahead: int = 0, num_blocks: int = 16) -> FCFSScheduler:
    ctx = SchedulerContext(num_blocks=num_blocks, block_size=4, max_model_len=64, enable_prefix_caching=True,
                           num_speculative_tokens=k, num_lookahead_tokens=lookahead)
    return FCFSScheduler(SchedulerOptions(max_num_batched_tokens=64), ctx)


def _output(rid: str, sampled: list[int], drafts: list[int] | None) -> ModelRunnerOutput:
    return ModelRunnerOutput([rid], {rid: 0}, [sampled], None, spec_token_ids=[drafts or []])


def test_rejected_drafts_roll_back_and_free_their_blocks():
    s = _scheduler(k=5)
    req = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=30, temperature=0))
    s.add_request(req)
    out = s.schedule()
    assert out.scheduled_spec_decode_tokens == {}
    s.update_from_output(out, _output("r", [50], [51, 52, 53, 54, 55]))
    out = s.schedule()
    assert out.scheduled_spec_decode_tokens == {"r": [51, 52, 53, 54, 55]}
    assert out.num_scheduled_tokens == {"r": 6}
    assert len(s.kv.block_ids("r")) == 3 and req.num_computed_tokens == 10  # positions 0..9 reserved
    s.update_from_output(out, _output("r", [60], [61, 62]))  # every draft rejected; 60 is the target's own token
    assert req.all_token_ids == [1, 2, 3, 4, 50, 60] and req.num_computed_tokens == 5
    assert len(s.kv.block_ids("r")) == 2 and s.kv.num_free_blocks == s.kv.num_blocks - 2  # the third went back
    s.kv.check_invariants()
    registered = [b for b in s.kv.pool.blocks if b.block_hash is not None]
    assert [b.token_ids for b in registered] == [(1, 2, 3, 4)]  # block 1 holds rejected drafts: not cached
    out = s.schedule()
    assert out.scheduled_spec_decode_tokens == {"r": [61, 62]}
    s.update_from_output(out, _output("r", [61, 62, 63], []))  # both accepted + a bonus token
    assert req.all_token_ids[-3:] == [61, 62, 63] and req.num_computed_tokens == req.num_tokens - 1 == 8
    s.kv.check_invariants()
    assert s.get_stats().spec_num_draft_tokens == 7 and s.get_stats().spec_num_accepted_tokens == 2
    out = s.schedule()  # no proposals came back: a plain decode
    assert out.scheduled_spec_decode_tokens == {} and out.num_scheduled_tokens == {"r": 1}


def test_drafts_are_clipped_to_max_tokens_and_the_budget():
    s = _scheduler(k=4)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
    s.add_request(req)
    out = s.schedule()
    s.update_from_output(out, _output("r", [9], [10, 11, 12, 13]))
    out = s.schedule()  # one output so far: at most 3 - 1 - 1 = 1 draft can be used
    assert out.scheduled_spec_decode_tokens == {"r": [10]}
    outs = s.update_from_output(out, _output("r", [10, 11], []))
    assert outs[0].new_token_ids == [10, 11] and outs[0].finish_reason == "length"
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_a_stop_token_inside_an_accepted_run_ends_it():
    s = _scheduler(k=3)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[42]))
    s.add_request(req)
    s.update_from_output(s.schedule(), _output("r", [5], [6, 42, 7]))
    outs = s.update_from_output(s.schedule(), _output("r", [6, 42, 7, 8], []))
    assert outs[0].new_token_ids == [6, 42] and outs[0].finish_reason == "stop"
    assert s.kv.num_free_blocks == s.kv.num_blocks
    s.kv.check_invariants()


def test_lookahead_slots_for_a_kv_using_proposer():
    s = _scheduler(k=2, lookahead=2)
    req = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=30, temperature=0))
    s.add_request(req)
    out = s.schedule()  # the prompt's last chunk samples: 4 tokens + 2 lookahead slots reserved
    assert len(s.kv.block_ids("r")) == 2 and req.num_computed_tokens == 4
    s.update_from_output(out, _output("r", [9], [10, 11]))
    assert len(s.kv.block_ids("r")) == 2  # 5 known tokens keep 2 blocks
    out = s.schedule()
    assert len(s.kv.block_ids("r")) == 3  # 4 computed + 3 scheduled + 2 lookahead = 9 slots
    s.update_from_output(out, _output("r", [10, 20], [21, 22]))
    assert req.num_computed_tokens == 6 and len(s.kv.block_ids("r")) == 2
    s.kv.check_invariants()


def test_ngram_lookup_matches_a_brute_force_search():
    import numpy as np

    from weavelm.plugins.proposers.ngram import lookup

    def brute(t: list[int], n_min: int, n_max: int, k: int) -> list[int]:
        for n in range(min(n_max, len(t) - 1), n_min - 1, -1):
            hits = [s for s in range(len(t) - n) if t[s:s + n] == t[len(t) - n:]]
            if hits:
                return t[hits[-1] + n:hits[-1] + n + k]
        return []

    rng = np.random.default_rng(0)
    for _ in range(300):
        t = rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist()
        n_min = int(rng.integers(1, 4))
        n_max = n_min + int(rng.integers(0, 4))
        assert lookup(np.array(t), n_min, n_max, 3) == brute(t, n_min, n_max, 3), (t, n_min, n_max)
    assert lookup(np.array([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]), 1, 3, 2) == [7, 5]  # the longest match wins
    assert lookup(np.array([4, 5, 6]), 1, 2, 4) == []
