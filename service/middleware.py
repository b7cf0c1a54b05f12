"""ASGI middleware of the HTTP API: request ids and JSON request logs, a request-body limit, API keys.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that streamed bodies and responses pass untouched.
Added to the BentoML service with ``add_asgi_middleware``; the first added is the outermost, so the
request log also records the 401s and 413s that the inner ones answer.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medcl.auth import KeyStore
from service import metrics

REQUEST_ID: ContextVar[str] = ContextVar("medcl_request_id", default="-")
PRINCIPAL: ContextVar[str] = ContextVar("medcl_principal", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Probes and metrics stay open: Kubernetes and Prometheus carry no keys.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
# The OpenAPI schema and its UI, opened with MEDCL_PUBLIC_DOCS=1 (they describe the API, not its data).
DOCS_PATHS = frozenset({"/", "/docs.json", "/schema.json"})


def _json_logger() -> logging.Logger:
    logger = logging.getLogger("medcl.requests")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})  # X-Request-ID is added by RequestContextMiddleware
    await send({"type": "http.response.body", "body": body})


_KNOWN = frozenset({"/classify", "/embed", "/search", "/cases", "/models", "/segment", "/docs.json", "/"})


def _endpoint(path: str) -> str:
    """A bounded metrics label: the first path segment (never a case id); unknown paths share one
    label, so probing random URLs cannot grow the number of time series."""
    first = "/" + path.strip("/").split("/", 1)[0]
    return first if first in _KNOWN else "/other"


class RequestContextMiddleware:
    """Gives every request an id (the client's X-Request-ID when sane, else a new one), returns it in
    the response, and writes one JSON line per request: id, method, path, status, duration, caller."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = _json_logger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        id_token, principal_token = REQUEST_ID.set(request_id), PRINCIPAL.set("-")
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            if path not in OPEN_PATHS:  # probes every few seconds would drown the log
                seconds = time.perf_counter() - start
                metrics.REQUEST_SECONDS.labels(_endpoint(path), f"{status // 100}xx").observe(seconds)
                self.log.info(json.dumps({
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "request_id": request_id,
                    "method": scope.get("method"), "path": path, "status": status,
                    "ms": round(seconds * 1000, 1), "caller": PRINCIPAL.get(),
                }))
            REQUEST_ID.reset(id_token)
            PRINCIPAL.reset(principal_token)


class BodyLimitMiddleware:
    """413 for bodies above ``max_bytes``: by Content-Length before reading, or while reading a chunked
    body (buffered up to the limit, then replayed), so an endless upload cannot fill memory or disk."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = f"request body above the limit of {self.max_bytes} bytes (MEDCL_MAX_BODY_BYTES)"
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "Content-Length is not a number")
            if int(length) > self.max_bytes:
                metrics.ERRORS.labels(_endpoint(scope["path"]), "body_too_large").inc()
                return await _reply(send, 413, too_big)
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                metrics.ERRORS.labels(_endpoint(scope["path"]), "body_too_large").inc()
                return await _reply(send, 413, too_big)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def required_scope(method: str, path: str) -> str:
    """The scope a request needs: changing the index is ``write``, changing models ``admin``."""
    if path.startswith("/admin/") or path == "/models/reload":
        return "admin"
    if (path == "/cases" and method == "POST") or (path.startswith("/cases/") and method == "DELETE"):
        return "write"
    return "read"


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every path but the probes and /metrics: 401 without a valid key,
    403 when the key lacks the scope. Unknown paths also need a key (no probing of the route table)."""

    def __init__(self, app: ASGIApp, keys: KeyStore | None, public_docs: bool = False) -> None:
        self.app, self.keys = app, keys
        self.open = OPEN_PATHS | (DOCS_PATHS if public_docs else frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.keys is None or scope["path"] in self.open \
                or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope["path"])
        challenge = [(b"www-authenticate", b'Bearer realm="medcl"')]
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            metrics.ERRORS.labels(endpoint, "unauthenticated").inc()
            return await _reply(send, 401, "an API key is required: send 'Authorization: Bearer KEY'", challenge)
        principal = self.keys.authenticate(token.strip())
        if principal is None:
            metrics.ERRORS.labels(endpoint, "unauthenticated").inc()
            return await _reply(send, 401, "the API key is not valid (unknown or revoked)", challenge)
        PRINCIPAL.set(principal.name)
        needed = required_scope(scope.get("method", ""), scope["path"])
        if not principal.allows(needed):
            metrics.ERRORS.labels(endpoint, "forbidden").inc()
            return await _reply(send, 403, f"the key '{principal.name}' lacks the '{needed}' scope needed here")
        return await self.app(scope, receive, send)
