"""Embeddings (`runner="pooling"`): `LLM.embed` and `/v1/embeddings` against sentence-transformers (mean pooling
+ Normalize, read from the model folder's sentence-transformers files) and transformers' last hidden state (LAST
and CLS pooling), on a tiny random llama with SmolLM2's real tokenizer; chunked prefill gives the same vectors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.serve_utils import ENGINE_KWARGS, ServerProcess
from weavelm import LLM
from weavelm.errors import ConfigError, RequestError
from weavelm.pooling.config import PoolerConfig, resolve_pooler

TEXTS = ["hello world", "The capital of France is Paris, a city on the Seine.", "a",
         "Embeddings pool the final hidden states of every prompt token into one vector."]
TOL = 1e-5


@pytest.fixture(scope="module")
def folders(smol_tokenizer_model, tmp_path_factory):
    """(plain folder, sentence-transformers folder, the SentenceTransformer reference). Both folders hold the same
    weights and tokenizer (without a chat template, which sentence-transformers would wrap texts in); the second
    also holds the sentence-transformers files of a mean-pooling, normalizing model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_models

    root = tmp_path_factory.mktemp("pooling")
    plain = str(root / "plain")
    shutil.copytree(smol_tokenizer_model, plain)
    if os.path.exists(os.path.join(plain, "chat_template.jinja")):
        os.remove(os.path.join(plain, "chat_template.jinja"))
    transformer = st_models.Transformer(plain)
    reference = SentenceTransformer(modules=[transformer, st_models.Pooling(
        transformer.get_embedding_dimension(), "mean"), st_models.Normalize()], device="cpu")
    saved = str(root / "st_saved")
    reference.save(saved)
    with_st = str(root / "with_st")
    shutil.copytree(plain, with_st)
    for name in ("modules.json", "1_Pooling", "2_Normalize"):
        src = os.path.join(saved, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(with_st, name))
    return plain, with_st, reference


def _hf_hidden(path: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0]


def _vectors(outs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outs])


@pytest.fixture(scope="module")
def st_llm(folders):
    llm = LLM(model=folders[1], runner="pooling", **ENGINE_KWARGS)
    yield llm
    llm.shutdown()


