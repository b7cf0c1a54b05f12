"""Input rules BentoML 1.4 does not enforce itself, applied when the service module is imported.

BentoML's multipart parser treats a *text* value in a file field as a URL and downloads it from the
server (``_bentoml_impl.serde.MultipartSerde.ensure_file``). For a service that receives patient
images that is the wrong default twice over: the server would fetch whatever a client names
(server-side request forgery, guarded only by a check that needs uvloop, absent here, where it
failed with a 500 instead), and images would enter from places no one audits. Here a file field
takes uploaded files only; anything else is a 400 that says so.

And a malformed multipart body (no boundary, broken parts) makes Starlette raise its 400
HTTPException inside BentoML's parser, which BentoML turns into a 500; here it stays a 400.

Both found by schemathesis (tests/test_fuzz_and_corpus.py). Pinned to bentoml==1.4.39; those tests
fail if an upgrade moves what is patched.

Found by attack runs (docs/reliability.md): an upload's filename becomes the suffix of a temporary
file's name, so a name of 245+ characters was an OSError (a 500): names are cut to their last 100
characters here. A form field nested 5,000 deep was a RecursionError in BentoML's JSON parsing (a
500): any request body nested too deeply is a 400 here. BentoML labels its request metrics with the
raw URL path, so 5,000 requests to random paths made 5,000 time series (/metrics grew to 22 MB):
its metrics see a bounded route name here (``bound_request_metric_labels``). And BentoML logs every
4xx with a full traceback at ERROR: a client's mistake is one line at INFO here (``quiet_client_errors``).

And BentoML's internal client (API service -> model service) replaces its aiohttp session every 100
requests or 5 minutes by *closing* the old one at once, while other requests may still be reading
their answers from it: they fail with ``RuntimeError: Connection closed.`` (a 500) or wait for the
timeout (a 504). Seen in the load test as 6 x 500 and 3 x 504 in 17,456 requests at concurrency 16.
Here the old session is closed only once every request that could be using it has had its full
timeout (``defer_session_close``).
"""

from __future__ import annotations

import asyncio
import time


def harden_multipart_parsing() -> None:
    from _bentoml_impl.serde import MultipartSerde
    from bentoml.exceptions import BadInput
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    parse_request = MultipartSerde.parse_request

    async def parse_or_refuse(self, request, cls):
        try:
            return await parse_request(self, request, cls)
        except HTTPException as e:
            raise BadInput(f"malformed multipart/form-data body: {e.detail}") from None
        except RecursionError:
            raise BadInput("a form field's JSON is nested too deeply") from None

    MultipartSerde.parse_request = parse_or_refuse

    async def ensure_file(obj):
        if isinstance(obj, UploadFile):
            if obj.filename:
                obj.filename = safe_filename(obj.filename)
            return obj
        raise BadInput("image fields take uploaded files (multipart file parts) or, in JSON, base64 strings in "
                       "'images_base64'; the service never fetches URLs")

    MultipartSerde.ensure_file = staticmethod(ensure_file)


def safe_filename(name: str, keep: int = 100) -> str:
    """A client's filename as it may end a temporary file's name: no path, no control characters,
    at most ``keep`` characters (the tail, which holds the extension) and 200 bytes."""
    name = "".join(c for c in name.replace("\\", "/").rsplit("/", 1)[-1] if c.isprintable())
    name = name[-keep:]
    while len(name.encode("utf-8")) > 200:
        name = name[1:]
    return name


def refuse_deep_json() -> None:
    """A JSON body nested too deeply is a 400, not a RecursionError (a 500)."""
    from _bentoml_impl.serde import JSONSerde
    from bentoml.exceptions import BadInput

    parse_request = JSONSerde.parse_request
    if getattr(parse_request, "__medcl_patched__", False):
        return

    async def parse_or_refuse(self, request, cls):
        try:
            return await parse_request(self, request, cls)
        except RecursionError:
            raise BadInput("the JSON body is nested too deeply") from None

    parse_or_refuse.__medcl_patched__ = True
    JSONSerde.parse_request = parse_or_refuse


def bound_request_metric_labels(label) -> None:
    """BentoML's request metrics labelled by ``label(path)`` (a bounded route name), not the raw path.

    Its middleware reads ``scope["path"]`` for its labels and passes the same scope on; here it sees a
    copy with the bounded name, and the app behind it gets the original path back."""
    from bentoml._internal.server.http import instruments

    for cls in (instruments.RunnerTrafficMetricsMiddleware, instruments.HTTPTrafficMetricsMiddleware):
        if getattr(cls.__call__, "__medcl_patched__", False):
            continue
        original_init, original_call = cls.__init__, cls.__call__

        def __init__(self, app, *args, _init=original_init, **kwargs):
            async def with_raw_path(scope, receive, send):
                raw = scope.get("medcl.raw_path")
                await app({**scope, "path": raw} if raw is not None else scope, receive, send)

            _init(self, with_raw_path, *args, **kwargs)

        async def __call__(self, scope, receive, send, _call=original_call):
            if scope.get("type") in ("http", "websocket") and scope.get("path") != "/metrics":
                scope = {**scope, "path": label(scope["path"]), "medcl.raw_path": scope["path"]}
            await _call(self, scope, receive, send)

        __call__.__medcl_patched__ = True
        cls.__init__, cls.__call__ = __init__, __call__


def quiet_client_errors() -> None:
    """4xx answers logged as one line (the request log has the rest), 5xx with their traceback as before."""
    import logging
    import sys

    from _bentoml_impl.server import app as bentoml_app
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    original = bentoml_app.log_exception
    if getattr(original, "__medcl_patched__", False):
        return
    log = logging.getLogger("medcl.service")

    def log_exception(request, *args, **kwargs):
        error = sys.exc_info()[1]
        client_error = isinstance(error, ValidationError) or (
            isinstance(error, BentoMLException) and int(error.error_code) < 500)
        if client_error:
            log.info("%s %s: %s", request.method, request.url.path[:200], str(error).splitlines()[0][:300])
            return
        original(request, *args, **kwargs)

    log_exception.__medcl_patched__ = True
    bentoml_app.log_exception = log_exception


def defer_session_close() -> None:
    """Close a replaced internal-client session after the client timeout, not under in-flight requests."""
    from _bentoml_impl.client.proxy2 import SessionManager

    async def get_session(self):
        if self._session is None or self._should_refresh():
            if self._session is not None:
                grace = (self._timeout.total or 60.0) + 1.0
                old = self._session
                loop = asyncio.get_running_loop()
                loop.call_later(grace, lambda: loop.create_task(old.close()))
            self._session = self._make_client()
            self._created_at = time.monotonic()
            self._request_count = 0
        self._request_count += 1
        return self._session

    SessionManager.get_session = get_session
