"""The FastAPI app of `weavelm serve`: OpenAI's endpoints over an AsyncLLM, plus health, version, tokenizer and
Prometheus endpoints."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

import weavelm
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import EngineError, RequestError
from weavelm.serve.chat import conversation, create_chat_completion
from weavelm.serve.completions import create_completion
from weavelm.serve.embeddings import EmbeddingRequest, EmbeddingResponse, create_embedding, require_runner
from weavelm.serve.errors import APIError, bad_request, engine_unavailable, install_error_handlers
from weavelm.serve.guard import DEFAULT_MAX_BODY_BYTES, Guard
from weavelm.serve.lora_routes import add_lora_routes, allowed_roots
from weavelm.serve.metrics import CONTENT_TYPE, ServerMetrics
from weavelm.serve.request_log import RequestLog
from weavelm.serve.params import model_defaults
from weavelm.serve.prompts import PromptPreparer
from weavelm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse,
                                    ModelCard, ModelList, TokenizeRequest)
from weavelm.serve.serving import ServeState

_ERRORS = {400: "Invalid request (vLLM answers validation errors with 400, never 422)",
           401: "Missing or wrong API key", 403: "Not allowed here (run-time LoRA loading off, or a path outside "
           "--lora-allowed-paths)", 404: "Unknown model", 413: "Request body over the size limit",
           429: "Too many requests waiting", 503: "The engine is not available or the server is shutting down"}


def served_adapters(config: Any) -> dict[str, Any]:
    """The LoRA adapters configured under `lora.adapters`, by name (each selectable as a `model`)."""
    if config.lora is None:
        return {}
    from weavelm.lora.manager import named_lora_requests
    return named_lora_requests(config.lora.options)


def default_model_name(model: Any) -> str:
    """The name a model is served under when none is given: a local path's last component (never the whole path:
    paths do not appear in responses), else the Hugging Face id as written."""
    text = str(model)
    return os.path.basename(os.path.normpath(text)) if os.path.exists(text) or os.path.isabs(text) else text


def build_app(engine: AsyncLLM, served_model_name: str | list[str] | None = None, api_key: str | None = None,
              max_waiting: int | None = None, metrics_dir: str | None = None,
              max_request_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
              lora_allowed_paths: list[str] | None = None, tools: Any = None) -> FastAPI:
    """An app serving `engine` under `served_model_name` (default: the model folder's name; the first of a list is
    the name in responses). With `api_key`, every endpoint but /health needs `Authorization: Bearer KEY`.
    `max_waiting`: requests waiting for their first output beyond which new ones get 429. `metrics_dir`: one of
    several API servers whose /metrics are summed through prometheus_client's multiprocess directory.
    `max_request_body_bytes`: larger bodies get 413 (None: no cap). `lora_allowed_paths`: directories LoRA adapters
    may be loaded from at run time (/v1/load_lora_adapter; none: run-time loading is refused). `tools`: the
    `weavelm.tools.settings.ToolSettings` (tool_choice "auto" and the parsers; None: no parsers)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    names = names or [default_model_name(engine.config.model)]
    state = ServeState(engine, names, api_key, max_waiting, ServerMetrics(names[0], metrics_dir),
                       model_defaults(engine), served_adapters(engine.config),
                       PromptPreparer(engine.processor, engine.max_model_len))
    if tools is not None:
        state.tools = tools
    engine.output_observer = RequestLog(engine, then=state.metrics.observe)  # log lines, then the metrics
    app = FastAPI(title="weavelm", version=weavelm.__version__,
                  description="OpenAI-compatible API of a weavelm engine")
    app.state.serve = state
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_request_body_bytes)
    app.openapi = lambda: _openapi(app)
    # errors are JSON on every route, plain-text ones (the LoRA endpoints' success message) included
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": text,
                                                      "content": {"application/json": {}}}
                                               for code, text in _ERRORS.items()}
    api = APIRouter(responses=errors)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        require_runner(state, "generate", "/v1/completions")
        await state.refresh_adapters_for(body.model)
        return await create_completion(state, body, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        require_runner(state, "generate", "/v1/chat/completions")
        await state.refresh_adapters_for(body.model)
        return await create_chat_completion(state, body, request)

    @api.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        return await create_embedding(state, body)

    @api.get("/v1/models")
    async def models() -> ModelList:
        await state.refresh_adapters()
        cards = [ModelCard(id=name, root=state.model_name, max_model_len=engine.max_model_len)
                 for name in state.model_names]
        cards += [ModelCard(id=name, root=name, parent=state.model_name, max_model_len=engine.max_model_len)
                  for name in state.adapters]
        return ModelList(data=cards)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        await state.refresh_adapters_for(body.model)
        state.admit(body.model, 0)
        ids = await _tokenize(state, body)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        await state.refresh_adapters_for(body.model)
        state.admit(body.model, 0)
        try:
            return {"prompt": await state.prompts.decode(body.tokens)}
        except RequestError as e:
            raise bad_request(e) from None

    add_lora_routes(api, state, allowed_roots(lora_allowed_paths))
    app.include_router(api)

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The engine is running (empty body)"},
        503: {"model": ErrorResponse, "description": _ERRORS[503]}})
    async def health() -> Response:
        try:
            engine.check_health()
        except EngineError as e:
            return engine_unavailable(e).response()
        return Response(status_code=200)

    @app.get("/version", responses={401: errors[401]})
    async def version() -> dict[str, str]:
        return {"version": weavelm.__version__}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {CONTENT_TYPE.split(";")[0]: {}}},
        401: errors[401]})
    async def metrics() -> Response:
        if not engine.errored:
            try:
                state.metrics.set_stats(await engine.get_stats())
            except EngineError:
                pass
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _tokenize(state: ServeState, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give exactly one of `prompt` and `messages`", param="prompt")
    try:
        if body.messages is not None:
            rendered = await state.prompts.chat(conversation(body.messages), body.add_generation_prompt,
                                                check_length=False)
            return rendered["prompt_token_ids"]
        return await state.prompts.encode(body.prompt, body.add_special_tokens)
    except RequestError as e:
        raise bad_request(e) from None


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with validation errors documented as what they are: 400 in OpenAI's error shape."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
