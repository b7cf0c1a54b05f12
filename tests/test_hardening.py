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
