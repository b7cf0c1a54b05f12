"""The lean form of the image endpoints: one image as the whole request body, options in the query.

    curl -X POST 'http://localhost:3000/classify?top_k=3' -H 'Authorization: Bearer KEY' \\
         -H 'Content-Type: image/png' --data-binary @cell.png

This is how TorchServe and Triton clients send an image. The multipart and JSON forms of the same
routes go through BentoML's typed I/O layer (multipart parsing, a temporary file per image, an input
model built and validated, an output model wrapped and serialised); for a small image that layer
costs more CPU than the model. Here the body is the image, the query string is validated against the
route's own input model (the same names, types and bounds as the other forms), the service's method
runs on the thread pool, and the answer is the same JSON, serialised once by pydantic.

Everything around the route stays: this middleware sits inside RequestContextMiddleware (request id,
deadline, request log, one error shape), ApiKeyMiddleware (keys, scopes) and BodyLimitMiddleware
(size limit, body deadline, client watch), and inside BentoML's own request metrics. A body whose
Content-Type is not an image type passes through untouched to the BentoML route.

Which content types: ``image/png``, ``image/jpeg``, ``image/tiff`` and ``application/octet-stream``
(what TorchServe's and most HTTP clients send for bytes); the decoder checks the bytes themselves,
so a declared type never decides how an image is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics

RAW_CONTENT_TYPES = frozenset({b"image/png", b"image/jpeg", b"image/jpg", b"image/tiff", b"application/octet-stream"})
# Fields of the routes' input models that the image body replaces: they cannot come in the query.
BODY_FIELDS = frozenset({"images", "images_base64", "vectors", "metadata"})


@dataclass(frozen=True)
class RawRoute:
    """One endpoint's lean form: the service method that takes ``(name, bytes)`` uploads, the input
    model whose option fields the query is checked against, and the answer's type."""

    method: str  # name of the service method: method(uploads, **options) -> answer
    options: type[BaseModel]  # the route's BentoML input model (its body fields are refused in the query)
    answer: TypeAdapter


def _reply(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": message}).encode()


def parse_options(query: bytes, options: type[BaseModel], endpoint: str) -> dict:
    """The query string as the route's options: only its option fields, each once, validated by the
    route's own input model. Raises ValueError with a one-line message."""
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=False, max_num_fields=64)
    except ValueError:
        raise ValueError("the query string holds too many fields") from None
    allowed = set(options.model_fields) - BODY_FIELDS
    given: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            metrics.ERRORS.labels(endpoint, "unknown_option").inc()
            raise ValueError(f"unknown query parameter {key[:64]!r}; {endpoint} takes {', '.join(sorted(allowed))}")
        if key in given:
            raise ValueError(f"query parameter {key!r} given twice")
        given[key] = value
    try:
        checked = options.model_validate(given)
    except ValidationError as e:
        metrics.ERRORS.labels(endpoint, "bad_option").inc()
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValueError(f"query parameter {where}: {first.get('msg', 'not valid')}") from None
    return {name: getattr(checked, name) for name in given}


class RawImageMiddleware:
    """Answers ``POST <route>`` with an image body on the lean path; every other request goes on."""

    def __init__(self, app: ASGIApp, routes: dict[str, RawRoute], service: Callable[[], object],
                 threads: int) -> None:
        self.app, self.routes, self.service = app, routes, service
        self.limiter = anyio.CapacityLimiter(threads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope.get("method") != "POST" or _content_type(scope) not in RAW_CONTENT_TYPES:
            return await self.app(scope, receive, send)
        endpoint = scope["path"].strip("/")
        status, body = await self._answer(route, endpoint, scope, receive)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, route: RawRoute, endpoint: str, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        chunks = []
        while True:  # BodyLimitMiddleware has read and bounded the body already: this is its replay
            message = await receive()
            if message["type"] == "http.disconnect":
                return _reply(499, "the client closed the connection")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not data:
            metrics.ERRORS.labels(endpoint, "no_images").inc()
            return _reply(400, "the request body is empty: send the image's bytes as the body")
        try:
            options = parse_options(scope.get("query_string", b""), route.options, "/" + endpoint)
        except ValueError as e:
            return _reply(400, str(e))
        method = getattr(self.service(), route.method)
        try:
            answer = await anyio.to_thread.run_sync(lambda: method([("body", data)], **options),
                                                    limiter=self.limiter)
        except BentoMLException as e:
            return _reply(int(e.error_code), str(e))
        return HTTPStatus.OK, route.answer.dump_json(answer)


def _content_type(scope: Scope) -> bytes:
    for key, value in scope.get("headers") or ():
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""
