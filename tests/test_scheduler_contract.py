"""The Scheduler contract, run against every registered scheduler plugin (built-in or installed from outside).

Only the public interface is used: `schedule()` -> FakeRunner (hand-built ModelRunnerOutput) ->
`update_from_output()`, `finish_requests()`, `get_stats()`. Results must not depend on the policy.
"""

from __future__ import annotations

import pytest

from tests.scheduler_utils import (EOS, Driver, FakeRunner, check_scheduler, fake_token, make_request,
                                   make_scheduler, scheduler_names)
from weavelm.core.request import RequestStatus

NAMES = scheduler_names()
BS = 4


def driver(name: str, num_blocks: int = 64, budget: int = 64, check_kv: bool = True, **opts) -> Driver:
    sched = make_scheduler(name, num_blocks=num_blocks, block_size=BS, max_num_batched_tokens=budget, **opts)
    return Driver(sched, FakeRunner(BS, budget, check_kv=check_kv))


def expected(rid: str, prompt_len: int, max_tokens: int) -> list[int]:
    return [fake_token(rid, prompt_len + i) for i in range(max_tokens)]


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_contract_shape(name):
    d = driver(name)
    cls = type(d.scheduler)
    assert cls.name == name and cls.description
    assert cls.Options.model_config.get("extra") == "forbid"
    for opt in ("max_num_seqs", "max_num_batched_tokens"):
        assert opt in cls.Options.model_fields, f"{name} lacks the common option {opt}"


@pytest.mark.parametrize("name", NAMES)
def test_empty_step(name):
    d = driver(name)
    assert not d.scheduler.has_unfinished_requests()
    so = d.scheduler.schedule()
    assert so.is_empty and not so.scheduled_new_reqs and so.scheduled_cached_reqs.num_reqs == 0


@pytest.mark.parametrize("name", NAMES)
def test_single_request_lifecycle(name):
    d = driver(name)
    d.add(make_request("a", 10, max_tokens=5))
    so = d.step()
    assert [nr.req_id for nr in so.scheduled_new_reqs] == ["a"] and so.num_scheduled_tokens == {"a": 10}
    assert len(so.scheduled_new_reqs[0].block_ids) == 3  # ceil(10 / 4)
    assert d.scheduler.get_stats().num_scheduled_tokens == 10
    for _ in range(4):
        so = d.step()
        assert not so.scheduled_new_reqs and so.scheduled_cached_reqs.req_ids == ["a"]
        assert so.num_scheduled_tokens == {"a": 1}
    assert d.tokens["a"] == expected("a", 10, 5)
    assert d.finishes == {"a": ["length"]}
    assert not d.scheduler.has_unfinished_requests()
    stats = d.scheduler.get_stats()
    assert stats.kv_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0
    assert "a" in d.scheduler.schedule().finished_req_ids  # the worker learns it can drop the request


@pytest.mark.parametrize("name", NAMES)
def test_budget_and_max_num_seqs(name):
    d = driver(name, budget=16, max_num_seqs=3)
    lens = [3, 17, 9, 30, 1, 12, 5, 22, 8, 2]
    for i, n in enumerate(lens):
        d.add(make_request(f"r{i}", n, max_tokens=4))
    while d.scheduler.has_unfinished_requests():
        so = d.step()
        assert so.total_num_scheduled_tokens <= 16 and len(so.num_scheduled_tokens) <= 3
        assert d.scheduler.get_stats().num_running <= 3
    for i, n in enumerate(lens):
        assert d.tokens[f"r{i}"] == expected(f"r{i}", n, 4)
        assert d.finishes[f"r{i}"] == ["length"]


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_mixes_decodes_and_chunks(name):
    d = driver(name, budget=8)
    d.add(make_request("short", 3, max_tokens=20))
    d.step()
    d.add(make_request("long", 30, max_tokens=2))
    chunks = []
    while "long" not in d.finishes:
        so = d.step()
        if "short" in so.num_scheduled_tokens and "long" in so.num_scheduled_tokens:
            chunks.append(so.num_scheduled_tokens["long"])
    assert sum(chunks) >= 21 and max(chunks) == 7  # a decode of `short` plus a 7-token chunk of `long`
    d.run()
    assert d.tokens["long"] == expected("long", 30, 2) and d.tokens["short"] == expected("short", 3, 20)


@pytest.mark.parametrize("name", NAMES)
def test_long_prefill_token_threshold(name):
    d = driver(name, budget=64, long_prefill_token_threshold=5)
    if getattr(d.scheduler.options, "long_prefill_token_threshold", None) != 5:
        pytest.skip(f"{name} has no long_prefill_token_threshold option")
    d.add(make_request("a", 23, max_tokens=2))
    sizes = [d.step().num_scheduled_tokens["a"] for _ in range(6)]
    assert sizes == [5, 5, 5, 5, 3, 1]
    assert d.tokens["a"] == expected("a", 23, 2)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_kv_forces_preemption_without_changing_tokens(name):
    lens = [6, 19, 11, 25, 3, 14]
    runs = {}
    for num_blocks in (128, 11):
        d = driver(name, num_blocks=num_blocks, budget=12)
        for i, n in enumerate(lens):
            d.add(make_request(f"r{i}", n, max_tokens=14))
        preempted = 0
        while d.scheduler.has_unfinished_requests():
            d.step()
            preempted += d.scheduler.get_stats().num_preempted
        runs[num_blocks] = (dict(d.tokens), preempted)
        assert all(d.finishes[f"r{i}"] == ["length"] for i in range(len(lens)))
        assert d.scheduler.get_stats().kv_usage == 0.0
    assert runs[128][1] == 0 and runs[11][1] > 0
    assert runs[128][0] == runs[11][0] == {f"r{i}": expected(f"r{i}", n, 14) for i, n in enumerate(lens)}


