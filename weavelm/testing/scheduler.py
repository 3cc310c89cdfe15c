"""The scheduler contract: any scheduler, driven through `schedule()` -> a hand-built `ModelRunnerOutput` ->
`update_from_output()`, keeps its limits and the KV block duties, and its results do not depend on the policy.

Subclass it in your distribution's tests, naming the scheduler you registered:

    from weavelm.testing.scheduler import SchedulerContract

    class TestMyScheduler(SchedulerContract):
        scheduler = "my_scheduler"            # registered name, found through your installed entry point
        options = {"token_budget": 16, "seats": 4}   # your Options; keep the budget small (<= 256)

The suite never assumes option names: the token budget and the number of seats it tests against come from
`Scheduler.limits(Options(**options))`. Tests whose prompts must be longer than the budget (chunked prefill,
abort mid-prefill) skip when the budget is above 256 tokens; a request your `check_request` refuses skips its
test with your reason. Sampled tokens are a function of (request id, position) only, so every test also checks
that batching, chunking, preemption and prefix caching never change a request's tokens. A `FakeRunner` replays
the block tables and fails on a stale or foreign KV slot.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from weavelm.plugin import RequestStatus, SchedulerContext
from weavelm.testing._registry import component
from weavelm.testing._scheduler_driver import EOS, Driver, FakeRunner, check_scheduler, fake_token, make_request
from weavelm.utils import cdiv

BLOCK_SIZE = 4
MAX_CHUNKED_BUDGET = 256


def expected(rid: str, prompt_len: int, max_tokens: int) -> list[int]:
    """The tokens the fake model samples for request `rid` (any batching, chunking or preemption)."""
    return [fake_token(rid, prompt_len + i) for i in range(max_tokens)]


class SchedulerContract:
    """The suite; pytest collects it through your `Test...` subclass."""

    scheduler: ClassVar[str] = ""
    """Registered name of the scheduler under test."""
    options: ClassVar[dict[str, Any]] = {}
    """Keyword arguments of the scheduler's `Options`."""

    # -- helpers -----------------------------------------------------------------------------------------------
    @property
    def scheduler_cls(self) -> Any:
        assert self.scheduler, f"{type(self).__name__} must set `scheduler` to a registered scheduler name"
        return component("scheduler", self.scheduler)

    @property
    def limits(self) -> Any:
        """`Scheduler.limits(options)`: `.max_num_seqs` and `.max_num_batched_tokens`."""
        cls = self.scheduler_cls
        return cls.limits(cls.Options(**self.options))

    def make(self, num_blocks: int = 64, max_model_len: int = 256, enable_prefix_caching: bool = True,
             check_kv: bool = True) -> Driver:
        """A fresh scheduler with a fake KV pool of `num_blocks` blocks of `BLOCK_SIZE` tokens, and its driver."""
        cls = self.scheduler_cls
        context = SchedulerContext(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_model_len=max_model_len,
                                   enable_prefix_caching=enable_prefix_caching)
        limits = self.limits
        runner = FakeRunner(BLOCK_SIZE, limits.max_num_batched_tokens, check_kv=check_kv,
                            max_num_seqs=limits.max_num_seqs)
        return Driver(cls(cls.Options(**self.options), context), runner)

    def small_budget(self) -> int:
        budget = self.limits.max_num_batched_tokens
        if budget > MAX_CHUNKED_BUDGET:
            pytest.skip(f"needs max_num_batched_tokens <= {MAX_CHUNKED_BUDGET} (got {budget}); set `options` to a "
                        f"small budget to run it")
        return budget

    # -- the contract ------------------------------------------------------------------------------------------
    def test_registered_shape(self):
        cls = self.scheduler_cls
        assert cls.name == self.scheduler
        assert cls.description and "\n" not in cls.description
        assert cls.Options.model_config.get("extra") == "forbid"
        limits = self.limits
        assert isinstance(limits.max_num_seqs, int) and limits.max_num_seqs >= 1
        assert isinstance(limits.max_num_batched_tokens, int) and limits.max_num_batched_tokens >= 1

    def test_empty_step(self):
        d = self.make()
        assert not d.scheduler.has_unfinished_requests()
        scheduler_output = d.scheduler.schedule()
        assert scheduler_output.is_empty and not scheduler_output.scheduled_new_reqs
        assert scheduler_output.scheduled_cached_reqs.num_reqs == 0

    def test_single_request_lifecycle(self):
        d = self.make()
        prompt = min(10, self.limits.max_num_batched_tokens)
        d.add(make_request("a", prompt, max_tokens=5))
        scheduler_output = d.step()
        assert [nr.req_id for nr in scheduler_output.scheduled_new_reqs] == ["a"]
        assert scheduler_output.num_scheduled_tokens == {"a": prompt}
        assert len(scheduler_output.scheduled_new_reqs[0].block_ids) == cdiv(prompt, BLOCK_SIZE)
        assert d.scheduler.get_stats().num_scheduled_tokens == prompt
        for _ in range(4):
            scheduler_output = d.step()
            assert not scheduler_output.scheduled_new_reqs
            assert scheduler_output.scheduled_cached_reqs.req_ids == ["a"]
            assert scheduler_output.num_scheduled_tokens == {"a": 1}
        assert d.tokens["a"] == expected("a", prompt, 5)
        assert d.finishes == {"a": ["length"]}
        assert not d.scheduler.has_unfinished_requests()
        stats = d.scheduler.get_stats()
        assert stats.kv_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0
        assert "a" in d.scheduler.schedule().finished_req_ids  # the worker learns it can drop the request

    def test_keeps_budget_and_seats(self):
        """Every step stays within `limits` (the FakeRunner asserts both on every SchedulerOutput)."""
        limits = self.limits
        d = self.make()
        lens = [3, 17, 9, 30, 1, 12, 5, 22, 8, 2]
        num_reqs = limits.max_num_seqs + 3 if limits.max_num_seqs <= 29 else 32
        for i in range(num_reqs):
            d.add(make_request(f"r{i}", lens[i % len(lens)], max_tokens=4))
        while d.scheduler.has_unfinished_requests():
            d.step()
            assert d.scheduler.get_stats().num_running <= limits.max_num_seqs
        for i in range(num_reqs):
            assert d.tokens[f"r{i}"] == expected(f"r{i}", lens[i % len(lens)], 4)
            assert d.finishes[f"r{i}"] == ["length"]

    def test_chunked_prefill_mixes_decodes_and_chunks(self):
        budget = self.small_budget()
        if budget < 2 or self.limits.max_num_seqs < 2:
            pytest.skip("needs a budget of 2+ tokens and 2+ seats")
        long_len = 3 * budget + 6
        d = self.make(num_blocks=cdiv(long_len + 30, BLOCK_SIZE) + 8, max_model_len=long_len + 64)
        d.add(make_request("short", 3, max_tokens=20))
        d.step()
        d.add(make_request("long", long_len, max_tokens=2))
        chunks = []
        while "long" not in d.finishes:
            scheduler_output = d.step()
            if {"short", "long"} <= set(scheduler_output.num_scheduled_tokens):
                chunks.append(scheduler_output.num_scheduled_tokens["long"])
        # a decode of `short` plus a chunk of `long` that fills the rest of the budget
        assert sum(chunks) >= 3 * (budget - 1) and max(chunks) == budget - 1, chunks
        d.run()
        assert d.tokens["long"] == expected("long", long_len, 2)
        assert d.tokens["short"] == expected("short", 3, 20)

    def test_tiny_kv_forces_preemption_without_changing_tokens(self):
        lens = [6, 19, 11, 25, 3, 14]
        runs = {}
        for num_blocks in (128, 11):
            d = self.make(num_blocks=num_blocks)
            for i, n in enumerate(lens):
                d.add(make_request(f"r{i}", n, max_tokens=14))
            preempted = 0
            while d.scheduler.has_unfinished_requests():
                d.step()
                preempted += d.scheduler.get_stats().num_preempted
            runs[num_blocks] = (dict(d.tokens), preempted)
            assert all(d.finishes[f"r{i}"] == ["length"] for i in range(len(lens)))
            assert d.scheduler.get_stats().kv_usage == 0.0
        assert runs[128][1] == 0
        if self.limits.max_num_seqs >= 2:  # one seat never needs more than the largest request's blocks
            assert runs[11][1] > 0
        assert runs[128][0] == runs[11][0] == {f"r{i}": expected(f"r{i}", n, 14) for i, n in enumerate(lens)}

    @pytest.mark.parametrize("state", ["waiting", "mid_prefill", "running", "preempted"])
    def test_abort_at_any_point_frees_everything(self, state):
        if state == "preempted":
            if self.limits.max_num_seqs < 2:
                pytest.skip("one seat: nothing is ever preempted")
            d = self.make(num_blocks=9)
            others = [make_request(f"o{i}", 9, max_tokens=12) for i in range(2)]
            target = make_request("t", 9, max_tokens=12)
        else:
            target_len = 3 * self.small_budget() + 2  # longer than the budget: prefilled in chunks
            d = self.make(num_blocks=cdiv(target_len + 40, BLOCK_SIZE) + 16, max_model_len=target_len + 64)
            others = [make_request("o0", 5, max_tokens=6)]
            target = make_request("t", target_len, max_tokens=30)
        for r in others + [target]:
            d.add(r)
        if state == "preempted":  # run until any request is preempted, and abort that one
            for _ in range(200):
                victims = [r for r in others + [target] if r.status == RequestStatus.PREEMPTED]
                if victims:
                    target = victims[0]
                    break
                d.step()
            else:
                pytest.fail("no preemption happened")
        elif state != "waiting":
            _drive_to(d, target, state)
        rid = target.request_id
        d.abort([rid])
        assert d.finishes[rid] == ["abort"]
        d.abort([rid])  # aborting a finished request does nothing
        assert d.finishes[rid] == ["abort"]
        scheduler_output = d.step() if d.scheduler.has_unfinished_requests() else d.scheduler.schedule()
        assert rid in scheduler_output.finished_req_ids and rid not in scheduler_output.num_scheduled_tokens
        d.run()
        assert d.scheduler.get_stats().kv_usage == 0.0
        assert all(reasons == ["length"] for r, reasons in d.finishes.items() if r != rid)
        for r in others + [target]:
            if r.request_id != rid:
                assert d.tokens[r.request_id] == expected(r.request_id, r.num_prompt_tokens,
                                                          r.sampling_params.max_tokens)

    def test_abort_everything_midway(self):
        d = self.make(num_blocks=10)
        reqs = [make_request(f"r{i}", 5 + 3 * i, max_tokens=10) for i in range(5)]
        for r in reqs:
            d.add(r)
        for _ in range(6):
            d.step()
        d.abort([r.request_id for r in reqs] + ["never-added"])
        assert not d.scheduler.has_unfinished_requests()
        assert all(len(v) == 1 for v in d.finishes.values()) and set(d.finishes) == {r.request_id for r in reqs}
        assert d.scheduler.get_stats().kv_usage == 0.0

    def test_stop_token_and_eos(self):
        stop_at = fake_token("s", 8 + 2)  # the third sampled token
        d = self.make()
        d.runner.token_fn = lambda rid, pos: EOS if (rid == "e" and pos == 7) else fake_token(rid, pos)
        d.add(make_request("s", 8, max_tokens=10, stop_token_ids=[stop_at]))
        d.add(make_request("e", 5, max_tokens=10, ignore_eos=False))
        d.add(make_request("i", 5, max_tokens=4))
        d.run()
        assert d.finishes == {"s": ["stop"], "e": ["stop"], "i": ["length"]}
        assert d.tokens["s"] == expected("s", 8, 3) and d.tokens["e"][-1] == EOS and len(d.tokens["e"]) == 3

    def test_max_model_len_finishes_with_length(self):
        d = self.make(max_model_len=12)
        d.add(make_request("a", 9, max_tokens=50))
        d.run()
        assert d.finishes == {"a": ["length"]} and len(d.tokens["a"]) == 3

    @pytest.mark.parametrize("caching", [True, False])
    def test_prefix_caching_shares_full_blocks(self, caching):
        d = self.make(enable_prefix_caching=caching)
        first = make_request("a", 14, max_tokens=3)
        d.add(first)
        d.run()
        second = make_request("b", first.prompt_token_ids[:12] + [7, 8, 9, 10, 11], max_tokens=3)
        d.add(second)
        scheduler_output = d.step()
        [nr] = scheduler_output.scheduled_new_reqs
        hit = 12 if caching else 0  # the three full blocks computed for `a`
        assert nr.num_computed_tokens == hit
        assert scheduler_output.num_scheduled_tokens == {"b": min(17 - hit, self.limits.max_num_batched_tokens)}
        d.run()
        assert d.tokens["b"] == expected("b", 17, 3)
        stats = d.scheduler.get_stats()
        assert (stats.prefix_hit_rate > 0) == caching and (stats.num_cached_blocks > 0) == caching

    def test_requests_added_between_steps(self):
        d = self.make(num_blocks=16)
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


def _drive_to(d: Driver, req: Any, state: str) -> None:
    for _ in range(200):
        if (state == "mid_prefill" and req.status == RequestStatus.RUNNING
                and 0 < req.num_computed_tokens < req.num_prompt_tokens):
            return
        if state == "running" and req.status == RequestStatus.RUNNING and req.num_output_tokens >= 2:
            return
        d.step()
    raise AssertionError(f"{req.request_id} never reached {state}")
