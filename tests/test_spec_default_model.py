"""Speculative decoding on the real default model (SmolLM2-135M-Instruct, CPU): prompt lookup (`ngram`, k=4) on
prompts that quote their input gives the same greedy text as decoding without speculation, and accepts most
drafts (the answer copies the paragraph)."""

import pytest

from weavelm import LLM, SamplingParams

PARAGRAPH = ("The old lighthouse on the northern cliff was built in 1871 by the harbour board. For more than a "
             "century its keepers climbed one hundred and twelve steps every evening to light the lamp.")
TASKS = ["Repeat the following paragraph exactly, word for word:", "Fix any typos in this paragraph and return it:"]


@pytest.mark.slow
def test_ngram_on_the_default_model_keeps_greedy_text(one_torch_thread):
    params = SamplingParams(max_tokens=32, temperature=0)
    base = LLM(device="cpu", dtype="float32")
    tok = base.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{t}\n\n{PARAGRAPH}"}], tokenize=False,
                                       add_generation_prompt=True) for t in TASKS]
    ref = [o.outputs[0] for o in base.generate(prompts, params)]
    base.shutdown()
    spec = LLM(device="cpu", dtype="float32", speculative={"name": "ngram", "num_speculative_tokens": 4})
    got = [o.outputs[0] for o in spec.generate(prompts, params)]
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.text for g in got] == [r.text for r in ref]
    assert "lighthouse" in ref[0].text
    stats = spec.get_stats()
    assert stats.spec_acceptance_rate > 0.5 and stats.spec_mean_accepted_length > 2.0, stats
