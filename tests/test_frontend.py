"""Text in, text out: tokenization, incremental detokenization, stop strings, streaming, chat."""

import pytest

from weavelm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(smol_tokenizer_model):
    return LLM(model=smol_tokenizer_model, dtype="float32", device="cpu", loader="safetensors")


def test_text_matches_decode_of_tokens(llm):
    out = llm.generate(["Hello there, my friend"], SamplingParams(max_tokens=24, temperature=0,
                                                                   ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode("Hello there, my friend")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_stream_grows_to_the_final_output(llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    final = llm.generate(["Streaming test"], params)[0].outputs[0]
    seen = list(llm.stream("Streaming test", params))
    assert len(seen) == 16 and seen[-1].finished and not seen[0].finished
    texts = [s.outputs[0].text for s in seen]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert seen[-1].outputs[0].token_ids == final.token_ids and texts[-1] == final.text


def test_stop_string_truncates_and_finishes(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = llm.generate(["Once upon a time"], params)[0].outputs[0].text
    assert len(full) > 8
    stop = full[5:8]
    cut = full.find(stop)
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                            stop=[stop]))[0].outputs[0]
    assert out.text == full[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                            stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.outputs[0].text == full[:cut + len(stop)]


def test_chat_template_applies(llm):
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, temperature=0))
    assert len(outs) == 1 and "<|im_start|>assistant" in outs[0].prompt


def test_batched_detokenization_equals_one_by_one(llm):
    import random

    from weavelm.core.detokenizer import IncrementalDetokenizer, add_tokens_batch

    tok = llm.get_tokenizer()
    rng = random.Random(0)
    seqs = [[rng.randrange(len(tok)) for _ in range(30)] for _ in range(12)]
    one = [IncrementalDetokenizer(tok, [1, 2], ["the", "ing"]) for _ in seqs]
    many = [IncrementalDetokenizer(tok, [1, 2], ["the", "ing"]) for _ in seqs]
    for t in range(30):
        hits_one = [d.add_tokens([s[t]]) for d, s in zip(one, seqs)]
        assert add_tokens_batch([(d, [s[t]]) for d, s in zip(many, seqs)]) == hits_one
    assert [d.text for d in one] == [d.text for d in many]


def test_stream_detokenization_equals_the_windowed_decodes(llm):
    """The DecodeStream path (fast tokenizers) against the two-window decode it replaced, token by token: ASCII,
    accented letters, CJK, emoji split over byte tokens, special tokens (skipped or kept), random ids, stop strings
    and several tokens per call."""
    import random

    from weavelm.core.detokenizer import IncrementalDetokenizer

    tok = llm.get_tokenizer()
    texts = ["Hello world, the quick brown fox. " * 3, "Ünïcödé café naïve 日本語のテキスト 😀🎉👍🏽 done",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n ok"]
    rng = random.Random(1)
    cases = [tok.encode(t, add_special_tokens=False) for t in texts]
    cases += [[rng.randrange(len(tok)) for _ in range(40)] for _ in range(6)]
    # a prompt context that ends inside a character (a lone byte token decodes to U+FFFD): the windowed path
    partial = next(i for i in range(len(tok)) if tok._tokenizer.decode([i]) == "\ufffd")
    contexts = [[1, 2, 3], [1, partial, 3], [1, 2, partial]]
    for skip in (True, False):
        for ids, context in ((ids, c) for ids in cases for c in contexts):
            for stop, step in (([], 1), (["the", "ing", "日本"], 1), (["fox"], 3)):
                fast = IncrementalDetokenizer(tok, context, stop, skip_special_tokens=skip)
                slow = IncrementalDetokenizer(tok, context, stop, skip_special_tokens=skip)
                if context == [1, 2, 3]:
                    assert fast._stream is not None
                if context[-1] == partial:
                    assert fast._stream is None
                slow._stream = None  # the windowed decodes
                for i in range(0, len(ids), step):
                    hit_fast, hit_slow = fast.add_tokens(ids[i:i + step]), slow.add_tokens(ids[i:i + step])
                    assert (hit_fast, fast.text, fast.num_used) == (hit_slow, slow.text, slow.num_used), (ids, i)
                    if hit_fast is not None:
                        break
