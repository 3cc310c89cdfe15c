"""Bad input gives a typed error naming the field and the fix; a bad request never stops the others."""

import pytest

from weavelm import LLM, ConfigError, LoadError, PluginError, RequestError, SamplingParams
from weavelm.core.config import EngineConfig


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=64)


def test_unknown_plugin_names_kind_and_choices():
    with pytest.raises(ConfigError) as e:
        EngineConfig.build({"attention": "trition", "scheduler": "fcfss"})
    msg = str(e.value)
    assert "attention.name: unknown attention plugin 'trition'; installed: triton" in msg
    assert "scheduler.name: unknown scheduler plugin 'fcfss'; installed: fcfs" in msg


def test_bad_options_reported_together_with_paths():
    with pytest.raises(ConfigError) as e:
        EngineConfig.build({"scheduler": {"name": "fcfs", "max_num_seqs": 0, "max_num_batchd_tokens": 5},
                            "cache": {"block_size": 0}, "dtype": "fp8"})
    paths = [p for p, _ in e.value.errors]
    assert {"scheduler.max_num_seqs", "scheduler.max_num_batchd_tokens", "cache.block_size", "dtype"} <= set(paths)
    assert "scheduler.max_num_seqs: Input should be greater than or equal to 1 (got 0)" in str(e.value)
    assert "unknown option" in str(e.value)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(RequestError, match=r"prompt: has 80 tokens but max_model_len is 64"):
        llm.engine.add_request({"prompt_token_ids": list(range(80))}, SamplingParams())


@pytest.mark.parametrize("kwargs,field", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
                                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                          ({"top_k": -3}, "top_k"), ({"min_p": 2.0}, "min_p")])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(RequestError, match=rf"SamplingParams\.{field}: .*\(got"):
        SamplingParams(**kwargs)


def test_model_dir_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="has no config.json; save the model with transformers"):
        LLM(model=str(tmp_path), device="cpu", loader="safetensors")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="is an empty folder"):
        LLM(model=str(tmp_path), device="cpu", loader="safetensors")


def test_missing_model_dir():
    with pytest.raises(LoadError, match="'/nonexistent/model' does not exist"):
        LLM(model="/nonexistent/model", device="cpu", loader="safetensors")


def test_bad_request_does_not_stop_the_others(llm):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    good = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)[0].outputs[0].token_ids
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": list(range(100))},
                         {"prompt_token_ids": [99999]}, {"prompt_token_ids": [1, 2, 3]}], params)
    assert outs[0].outputs[0].token_ids == good and outs[3].outputs[0].token_ids == good
    assert outs[1].error and "max_model_len" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert outs[2].error and "outside the vocabulary" in outs[2].error


def test_selected_backend_that_cannot_run(tiny_llama, monkeypatch):
    from weavelm.core.registry import Registry

    cls = Registry.load().get("attention", "torch_ref")
    monkeypatch.setattr(cls, "check", classmethod(lambda c, spec: ["needs a unicorn"]))
    with pytest.raises(PluginError, match="attention backend 'torch_ref' cannot run here: needs a unicorn"):
        LLM(model=tiny_llama, device="cpu", loader="safetensors", attention="torch_ref")


def test_abort_mid_generation_keeps_others(llm):
    eng = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng.add_request({"prompt_token_ids": [4, 5, 6]}, params, request_id="a")
    eng.add_request({"prompt_token_ids": [7, 8, 9]}, params, request_id="b")
    eng.step()
    eng.step()
    eng.abort_request(["a"])
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert len(done["b"].outputs[0].token_ids) == 8 and done["a"].outputs[0].finish_reason == "abort"
    assert len(done["a"].outputs[0].token_ids) < 8
    assert eng.get_stats().num_used_blocks == 0  # every block of both requests came back
