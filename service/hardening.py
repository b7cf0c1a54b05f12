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

    MultipartSerde.parse_request = parse_or_refuse

    async def ensure_file(obj):
        if isinstance(obj, UploadFile):
            return obj
        raise BadInput("image fields take uploaded files (multipart file parts) or, in JSON, base64 strings in "
                       "'images_base64'; the service never fetches URLs")

    MultipartSerde.ensure_file = staticmethod(ensure_file)


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
