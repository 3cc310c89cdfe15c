"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from weavelm.errors import EngineError, RequestError
from weavelm.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("weavelm.serve")
_FIELD = re.compile(r"^(?:SamplingParams\.)?([A-Za-z_][\w.\[\]]*): ")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          431: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def bad_request(error: RequestError, renames: dict[str, str] | None = None) -> APIError:
    """A 400 from the engine's own validation error. Its message starts with the field it is about
    (`SamplingParams.temperature: ...`, `prompt: ...`); that becomes `param`, renamed to the API's name for it."""
    message = str(error)
    match = _FIELD.match(message)
    if match is None:
        return APIError(400, message)
    field = match.group(1)
    root = field.split(".")[0]
    if renames and root in renames:
        field = renames[root] + field[len(root):]
    return APIError(400, f"{field}: {message[match.end():]}", param=field)


def engine_unavailable(error: EngineError) -> APIError:
    return APIError(503, f"the engine is not available: {error}", code="engine_dead")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is a character position, not a field
        where = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"the request body is not valid JSON ({reason} at character {where})")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return APIError(400, "; ".join(parts) + more, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestError)
    async def _request(_: Request, exc: RequestError) -> JSONResponse:
        return bad_request(exc).response()

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return engine_unavailable(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
