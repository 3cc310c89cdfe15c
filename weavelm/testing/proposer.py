"""The proposer contract: an engine using the proposer keeps greedy output token-identical to decoding without
speculation (in a mixed batch with chunked prefill, prefix caching and preemption), seeded sampling stays
reproducible, and `propose` honours each row's `max_tokens` with tokens of the vocabulary and, when it returns
draft distributions, one normalised row per draft token.

Subclass it in your distribution's tests, naming the proposer you registered and the options it needs:

    from weavelm.testing.proposer import ProposerContract

    class TestMyProposer(ProposerContract):
        proposer = "eagle"                               # registered name, found through your installed entry point

        def proposer_options(self, target_dir):
            return {"model": make_my_eagle_head(target_dir)}   # extra YAML options beside num_speculative_tokens

The target is the suite's reference checkpoint: a tiny random Llama (vocab 512) saved by transformers.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np
import torch

from weavelm.testing._registry import component
from weavelm.testing.loader import reference_checkpoint

PROMPTS = [[5, 6, 7, 8, 9] * 3, [(i * 37) % 500 + 3 for i in range(60)], list(range(100, 116)) + [20, 21],
           list(range(100, 116)) + [30], [3, 4] * 6]
MAX_TOKENS = [20, 24, 12, 8, 22]
ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 24, "block_size": 4},
              scheduler={"max_num_batched_tokens": 32, "max_num_seqs": 8})


class ProposerContract:
    proposer: ClassVar[str] = ""
    num_speculative_tokens: ClassVar[int] = 3

    def proposer_options(self, target_dir: str) -> dict[str, Any]:
        """Options the proposer needs besides `num_speculative_tokens` (e.g. a draft model's path)."""
        return {}

    def _speculative(self, target: str) -> dict[str, Any]:
        return {"name": self.proposer, "num_speculative_tokens": self.num_speculative_tokens,
                **self.proposer_options(target)}

    def _generate(self, speculative, params, recorder=None):
        from weavelm import LLM

        registry = recorder.registry() if recorder is not None else None
        llm = LLM(model=reference_checkpoint(), speculative=speculative, registry=registry, **ENGINE)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        return [o.outputs[0].token_ids for o in outs], llm

    def test_is_a_registered_proposer(self):
        from weavelm.core.proposer import Proposer, ProposerOptions

        cls = component("proposer", self.proposer)
        assert issubclass(cls, Proposer) and cls.name == self.proposer and cls.description
        assert issubclass(cls.Options, ProposerOptions)

    def test_greedy_output_is_unchanged(self):
        from weavelm import SamplingParams

        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
        from weavelm.testing.stats import StepRecorder

        ref, _ = self._generate(None, params)
        recorder = StepRecorder()
        got, llm = self._generate(self._speculative(reference_checkpoint()), params, recorder)
        assert got == ref
        assert recorder.num_preempted > 0, "the contract's pool must force preemption"
        stats = llm.get_stats()
        assert stats.num_used_blocks == 0 and 0 <= stats.spec_acceptance_rate <= 1

    def test_seeded_sampling_is_reproducible(self):
        from weavelm import SamplingParams

        params = [SamplingParams(max_tokens=m, temperature=0.8, seed=7 + i, ignore_eos=True)
                  for i, m in enumerate(MAX_TOKENS)]
        spec = self._speculative(reference_checkpoint())
        assert self._generate(spec, params)[0] == self._generate(spec, params)[0]

    def test_propose_honours_max_tokens(self):
        from weavelm.core.proposer import ProposeInput

        _, llm = self._generate(self._speculative(reference_checkpoint()), _greedy_params())
        proposer = llm.collective_rpc("apply_proposer", (lambda p: p,))[0]  # in-process (uniproc): the object
        vocab = llm.engine.vocab_size
        proposer.forget(["a", "b"])
        rows = [np.asarray(p, dtype=np.int64) for p in PROMPTS[:2]]
        blocks = np.zeros((2, 18), dtype=np.int32)  # the engine is idle: any disjoint blocks of the pool will do
        blocks[0, :6], blocks[1, :18] = np.arange(6), np.arange(6, 24)
        hidden = None
        if proposer.uses_hidden_states:  # one hidden state per row: each row's last token was just sampled
            with open(os.path.join(reference_checkpoint(), "config.json")) as f:
                hidden_size = json.load(f)["hidden_size"]
            device = llm.collective_rpc("apply_model", (lambda m: next(m.parameters()).device,))[0]
            hidden = torch.randn(2, hidden_size, generator=torch.Generator().manual_seed(0)).to(device)
        inp = ProposeInput(req_ids=["a", "b"], token_ids=rows, max_tokens=[1, self.num_speculative_tokens],
                           block_table=blocks, num_blocks=np.array([6, 18]), temperature=np.zeros(2, np.float32),
                           generators=[None, None], num_computed_tokens=np.array([len(r) - 1 for r in rows]),
                           sampled_token_ids=[[int(r[-1])] for r in rows],
                           positions=np.array([len(r) - 2 for r in rows]), hidden_states=hidden)
        proposal = proposer.propose(inp)
        assert len(proposal.token_ids) == 2
        for toks, cap in zip(proposal.token_ids, inp.max_tokens):
            assert len(toks) <= cap and all(0 <= int(t) < vocab for t in toks)
        if proposal.probs is not None:
            total = sum(len(t) for t in proposal.token_ids)
            assert proposal.probs.shape == (total, vocab)
            torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(total), atol=1e-4, rtol=0)


def _greedy_params():
    from weavelm import SamplingParams

    return [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True) for _ in PROMPTS]
