"""Priority scheduling scenarios: ordering, arrival tie-break, victim choice, preemption of a lower-priority
running request by a waiting one, and FCFS behaviour when every priority is equal."""

from __future__ import annotations

import pytest

from tests.scheduler_utils import Driver, FakeRunner, fake_token, make_request, make_scheduler

BS = 4


def driver(name: str = "priority", num_blocks: int = 64, budget: int = 64, **opts) -> Driver:
    sched = make_scheduler(name, num_blocks=num_blocks, block_size=BS, max_num_batched_tokens=budget, **opts)
    return Driver(sched, FakeRunner(BS, budget))


def admission_order(d: Driver) -> list[str]:
    order = []
    while d.scheduler.has_unfinished_requests():
        order += [nr.req_id for nr in d.step().scheduled_new_reqs]
    return order


def test_lower_priority_value_runs_first():
    d = driver(max_num_seqs=1)
    for rid, prio, t in [("p3", 3, 0.0), ("p1", 1, 1.0), ("p2", 2, 2.0), ("p0", 0, 3.0)]:
        d.add(make_request(rid, 5, max_tokens=2, priority=prio, arrival_time=t))
    assert admission_order(d) == ["p0", "p1", "p2", "p3"]


def test_arrival_time_breaks_ties_then_add_order():
    d = driver(max_num_seqs=1)
    for rid, prio, t in [("late", 1, 5.0), ("early", 1, 1.0), ("mid", 1, 3.0), ("urgent", 0, 9.0),
                         ("same_a", 2, 4.0), ("same_b", 2, 4.0)]:
        d.add(make_request(rid, 5, max_tokens=2, priority=prio, arrival_time=t))
    assert admission_order(d) == ["urgent", "early", "mid", "late", "same_a", "same_b"]


def test_victim_is_lowest_priority_then_latest_arrival():
    d = driver(num_blocks=4, budget=64)
    for rid, prio, t in [("A", 0, 0.0), ("B", 2, 1.0), ("C", 1, 2.0), ("D", 2, 3.0)]:
        d.add(make_request(rid, 4, max_tokens=6, priority=prio, arrival_time=t))
    so = d.step()  # all four fit one block each; each then needs a second block
    assert sorted(so.num_scheduled_tokens) == ["A", "B", "C", "D"]
    so = d.step()
    assert so.preempted_req_ids == {"B", "D"} and set(so.num_scheduled_tokens) == {"A", "C"}
    assert [r.request_id for r in d.scheduler.waiting] == ["D", "B"]  # D (latest arrival) went first
    assert d.scheduler.get_stats().num_preempted == 2
    d.run()
    assert all(d.tokens[r] == [fake_token(r, 4 + i) for i in range(6)] for r in "ABCD")


def test_running_request_is_never_preempted_for_a_lower_priority_one():
    d = driver(num_blocks=4, budget=64)
    d.add(make_request("hi", 4, max_tokens=8, priority=0, arrival_time=1.0))
    d.add(make_request("lo", 8, max_tokens=8, priority=5, arrival_time=0.0))
    d.step()
    d.step()  # lo needs a third block first in the running order, but it is the lowest: it preempts itself
    while d.scheduler.has_unfinished_requests():
        so = d.step()
        assert "hi" not in so.preempted_req_ids
    assert d.finishes == {"hi": ["length"], "lo": ["length"]}