def _drive_to(d: Driver, rid: str, state: str, req) -> None:
    if state == "waiting":
        return
    for _ in range(200):
        if state == "mid_prefill" and req.status == RequestStatus.RUNNING and 0 < req.num_computed_tokens < 20:
            return
        if state == "running" and req.status == RequestStatus.RUNNING and req.num_output_tokens >= 2:
            return
        if state == "preempted" and req.status == RequestStatus.PREEMPTED:
            return
        d.step()
    raise AssertionError(f"{rid} never reached {state}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("state", ["waiting", "mid_prefill", "running", "preempted"])
def test_abort_at_any_point_frees_everything(name, state):
    num_blocks = 9 if state == "preempted" else 64
    d = driver(name, num_blocks=num_blocks, budget=6)
    if state == "preempted":
        others = [make_request(f"o{i}", 9, max_tokens=12) for i in range(2)]
        target = make_request("t", 9, max_tokens=12)
    else:
        others = [make_request("o0", 5, max_tokens=6)]
        target = make_request("t", 20, max_tokens=30)
    for r in others + [target]:
        d.add(r)
    if state == "waiting":
        pass
    elif state == "preempted":  # run until any request is preempted, and abort that one
        for _ in range(200):
            victims = [r for r in others + [target] if r.status == RequestStatus.PREEMPTED]
            if victims:
                target = victims[0]
                break
            d.step()
        else:
            pytest.fail("no preemption happened")
    else:
        _drive_to(d, "t", state, target)
    rid = target.request_id
    d.abort([rid])
    assert d.finishes[rid] == ["abort"]
    d.abort([rid])  # aborting a finished request does nothing
    assert d.finishes[rid] == ["abort"]
    so = d.step() if d.scheduler.has_unfinished_requests() else d.scheduler.schedule()
    assert rid in so.finished_req_ids and rid not in so.num_scheduled_tokens
    d.run()
    assert d.scheduler.get_stats().kv_usage == 0.0
    assert all(reasons == ["length"] for r, reasons in d.finishes.items() if r != rid)
    for r in others + [target]:
        if r.request_id != rid:
            assert d.tokens[r.request_id] == expected(r.request_id, r.num_prompt_tokens, r.sampling_params.max_tokens)


@pytest.mark.parametrize("name", NAMES)
def test_abort_everything_midway(name):
    d = driver(name, num_blocks=10, budget=7)
    reqs = [make_request(f"r{i}", 5 + 3 * i, max_tokens=10) for i in range(5)]
    for r in reqs:
        d.add(r)
    for _ in range(6):
        d.step()
    d.abort([r.request_id for r in reqs] + ["never-added"])
    assert not d.scheduler.has_unfinished_requests()
    assert all(len(v) == 1 for v in d.finishes.values()) and set(d.finishes) == {r.request_id for r in reqs}
    assert d.scheduler.get_stats().kv_usage == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_stop_token_and_eos(name):
    stop_at = fake_token("s", 8 + 2)  # the third sampled token
    d = driver(name)
    d.runner.token_fn = lambda rid, pos: EOS if (rid == "e" and pos == 7) else fake_token(rid, pos)
    d.add(make_request("s", 8, max_tokens=10, stop_token_ids=[stop_at]))
    d.add(make_request("e", 5, max_tokens=10, ignore_eos=False))
    d.add(make_request("i", 5, max_tokens=4))
    d.run()
    assert d.finishes == {"s": ["stop"], "e": ["stop"], "i": ["length"]}
    assert d.tokens["s"] == expected("s", 8, 3) and d.tokens["e"][-1] == EOS and len(d.tokens["e"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_max_model_len_finishes_with_length(name):
    sched = make_scheduler(name, num_blocks=64, block_size=BS, max_model_len=12)
    d = Driver(sched, FakeRunner(BS))
    d.add(make_request("a", 9, max_tokens=50))
    d.run()
    assert d.finishes == {"a": ["length"]} and len(d.tokens["a"]) == 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching_shares_full_blocks(name, caching):
    sched = make_scheduler(name, num_blocks=64, block_size=BS, enable_prefix_caching=caching)
    d = Driver(sched, FakeRunner(BS))
    first = make_request("a", 14, max_tokens=3)
    d.add(first)
    d.run()
    second = make_request("b", first.prompt_token_ids[:12] + [7, 8, 9, 10, 11], max_tokens=3)
    d.add(second)
    so = d.step()
    [nr] = so.scheduled_new_reqs
    hit = 12 if caching else 0
    assert nr.num_computed_tokens == hit and so.num_scheduled_tokens == {"b": 17 - hit}
    d.run()
    assert d.tokens["b"] == expected("b", 17, 3)
    stats = d.scheduler.get_stats()
    assert (stats.prefix_hit_rate > 0) == caching and (stats.num_cached_blocks > 0) == caching


@pytest.mark.parametrize("name", NAMES)
def test_requests_added_between_steps(name):
    d = driver(name, num_blocks=16, budget=10)
    added = 0
    for step in range(60):
        if step % 3 == 0 and added < 12:
            d.add(make_request(f"r{added}", 2 + (added * 5) % 13, max_tokens=3 + added % 4))
            added += 1
        if d.scheduler.has_unfinished_requests():
            d.step()
    d.run()
    assert all(v == ["length"] for v in d.finishes.values()) and len(d.finishes) == 12
    check_scheduler(d.scheduler)
