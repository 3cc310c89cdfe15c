"""Issue 29, item 6: vLLM's 400 for a max_tokens beyond the context, the per-request and throughput log lines,
the default served name, `weavelm serve MODEL` and `--quantization`."""

import logging
import os
import time

import pytest
from fastapi.testclient import TestClient

from tests.serve_utils import ENGINE_KWARGS
from weavelm.cli import build_parser, engine_config_from_args
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import ConfigError, WeaveError
from weavelm.serve.app import build_app
from weavelm.serve.cli import _check_args

MAX_LEN = 96


@pytest.fixture(scope="module")
def engine(smol_tokenizer_model):
    engine = AsyncLLM(model=smol_tokenizer_model, max_model_len=MAX_LEN, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


def test_max_tokens_beyond_the_context_is_a_400_naming_the_numbers(engine):
    tok = engine.processor.tokenizer
    with TestClient(build_app(engine)) as http:
        n = len(tok.encode("Hello there"))
        r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 100000})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (
            f"This model's maximum context length is {MAX_LEN} tokens. However, you requested {n + 100000} tokens "
            f"({n} in the messages, 100000 in the completion). Please reduce the length of the messages or "
            f"completion.")
        messages = [{"role": "user", "content": "Hi"}]
        m = len(engine.processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"])
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": MAX_LEN})
        assert r.status_code == 400 and f"you requested {m + MAX_LEN} tokens ({m} in the messages" in r.text
        # exactly filling the context is fine
        r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": MAX_LEN - n})
        assert r.status_code == 200, r.text


def test_finished_request_and_throughput_log_lines(engine, caplog, smol_tokenizer_model):
    app = build_app(engine)
    engine.output_observer.interval = 0.2  # the server's 10 s, shortened
    with caplog.at_level(logging.INFO, logger="weavelm.serve"), TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200
        rid = r.json()["id"]
        deadline = time.time() + 30
        while "Avg prompt throughput" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "weavelm.serve"]
    finished = [m for m in lines if m.startswith("Finished request")]
    assert len(finished) == 1 and finished[0].startswith(f"Finished request {rid}-0: prompt_tokens=")
    assert "output_tokens=5, latency=" in finished[0] and finished[0].endswith("finish_reason=length")
    throughput = [m for m in lines if m.startswith("Avg prompt throughput: ")]
    assert throughput and "tokens/s, Avg generation throughput: " in throughput[0]
    assert "Running: " in throughput[0] and "GPU KV cache usage: " in throughput[0]
    # the default served name is the model folder's name
    assert app.state.serve.model_names[0] == os.path.basename(smol_tokenizer_model)


def test_serve_takes_the_model_positionally_and_quantization(tiny_llama):
    args = build_parser().parse_args(["serve", tiny_llama, "--quantization", "int8", "--device", "cpu"])
    _check_args(args)
    assert args.model == tiny_llama
    config = engine_config_from_args(args)
    assert (config.model, config.quantization.name) == (tiny_llama, "int8")
    args = build_parser().parse_args(["serve", tiny_llama, "--model", "/elsewhere"])
    with pytest.raises(WeaveError, match="MODEL .* and --model '/elsewhere' disagree"):
        _check_args(args)
    args = build_parser().parse_args(["serve", tiny_llama, "--quantization", "bitsandbytes"])
    _check_args(args)
    with pytest.raises(ConfigError, match="quantization: 'bitsandbytes' is unsupported: weavelm's quantization plugins are"):
        engine_config_from_args(args)
