"""Selected from YAML, `sdpa` generates the same greedy tokens as the reference backend `torch_ref`."""

from __future__ import annotations

import pytest

from weavelm import LLM, SamplingParams
from weavelm_attention_sdpa.backend import SdpaImpl

# prompt lengths 3..41: fresh prefills, prefills split across steps by the small budget, and decodes, in one batch
PROMPTS = [[1, 17, 300], [5, 99, 250, 7, 3, 128, 64, 200, 11], list(range(20, 61)), [400, 8, 77, 123, 6] * 3]
ENGINE_YAML = """\
# weavelm-attention-sdpa parity test: a tiny random Llama on the CPU with attention `{attention}`.
model: {model}
dtype: float32
device: cpu
attention: {attention}
scheduler: {{name: fcfs, max_num_seqs: 8, max_num_batched_tokens: 24}}
cache: {{block_size: 8, enable_prefix_caching: true}}
"""


def greedy(tmp_path, model: str, attention: str) -> list[list[int]]:
    config = tmp_path / f"{attention}.yaml"
    config.write_text(ENGINE_YAML.format(model=model, attention=attention))
    outs = LLM(config=str(config)).generate([{"prompt_token_ids": p} for p in PROMPTS],
                                            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_tokens_equal_torch_ref(tmp_path, tiny_llama, monkeypatch):
    calls = []
    forward = SdpaImpl.forward
    monkeypatch.setattr(SdpaImpl, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    got = greedy(tmp_path, tiny_llama, "sdpa")
    assert calls, "the engine did not run the sdpa backend"
    ref = greedy(tmp_path, tiny_llama, "torch_ref")
    assert all(len(tokens) == 8 for tokens in got)
    assert got == ref


def test_a_misspelled_name_lists_sdpa(tmp_path, tiny_llama):
    with pytest.raises(Exception, match=r"installed: .*\bsdpa\b"):
        greedy(tmp_path, tiny_llama, "sdpaa")
