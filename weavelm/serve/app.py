"""The FastAPI app of `weavelm serve`: OpenAI's endpoints over an AsyncLLM, plus health, version, tokenizer and
Prometheus endpoints."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

import weavelm
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import EngineError, RequestError
from weavelm.serve.chat import create_chat_completion, render_chat
from weavelm.serve.completions import create_completion
from weavelm.serve.errors import APIError, bad_request, engine_unavailable, install_error_handlers
from weavelm.serve.metrics import CONTENT_TYPE, ServerMetrics
from weavelm.serve.params import model_defaults
from weavelm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                    ModelList, TokenizeRequest)
from weavelm.serve.serving import ServeState


def served_adapters(config: Any) -> dict[str, Any]:
    """The LoRA adapters configured under `lora.adapters`, by name (each selectable as a `model`)."""
    if config.lora is None:
        return {}
    from weavelm.lora.manager import named_lora_requests
    return named_lora_requests(config.lora.options)


def build_app(engine: AsyncLLM, served_model_name: str | list[str] | None = None, api_key: str | None = None,
              max_waiting: int | None = None, metrics_dir: str | None = None) -> FastAPI:
    """An app serving `engine` under `served_model_name` (default: the model path; the first of a list is the
    name in responses). With `api_key`, `/v1/*`, `/tokenize` and `/detokenize` need `Authorization: Bearer KEY`.
    `max_waiting`: requests waiting for their first output beyond which new ones get 429. `metrics_dir`: one of
    several API servers whose /metrics are summed through prometheus_client's multiprocess directory."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    names = names or [str(engine.config.model)]
    state = ServeState(engine, names, api_key, max_waiting, ServerMetrics(names[0], metrics_dir),
                       model_defaults(engine), served_adapters(engine.config))
    engine.output_observer = state.metrics.observe
    app = FastAPI(title="weavelm", version=weavelm.__version__,
                  description="OpenAI-compatible API of a weavelm engine")
    app.state.serve = state
    install_error_handlers(app)

    async def authorize(request: Request) -> None:
        # async: a plain `def` dependency runs in FastAPI's thread pool, a thread hop per request
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(authorize)])

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @api.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=name, root=str(engine.config.model), max_model_len=engine.max_model_len)
                 for name in state.model_names]
        cards += [ModelCard(id=name, root=lora.lora_path, parent=state.model_name, max_model_len=engine.max_model_len)
                  for name, lora in state.adapters.items()]
        return ModelList(data=cards)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.admit(body.model, 0)
        ids = _tokenize(state, body)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.admit(body.model, 0)
        vocab = engine.processor.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: {bad[:5]} outside the vocabulary [0, {vocab})", param="tokens")
        if state.tokenizer is None:
            raise APIError(400, "tokens: this model has no tokenizer", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    app.include_router(api)

    @app.get("/health")
    async def health() -> Response:
        try:
            engine.check_health()
        except EngineError as e:
            return engine_unavailable(e).response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": weavelm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if not engine.errored:
            try:
                state.metrics.set_stats(await engine.get_stats())
            except EngineError:
                pass
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _tokenize(state: ServeState, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give exactly one of `prompt` and `messages`", param="prompt")
    try:
        if body.messages is not None:
            return render_chat(state.tokenizer, body.messages, body.add_generation_prompt)["prompt_token_ids"]
        if body.add_special_tokens:
            return state.engine.processor.tokenize(body.prompt)[1]
        if state.tokenizer is None:
            raise RequestError("prompt: this model has no tokenizer")
        try:
            return list(state.tokenizer.encode(body.prompt, add_special_tokens=False))
        except Exception as e:
            raise RequestError(f"prompt: the tokenizer cannot encode it ({type(e).__name__}: {e})") from e
    except RequestError as e:
        raise bad_request(e) from None

