"""The server's gate, an ASGI middleware run before routing: the API key on every path but /health, and a cap on
the request body (413, counted as it arrives, so an oversized body is never buffered)."""

from __future__ import annotations

import hmac
from typing import Any

from weavelm.serve.errors import APIError
from weavelm.serve.http_limits import DEFAULT_MAX_BODY_BYTES

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers' probes)


class Guard:
    """Wraps an ASGI app. `api_key`: required as `Authorization: Bearer KEY` on every HTTP path but /health
    (None: no key). `max_body_bytes`: the largest request body accepted (None: no cap)."""

    def __init__(self, app: Any, api_key: str | None = None, max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            error = APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key")
            await _send_error(send, error, {"www-authenticate": "Bearer"})
            return
        if self.max_body_bytes is None:
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, self._too_large(int(length)))
            return
        if length is not None:  # the server stops at content-length: no more can arrive
            await self.app(scope, receive, send)
            return
        # chunked (no length): read it here up to the cap, then hand it on
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            total += len(message.get("body", b""))
            if total > self.max_body_bytes:
                await _send_error(send, self._too_large(None))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope: dict) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.api_key.encode())

    def _too_large(self, length: int | None) -> APIError:
        size = f"{length} bytes" if length is not None else "sent in chunks"
        return APIError(413, f"the request body ({size}) is over the limit of {self.max_body_bytes} bytes "
                             f"(--max-request-body-bytes); send a smaller one", code="request_too_large")


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_error(send: Any, error: APIError, headers: dict[str, str] | None = None) -> None:
    response = error.response()
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(response.body)).encode()), *raw]})
    await send({"type": "http.response.body", "body": response.body})
