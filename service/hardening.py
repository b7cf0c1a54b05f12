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
"""

from __future__ import annotations


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
