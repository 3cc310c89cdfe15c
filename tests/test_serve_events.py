"""The streaming hot path writes plain text deltas without building pydantic models; its JSON must be exactly what
the models give."""

import json

import pytest

from weavelm.serve.completions import _View
from weavelm.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from weavelm.serve.serving import sse


class _State:
    model_name = 'my "model" é'
    tokenizer = None

    def response_model(self, model):
        return self.model_name


@pytest.mark.parametrize("text", ["Hello", " wörld\n\t\"quoted\" \\ back", "日本語 🙂", "\u2028\x00\x1f", ""])
def test_text_event_equals_the_model_json(text):
    view = _View(_State(), CompletionRequest(model="m", prompt="p", stream=True), "cmpl-1\"x")
    fast = view.text_event(2, text)
    slow = sse(CompletionResponse(id=view.id, created=view.created, model=_State.model_name,
                                  choices=[CompletionChoice(index=2, text=text)]))
    assert fast.startswith("data: {") and fast.endswith("}\n\n")
    assert json.loads(fast[6:]) == json.loads(slow[6:])
