"""The BentoML internals service/hardening.py patches, exercised on the real classes (bentoml==1.4.39)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("bentoml")


def test_replaced_internal_session_stays_open_for_in_flight_requests() -> None:
    from _bentoml_impl.client.proxy2 import SessionManager

    from service.hardening import defer_session_close

    defer_session_close()

    async def scenario() -> tuple[bool, bool, bool]:
        manager = SessionManager("http://127.0.0.1:9", timeout=0.2, headers={}, max_requests=1)
        first = await manager.get_session()
        await manager.get_session()
        second = await manager.get_session()  # the 3rd call passes max_requests: a fresh session
        replaced_open_now = not first.closed and second is not first
        await asyncio.sleep(1.5)  # past the client timeout + 1 s grace
        replaced_closed_later = first.closed
        await manager.close()
        return replaced_open_now, replaced_closed_later, second.closed

    open_now, closed_later, current_closed = asyncio.run(scenario())
    assert open_now, "the replaced session was closed while requests could still be reading from it"
    assert closed_later, "the replaced session was never closed (a connection leak)"
    assert current_closed


def test_media_types_are_computed_once_per_class_and_unchanged() -> None:
    from _bentoml_sdk.io_models import IOMixin, ensure_io_descriptor

    from pydantic import BaseModel

    from service.fast_paths import cache_media_types

    class Prediction(BaseModel):  # the shape of the service's answers (service.service needs a package)
        label: str
        score: float

    originals = {}
    for typ in (list[Prediction], Prediction, str, dict):
        descriptor = ensure_io_descriptor(typ)
        originals[typ] = (descriptor, IOMixin.mime_type.__func__(descriptor))
    cache_media_types()
    cache_media_types()  # idempotent: the module is imported by every worker
    for typ, (descriptor, expected) in originals.items():
        assert descriptor.mime_type() == expected
    # the second call must not rebuild the JSON schema
    descriptor = originals[list[Prediction]][0]
    calls = []
    original_schema = descriptor.model_json_schema
    descriptor.model_json_schema = classmethod(lambda cls, *a, **k: calls.append(1) or original_schema(*a, **k))
    try:
        descriptor.mime_type()
    finally:
        del descriptor.model_json_schema
    assert calls == []


def test_onnxruntime_threads_do_not_spin_in_the_server(tiny_package) -> None:
    from service.package import ModelPackage, session_options

    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    package = ModelPackage(tiny_package, threads=1)
    assert package.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
