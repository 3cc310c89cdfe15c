"""The server's HTTP limits: uvicorn's own (`timeout_keep_alive`, `limit_concurrency`) plus two it lacks with its
httptools protocol: a deadline to receive a whole request (headers and body; slowloris clients trickle bytes to
hold connections forever) and a cap on the header bytes (httptools accepts any size)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # --max-request-body-bytes


@dataclass
class HTTPLimits:
    """`timeout_keep_alive`: seconds an idle keep-alive connection stays open. `request_read_timeout`: seconds a
    client has to send a whole request once it starts one (408, then the connection closes). `max_header_bytes`:
    the most bytes of request line and headers (431). `limit_concurrency`: the most connections and tasks at once;
    more get 503 (None: no limit)."""

    timeout_keep_alive: float = 5.0
    request_read_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024
    limit_concurrency: int | None = 4096


def uvicorn_kwargs(limits: HTTPLimits) -> dict[str, Any]:
    """The uvicorn.Config arguments that apply `limits`."""
    return {"timeout_keep_alive": limits.timeout_keep_alive, "limit_concurrency": limits.limit_concurrency,
            "http": _protocol_class(limits), "h11_max_incomplete_event_size": limits.max_header_bytes}


def _protocol_class(limits: HTTPLimits) -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with a per-request read deadline and a header size cap."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_bytes = 0
            self._in_headers = True
            self._read_timer = None
            self._arm()

        def _arm(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(limits.request_read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def data_received(self, data: bytes) -> None:
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > limits.max_header_bytes and \
                    not self.transport.is_closing():
                self._reject(431, "Request Header Fields Too Large",
                             f"the request line and headers are over {limits.max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._in_headers, self._header_bytes = True, 0
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            if self._in_headers or self.cycle is None or not self.cycle.response_started:
                self._reject(408, "Request Timeout",
                             f"the request was not received within {limits.request_read_timeout:g} s")
            else:
                self.transport.close()

        def _reject(self, status: int, reason: str, message: str) -> None:
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": None}}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n" % (status, reason.encode(), len(body)) + body)
            self.transport.close()

    return LimitedHttpToolsProtocol