def test_resolution_from_sentence_transformers_files(folders, tmp_path):
    plain, with_st, _ = folders
    assert resolve_pooler(with_st, None) == resolve_pooler(with_st, PoolerConfig())
    assert (resolve_pooler(with_st, None).pooling_type, resolve_pooler(with_st, None).normalize) == ("MEAN", True)
    assert (resolve_pooler(plain, None).pooling_type, resolve_pooler(plain, None).normalize) == ("LAST", True)
    over = resolve_pooler(with_st, PoolerConfig(pooling_type="CLS"))
    assert (over.pooling_type, over.normalize, over.source) == ("CLS", True, "config")
    # sentence-transformers' older boolean flags, and no Normalize module
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    old = resolve_pooler(str(tmp_path), None)
    assert (old.pooling_type, old.normalize) == ("CLS", False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(ConfigError, match="weightedmean"):
        resolve_pooler(str(tmp_path), None)


def test_mean_normalize_equals_sentence_transformers(folders, st_llm):
    _, with_st, reference = folders
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    outs = st_llm.embed(TEXTS)
    got = _vectors(outs)
    assert got.shape == expected.shape and outs[0].outputs.hidden_size == expected.shape[1]
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # token-id prompts give the same vectors as their text
    ids = [o.prompt_token_ids for o in outs]
    np.testing.assert_allclose(_vectors(st_llm.embed([{"prompt_token_ids": i} for i in ids])), expected, atol=TOL,
                               rtol=0)
    # score: the cosine of the two embeddings (vLLM's bi-encoder score)
    scores = st_llm.score(TEXTS[0], TEXTS[1:])
    np.testing.assert_allclose([s.outputs.score for s in scores], expected[1:] @ expected[0], atol=TOL, rtol=0)


def test_chunked_prefill_gives_the_same_embeddings(folders, st_llm):
    """A budget of 4 tokens per step splits every long prompt into chunks, and several prompts share each step:
    mean pooling must sum every chunk. With async scheduling (CUDA's default) the next step is scheduled before a
    finished prompt's embedding arrives."""
    _, with_st, reference = folders
    expected = _vectors(st_llm.embed(TEXTS))
    chunked = LLM(model=with_st, runner="pooling", max_num_batched_tokens=4, async_scheduling=True,
                  **ENGINE_KWARGS)
    try:
        np.testing.assert_allclose(_vectors(chunked.embed(TEXTS)), expected, atol=TOL, rtol=0)
    finally:
        chunked.shutdown()


@pytest.mark.parametrize("pooler, budget", [(None, 8192), ({"pooling_type": "CLS", "normalize": False}, 3)])
def test_last_and_cls_equal_transformers(folders, pooler, budget):
    """The default for a folder without sentence-transformers files is LAST, normalized; CLS (here unnormalized,
    through vLLM's older `task="embed"`) takes the first token's state, also when the prompt comes in chunks."""
    plain = folders[0]
    kwargs = {"runner": "pooling"} if pooler is None else {"task": "embed", "pooler": pooler}
    llm = LLM(model=plain, max_num_batched_tokens=budget, **kwargs, **ENGINE_KWARGS)
    try:
        outs = llm.embed(TEXTS)
    finally:
        llm.shutdown()
    for out in outs:
        hidden = _hf_hidden(plain, out.prompt_token_ids)
        want = torch.nn.functional.normalize(hidden[-1], dim=0) if pooler is None else hidden[0]
        np.testing.assert_allclose(out.outputs.embedding, want.numpy(), atol=TOL, rtol=0)


def test_runner_mismatches_are_refused(folders, st_llm):
    with pytest.raises(RequestError, match="runner='pooling'.*llm.embed"):
        st_llm.generate("hello")
    with pytest.raises(ConfigError, match="pooler"):
        LLM(model=folders[0], pooler={"pooling_type": "MEAN"}, **ENGINE_KWARGS)
    with pytest.raises(ConfigError, match="task"):
        LLM(model=folders[0], task="transcription", **ENGINE_KWARGS)
    gen = LLM(model=folders[0], **ENGINE_KWARGS)
    try:
        with pytest.raises(RequestError, match="runner='pooling'"):
            gen.embed("hello")
    finally:
        gen.shutdown()


def test_openai_embeddings_endpoint(folders, st_llm):
    """A real `weavelm serve --runner pooling` (engine in its own process) and the real openai client: its default
    base64 encoding and "float" both equal the offline vectors; usage counts the prompt tokens."""
    import httpx
    import openai

    _, with_st, _ = folders
    offline = st_llm.embed(TEXTS)
    expected = _vectors(offline)
    server = ServerProcess(with_st, "--runner", "pooling")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        resp = client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 and decodes it
        np.testing.assert_allclose([d.embedding for d in resp.data], expected, atol=TOL, rtol=0)
        assert [d.index for d in resp.data] == list(range(len(TEXTS)))
        assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(len(o.prompt_token_ids) for o in offline)
        one = client.embeddings.create(model=model, input=offline[1].prompt_token_ids, encoding_format="float")
        np.testing.assert_allclose(one.data[0].embedding, expected[1], atol=TOL, rtol=0)
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model=model, input="hi", dimensions=8)
        r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hi"})
        assert r.status_code == 400 and "--runner pooling" in r.json()["error"]["message"]
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["MEAN", "CLS", "LAST"])
def test_pooler_folds_chunks_and_restarts_after_preemption(kind):
    """The runner-side Pooler alone: a prompt cut into chunks across steps (beside another request) pools as the
    whole prompt does, and a chunk at position 0 (a request preempted and recomputed) starts it afresh."""
    from weavelm.pooling.config import ResolvedPooler
    from weavelm.pooling.pooler import Pooler

    torch.manual_seed(0)
    h = torch.randn(7, 5)
    want = {"MEAN": h.mean(0), "CLS": h[0], "LAST": h[-1]}[kind]
    pooler = Pooler(ResolvedPooler(kind, False, "config"))
    other = torch.randn(2, 5)
    # step 1: "a" positions 0-2 and "b" (2 tokens, done); step 2: "a" preempted, recomputed from 0 with wrong
    # states first; step 3: positions 0-3 again; step 4: positions 4-6 finish it
    first = pooler.pool(torch.cat([h[:3], other]), ["a", "b"], [0, 3, 5], [0, 0], [7, 2])
    assert list(first) == ["b"]
    assert pooler.pool(torch.zeros(2, 5), ["a"], [0, 2], [0], [7]) == {}
    assert pooler.pool(h[:4], ["a"], [0, 4], [0], [7]) == {}
    out = pooler.pool(h[4:], ["a"], [0, 3], [4], [7])
    np.testing.assert_allclose(out["a"], want.numpy(), atol=1e-6, rtol=0)
    pooler.forget(["a", "b"])
    assert not pooler._partial
