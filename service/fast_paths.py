"""Per-request work BentoML 1.4 repeats although its answer never changes, done once instead.

``IOMixin.to_http_response`` asks the output type for its media type on every response, and for a
root model (our endpoints return lists) ``mime_type`` builds a pydantic ``TypeAdapter`` and the
full JSON schema each time just to read its ``type``. Profiling the API process at concurrency 32
(py-spy, docs/benchmarks.md) put about a quarter of the event loop's time there. The media type
of a class is fixed when the class is made, so it is computed once per class here.

Pinned to bentoml==1.4.39 like service/hardening.py; tests/test_hardening.py fails if an upgrade
moves what is patched.
"""

from __future__ import annotations


def cache_media_types() -> None:
    from _bentoml_sdk.io_models import IOMixin

    if getattr(IOMixin.mime_type, "__medcl_cached__", False):
        return
    compute = IOMixin.mime_type.__func__
    cache: dict[type, str] = {}

    def mime_type(cls) -> str:
        try:
            return cache[cls]
        except KeyError:
            cache[cls] = compute(cls)
            return cache[cls]

    mime_type.__medcl_cached__ = True
    IOMixin.mime_type = classmethod(mime_type)
