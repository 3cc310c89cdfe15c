"""LoRA adapters loaded and unloaded at run time, with vLLM's endpoints and bodies:
`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}`.

On with `--enable-lora` plus `--lora-allowed-paths DIR [DIR ...]` (vLLM gates them behind the environment variable
VLLM_ALLOW_RUNTIME_LORA_UPDATING; here the operator names the directories adapters may be loaded from, so a client
cannot make the server read any other file). A path is checked after resolving symlinks and `..`; the adapter
is then read and checked by the engine core (`weavelm.lora.adapter.load_adapter`: the same checks as an adapter
configured at startup) before it is listed in /v1/models, so a bad one gets 400 with the reason and is never
served. The registry lives in the engine core: every API server (`--api-server-count`) sees an adapter as soon as
any of them loaded it. Unloading lets requests already running on the adapter finish; new ones naming it get 404.
"""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from weavelm.errors import LoRAError, WeaveError
from weavelm.serve.errors import APIError, bad_request
from weavelm.serve.serving import ServeState

ALLOWED_FLAG = "--lora-allowed-paths"


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1, description="The name requests use as `model`.")
    lora_path: str = Field(min_length=1, description="A PEFT adapter directory under --lora-allowed-paths.")
    load_inplace: bool = Field(False, description="Replace a loaded adapter of that name (vLLM's field); "
                                                  "requests running on the old one finish on it.")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = Field(None, description="Accepted (vLLM's field); the name decides.")


def allowed_roots(paths: list[str] | None) -> list[str]:
    """The real paths of the `--lora-allowed-paths` directories; WeaveError naming one that is not a directory."""
    roots = []
    for path in paths or []:
        if not os.path.isdir(path):
            raise WeaveError(f"{ALLOWED_FLAG}: {path!r} is not a directory")
        roots.append(os.path.realpath(path))
    return roots


def _check_path(path: str, roots: list[str]) -> str:
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise APIError(403, f"lora_path: {path!r} is not under a directory of {ALLOWED_FLAG}; put the adapter "
                            f"there, or start the server with that directory in {ALLOWED_FLAG}",
                       param="lora_path", type="permission_error")
    return real


def add_lora_routes(api: APIRouter, state: ServeState, roots: list[str]) -> None:
    """The two endpoints on `api`; `roots`: `allowed_roots(...)` (none: run-time updates are refused)."""

    def check_enabled() -> None:
        if state.engine.config.lora is None:
            raise APIError(400, "LoRA adapters are off on this server; start it with --enable-lora and "
                                f"{ALLOWED_FLAG} DIR to load adapters at run time")
        if not roots:
            raise APIError(403, f"loading and unloading LoRA adapters at run time is off; start the server with "
                                f"{ALLOWED_FLAG} DIR [DIR ...] (the directories adapters may be loaded from)",
                           type="permission_error")

    @api.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        check_enabled()
        if body.lora_name in state.model_names:
            raise APIError(400, f"lora_name: {body.lora_name!r} is the name of the base model; choose another",
                           param="lora_name")
        path = _check_path(body.lora_path, roots)
        try:
            await state.engine.load_lora_adapter(body.lora_name, path, body.load_inplace)
        except LoRAError as e:
            raise bad_request(e) from None
        await state.refresh_adapters()
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @api.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_enabled()
        if not await state.engine.remove_lora(body.lora_name):
            raise APIError(404, f"lora_name: no LoRA adapter {body.lora_name!r} is loaded", param="lora_name",
                           code="model_not_found")
        await state.refresh_adapters()
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
