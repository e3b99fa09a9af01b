"""Pure-ASGI layers around the app: request log (no content, ever), API key, body size limit.

They are plain ASGI (not BaseHTTPMiddleware) so a streamed response passes through unbuffered and a client's
disconnect still reaches the endpoint.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from typing import Optional

from fastapi import HTTPException

log = logging.getLogger("medrwr_edge.serve")

# Paths that answer without the API key: the static page (holds no data; it asks the user for the key) and health.
OPEN_PATHS = {"/", "/v1/health"}


async def send_json_error(send, status: int, message: str, kind: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """Gives every request an id (X-Request-ID) and logs id, method, path, status and time. Nothing else: no
    query string, no headers, no body, so no question text and no DICOM tag can reach the log."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        t0 = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # a bug: answer 500 and log the type only (the text could quote patient data);
            # not re-raised, so the server does not print a traceback with the exception's text either
            log.error("%s unexpected %s", request_id, type(e).__name__)
            if status["code"] == 0:
                status["code"] = 500
                await send_json_error(send_with_id, 500, "internal error (see the server log)", "server_error")
        finally:
            log.info("%s %s %s %d %.0fms", request_id, scope["method"], _route(scope), status["code"],
                     (time.perf_counter() - t0) * 1000)


KNOWN_ROUTES = {"/", "/v1/ask", "/v1/chat/completions", "/v1/packs", "/v1/models", "/v1/health", "/openapi.json"}


def _route(scope) -> str:
    """The route, never the raw path of an unknown URL (a client could put anything in it)."""
    path = scope.get("path", "")
    if path.startswith("/v1/reports/"):
        return "/v1/reports/{id}"
    return path if path in KNOWN_ROUTES else "(unknown path)"


class ApiKeyAuth:
    """`Authorization: Bearer KEY`, compared in constant time. CORS preflights pass (they carry no credentials)."""

    def __init__(self, app, api_key: Optional[str]):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if not hmac.compare_digest(given, self.key):
            await send_json_error(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                  "authentication_error", {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit:,} bytes")


class BodyLimit:
    """Refuse a declared Content-Length over the limit before reading anything; count a chunked body as it
    arrives and stop at the limit (the endpoint's parser then fails with 413, never having buffered more)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await send_json_error(send, 413, f"request body larger than {self.max_bytes:,} bytes",
                                          "request_too_large")
                    return
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as e:
            if not started:
                await send_json_error(send, 413, e.detail, "request_too_large")
