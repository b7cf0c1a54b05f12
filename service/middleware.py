"""ASGI middleware of the HTTP API: request ids, JSON request logs and one error shape; API keys; the
request body read under a size limit and a deadline; the client watched for disconnects.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that bodies and responses pass untouched.
Added to the BentoML service with ``add_asgi_middleware``; the first added is the outermost:

    RequestContextMiddleware   id, log line, deadline, every 4xx/5xx body as {"error", "request_id"}
    ApiKeyMiddleware           401/403 from the headers alone: no body byte is read for a caller without a key
    BodyLimitMiddleware        reads the body (size limit while streaming, MEDCL_BODY_TIMEOUT_S deadline),
                               then watches the connection so a client that leaves stops its work

The key check comes before the body so that unauthenticated clients can neither fill memory with
large bodies nor hold the service's concurrency slots with slow ones: they get a 401 at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import sys
import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medcl.auth import KeyStore
from service import metrics
from service.request_state import CURRENT, RequestState

# The whole body must arrive within this many seconds of the request's start (slow-body clients).
BODY_TIMEOUT_S = float(os.environ.get("MEDCL_BODY_TIMEOUT_S", 60))
WATCH_AFTER_S = 0.5  # a request running longer than this is watched for its client leaving

log = logging.getLogger("medcl.service")
REQUEST_ID: ContextVar[str] = ContextVar("medcl_request_id", default="-")
PRINCIPAL: ContextVar[str] = ContextVar("medcl_principal", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Probes and metrics stay open: Kubernetes and Prometheus carry no keys.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
# The OpenAPI schema and its UI, opened with MEDCL_PUBLIC_DOCS=1 (they describe the API, not its data).
DOCS_PATHS = frozenset({"/", "/docs.json", "/schema.json"})


# Request ids: 16 random hex digits drawn once per process, then a counter. Unique across processes and
# restarts as uuid4 is, without uuid4's read of the kernel's random source on every request (py-spy:
# ~10% of the event loop's time at concurrency 32).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)  # a process forked after import draws its own prefix


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


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


def error_message(body: bytes, status: int) -> str:
    """The one message of an error body, whatever shape its producer gave it: our {"error": ...},
    BentoML's 1-element array, pydantic's list of validation errors, Starlette's {"detail": ...}."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:2000] or _phrase(status)
    while isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
        data = data[0]
    if isinstance(data, dict):
        message = str(data.get("error") or data.get("message") or "")
        detail = data.get("detail")
        if isinstance(detail, list):
            described = _validation_errors(detail)
            message = f"{message}: {described}" if message and described else (message or described)
        elif detail and not message:
            message = str(detail)
        return message or _phrase(status)
    if isinstance(data, list):
        return _validation_errors(data) or _phrase(status)
    return str(data) if data is not None else _phrase(status)


def _validation_errors(errors: list) -> str:
    parts = []
    for e in errors[:10]:
        if isinstance(e, dict):
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
            parts.append(f"{where}: {e.get('msg', '')}" if where else str(e.get("msg", "")))
        else:
            parts.append(str(e))
    return "; ".join(parts)


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def metric_path(path: str) -> str:
    """The route name BentoML's request metrics may carry: probes and known routes, else "/other"."""
    return path if path in OPEN_PATHS else _endpoint(path)