@pytest.mark.parametrize("limit", ["seats", "blocks"])
def test_waiting_higher_priority_preempts_lower_priority_running(limit):
    opts = {"max_num_seqs": 2} if limit == "seats" else {"num_blocks": 6}  # a low one alone needs 4 blocks
    d = driver(**opts)
    d.add(make_request("low_a", 8, max_tokens=8, priority=5, arrival_time=0.0))
    d.add(make_request("low_b", 8, max_tokens=8, priority=5, arrival_time=1.0))
    d.step()
    d.step()  # both hold 3 blocks: with 6 blocks none is free
    d.add(make_request("urgent", 8, max_tokens=3, priority=0, arrival_time=2.0))
    so = d.step()
    assert so.preempted_req_ids == {"low_b"}  # the later of the two lowest
    assert [nr.req_id for nr in so.scheduled_new_reqs] == ["urgent"]
    assert "low_a" in so.num_scheduled_tokens
    d.run()
    assert set(d.finishes) == {"low_a", "low_b", "urgent"}
    assert d.tokens["low_b"] == [fake_token("low_b", 8 + i) for i in range(8)]


@pytest.mark.parametrize("case", ["option_off", "equal_priority", "fcfs"])
def test_no_preemption_for_waiting_unless_strictly_higher_and_enabled(case):
    name, opts, prio = "priority", {"max_num_seqs": 2}, 0
    if case == "option_off":
        opts["preempt_for_higher_priority"] = False
    elif case == "equal_priority":
        prio = 5
    else:
        name = "fcfs"
    d = driver(name, **opts)
    d.add(make_request("a", 8, max_tokens=6, priority=5, arrival_time=0.0))
    d.add(make_request("b", 8, max_tokens=6, priority=5, arrival_time=1.0))
    d.step()
    d.add(make_request("c", 8, max_tokens=3, priority=prio, arrival_time=2.0))
    while "c" not in d.finishes:
        assert not d.step().preempted_req_ids
    assert set(d.finishes) == {"a", "b", "c"}


def _trace(name: str, seed_lens: list[int]) -> list[tuple]:
    d = driver(name, num_blocks=9, budget=10, max_num_seqs=3)
    for i, n in enumerate(seed_lens):
        d.add(make_request(f"r{i}", n, max_tokens=5 + i % 4, priority=7, arrival_time=float(i)))
    trace = []
    step = 0
    while d.scheduler.has_unfinished_requests():
        if step == 3:
            d.add(make_request("late", 6, max_tokens=4, priority=7, arrival_time=100.0))
        so = d.step()
        trace.append((dict(so.num_scheduled_tokens), sorted(so.preempted_req_ids),
                      [nr.req_id for nr in so.scheduled_new_reqs], list(so.scheduled_cached_reqs.req_ids)))
        step += 1
    return trace, d.tokens


def test_equal_priorities_fall_back_to_fcfs():
    lens = [5, 13, 2, 9, 17, 4, 11]
    fcfs_trace, fcfs_tokens = _trace("fcfs", lens)
    prio_trace, prio_tokens = _trace("priority", lens)
    assert any(t[1] for t in fcfs_trace), "the workload should preempt"
    assert prio_trace == fcfs_trace and prio_tokens == fcfs_tokens


def test_preempted_in_step_blocks_are_not_shared():
    """A low-priority request allocates blocks for a prefill chunk, then a higher-priority decode preempts it in
    the same step: those blocks were never computed, so resuming must not take them as prefix-cache hits."""
    d = driver(num_blocks=7, budget=64, long_prefill_token_threshold=8)
    low = make_request("low", 24, max_tokens=2, priority=5, arrival_time=0.0)
    d.add(low)
    d.step()  # low: tokens 0..7
    d.add(make_request("high", 4, max_tokens=4, priority=0, arrival_time=1.0))
    d.step()  # low: 8..15, high: its prompt
    so = d.step()  # low allocates 16..23, then high needs a block: low is preempted in this step
    assert so.preempted_req_ids == {"low"}
    while True:  # low resumes once high is done
        so = d.step()
        cached = so.scheduled_cached_reqs
        if "low" in cached.req_ids:
            i = cached.req_ids.index("low")
            assert cached.resumed_from_preemption[i] and cached.num_computed_tokens[i] == 16
            break
    d.run()  # the FakeRunner has checked the KV of every computed position
    assert d.tokens["low"] == [fake_token("low", 24), fake_token("low", 25)]
