"""/v1/chat/completions with images (issue 27): the real `openai` client sends a base64 data URL to the server app
(uvicorn in a thread, as `weavelm serve` runs it) and gets the offline `LLM.chat` output; bad images get a 400
naming the problem, and the server keeps serving."""

from __future__ import annotations

import openai
import pytest

from tests.hostile_utils import ThreadServer
from tests.mm_fixtures import data_url, llava_registry, make_image, tiny_llava  # noqa: F401
from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.serve.app import build_app

ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", cache={"num_blocks": 128, "block_size": 16},
              multimodal={"limit_mm_per_prompt": {"image": 1}})


@pytest.fixture(scope="module")
def server(tiny_llava, llava_registry, one_torch_thread):
    engine = AsyncLLM(model=tiny_llava, registry=llava_registry, **ENGINE)
    srv = ThreadServer(build_app(engine, served_model_name="llava"))
    yield srv
    srv.stop()
    engine.shutdown()


def chat(url: str, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_openai_client_sends_an_image_and_gets_the_offline_output(server, tiny_llava, llava_registry):
    image = make_image(11)
    llm = LLM(tiny_llava, registry=llava_registry, **ENGINE)
    try:
        want = llm.chat(chat(data_url(image)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert want.error is None
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    got = client.chat.completions.create(model="llava", messages=chat(data_url(image)), max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    other = client.chat.completions.create(model="llava", messages=chat(data_url(make_image(12))), max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert other.choices[0].message.content != got.choices[0].message.content

    bad = {"https://example.com/cat.png": "remote URLs are not fetched",
           "data:image/png;base64,aGVsbG8=": "cannot decode the image",
           "data:image/png;base64,@@@": "not valid base64"}
    for url, message in bad.items():
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="llava", messages=chat(url), max_tokens=4)
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}] * 2}]
    with pytest.raises(openai.BadRequestError, match="limit_mm_per_prompt"):
        client.chat.completions.create(model="llava", messages=two, max_tokens=4)
    again = client.chat.completions.create(model="llava", messages=chat(data_url(image)), max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == got.choices[0].message.content