class RequestContextMiddleware:
    """Gives every request an id (the client's X-Request-ID when sane, else a new one) and a deadline
    (service/request_state.py), returns the id in the response, answers every error as
    ``{"error": message, "request_id": id}`` whichever layer produced it, and writes one JSON line per
    request: id, method, path, status (499 where the client left first), duration, caller. The answer's
    ``X-Medcl-Worker`` header names the API process that produced it."""

    def __init__(self, app: ASGIApp) -> None:
        from bentoml._internal.context import server_context

        self.app = app
        self.log = _json_logger()
        # which API process answered (1..MEDCL_WORKERS): where a multi-worker problem shows, say where
        self.worker = str(server_context.worker_index or 0).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else new_request_id()
        state = RequestState.starting_now()
        id_token, principal_token = REQUEST_ID.set(request_id), PRINCIPAL.set("-")
        state_token = CURRENT.set(state)
        status = 500
        start = time.perf_counter()
        held: Message | None = None  # an error's response start, held until its body is rewritten
        error_body: list[bytes] = []

        async def send_with_id(message: Message) -> None:
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode()),
                                                  (b"x-medcl-worker", self.worker)]}
                if status >= 400:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                error_body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = json.dumps({"error": error_message(b"".join(error_body), status),
                                   "request_id": request_id}).encode()
                headers = [(k, v) for k, v in held["headers"] if k.lower() not in (b"content-length", b"content-type")]
                await send({**held, "headers": [*headers, (b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                held = None
                message = {"type": "http.response.body", "body": body}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - a bug must still answer, in the one error shape, and be logged
            log.exception("request %s %s failed", scope.get("method"), scope.get("path", "")[:200])
            if status == 500 and held is None:  # nothing sent yet
                body = json.dumps({"error": "internal error; the service log has the details",
                                   "request_id": request_id}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"x-request-id", request_id.encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            path = scope.get("path", "")
            if path not in OPEN_PATHS:  # probes every few seconds would drown the log
                seconds = time.perf_counter() - start
                logged = 499 if state.disconnected.is_set() else status
                metrics.REQUEST_SECONDS.labels(_endpoint(path), f"{logged // 100}xx").observe(seconds)
                self.log.info(json.dumps({
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "request_id": request_id,
                    "method": scope.get("method"), "path": path[:200], "status": logged,
                    "ms": round(seconds * 1000, 1), "caller": PRINCIPAL.get(),
                }))
            CURRENT.reset(state_token)
            REQUEST_ID.reset(id_token)
            PRINCIPAL.reset(principal_token)


class BodyLimitMiddleware:
    """Reads the whole request body before the handler sees it: 413 above ``max_bytes`` (by
    Content-Length before reading, or as soon as a chunked body passes it), 408 when the body has
    not arrived within ``timeout_s``. Then watches the connection: a client that disconnects while
    its request is being worked on sets the request's flag (service/request_state.py), which stops
    the work at its next step. Sits inside the key check, so only authenticated bodies are read."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

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
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # no extra task per request, unlike wait_for
                    message = await receive()
            except TimeoutError:
                metrics.ERRORS.labels(_endpoint(scope["path"]), "body_timeout").inc()
                return await _reply(send, 408, f"the request body did not arrive within {self.timeout_s:g} s "
                                               "(MEDCL_BODY_TIMEOUT_S)", [(b"connection", b"close")])
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                metrics.ERRORS.labels(_endpoint(scope["path"]), "body_too_large").inc()
                return await _reply(send, 413, too_big, [(b"connection", b"close")])
            if not message.get("more_body", False):
                break
        # one copy of the body, and none for the usual single-chunk request
        replay = [{"type": "http.request", "body": chunks[0] if len(chunks) == 1 else b"".join(chunks),
                   "more_body": False}]
        del chunks
        state = CURRENT.get()
        responding = False
        watcher: asyncio.Future | None = None

        async def watch() -> Message:
            message = await receive()  # uvicorn answers this only when the client leaves or the response ends
            if message["type"] == "http.disconnect" and not responding and state is not None:
                state.disconnected.set()
            return message

        def start_watching() -> None:
            nonlocal watcher
            watcher = asyncio.ensure_future(watch())

        # Only requests still running after WATCH_AFTER_S get a watcher: most answer sooner, and a task
        # per request cost the hot path measurable CPU; work worth stopping runs for seconds.
        timer = loop.call_later(WATCH_AFTER_S, start_watching)

        async def replayed() -> Message:
            if replay:
                return replay.pop()
            if watcher is None:
                timer.cancel()
                start_watching()
            return await asyncio.shield(watcher)

        async def send_marked(message: Message) -> None:
            nonlocal responding
            if message["type"] == "http.response.start":
                responding = True
            await send(message)

        try:
            await self.app(scope, replayed, send_marked)
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()


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
