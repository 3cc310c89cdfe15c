"""`POST /v1/embeddings` (OpenAI's shape) over a pooling engine (`weavelm serve --runner pooling`)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.request import SamplingParams
from weavelm.errors import RequestError
from weavelm.serve.completions import api_prompts
from weavelm.serve.errors import APIError, bad_request
from weavelm.serve.serving import ServeState


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="A name from /v1/models.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a batch of either; each is embedded whole.")
    encoding_format: Literal["float", "base64"] = Field("float", description="float: a list of numbers; base64: "
                                                        "the float32 little-endian bytes, base64-encoded.")
    dimensions: int | None = Field(None, description="Only the model's own embedding size is accepted (no "
                                   "Matryoshka truncation).")
    user: str | None = Field(None, description="Accepted and ignored.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


def require_runner(state: ServeState, runner: str, endpoint: str) -> None:
    """400 when the engine's runner cannot serve `endpoint`."""
    actual = state.engine.config.runner
    if actual == runner:
        return
    if runner == "pooling":
        raise APIError(400, f"{endpoint} needs an embedding (pooling) engine, and this server generates; start "
                            f"one with `weavelm serve --runner pooling`")
    raise APIError(400, f"{endpoint} needs a generating engine, and this server runs --runner pooling (it serves "
                        f"/v1/embeddings only); start one without --runner pooling")


async def create_embedding(state: ServeState, req: EmbeddingRequest) -> EmbeddingResponse:
    require_runner(state, "pooling", "/v1/embeddings")
    prompts = api_prompts(req.input)
    if not prompts:
        raise APIError(400, "input: is empty; give a string, a list of strings or token ids", param="input")
    lora = state.admit(req.model, len(prompts))
    try:
        engine_prompts = [await state.prompts.prompt(p) for p in prompts]
    except RequestError as e:
        raise bad_request(e, {"prompt": "input"}) from None
    request_id = f"embd-{uuid.uuid4().hex}"
    try:
        outs = await asyncio.gather(*(_embed(state, p, f"{request_id}-{i}", lora)
                                      for i, p in enumerate(engine_prompts)))
    except RequestError as e:
        raise bad_request(e, {"prompt": "input"}) from None
    size = len(outs[0][0])
    if req.dimensions is not None and req.dimensions != size:
        raise APIError(400, f"dimensions: {req.dimensions} is not supported; this model embeds in {size} "
                            f"dimensions and cannot be truncated (omit `dimensions`)", param="dimensions")
    data = [EmbeddingData(index=i, embedding=_encode(vec, req.encoding_format)) for i, (vec, _) in enumerate(outs)]
    num_tokens = sum(n for _, n in outs)
    return EmbeddingResponse(id=request_id, model=state.response_model(req.model), data=data,
                             usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))


async def _embed(state: ServeState, prompt: dict, request_id: str, lora) -> tuple[list[float], int]:
    """One prompt's embedding and its token count."""
    final = None
    async for out in state.engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0), request_id,
                                           lora_request=lora):
        final = out
    if final is None or final.pooling_output is None:
        raise RequestError(f"input: {(final.error if final is not None else None) or 'no embedding was produced'}")
    return final.pooling_output, len(final.prompt_token_ids)


def _encode(vec: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vec
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
