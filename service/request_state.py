"""Work that stops: a request's deadline and whether its client is still there.

The ASGI middleware (service/middleware.py) gives every request a ``RequestState``: a deadline of
``MEDCL_REQUEST_TIMEOUT_S`` from its arrival, and a flag that is set when the client disconnects
(uvicorn reports ``http.disconnect`` on the request's receive channel). Handlers run in worker
threads with a copy of the request's context, so the long loops of a request (images of a batch,
windows of a large tile) call ``check_alive()`` between steps and stop there: an abandoned
``/segment`` on three 16-megapixel tiles stops within one window instead of computing on for a
minute. Outside a request (tests, the CLI, a model service in its own process) it does nothing.
"""

from __future__ import annotations

import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus

from bentoml.exceptions import BentoMLException

REQUEST_TIMEOUT_S = float(os.environ.get("MEDCL_REQUEST_TIMEOUT_S", 100))


class RequestTimedOut(BentoMLException):
    error_code = HTTPStatus.GATEWAY_TIMEOUT


class ClientGone(BentoMLException):
    # Nobody reads this answer; the request log records the request as 499 (client closed request).
    error_code = HTTPStatus.REQUEST_TIMEOUT


@dataclass
class RequestState:
    deadline: float  # time.monotonic() after which the request's work stops
    disconnected: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def starting_now(cls, timeout_s: float = REQUEST_TIMEOUT_S) -> "RequestState":
        return cls(deadline=time.monotonic() + timeout_s)

    def check(self) -> None:
        if self.disconnected.is_set():
            raise ClientGone("the client closed the connection; the request's work was stopped")
        if time.monotonic() > self.deadline:
            raise RequestTimedOut(f"the request took longer than {REQUEST_TIMEOUT_S:g} s (MEDCL_REQUEST_TIMEOUT_S) "
                                  "and was stopped; send fewer or smaller images per request")


CURRENT: ContextVar[RequestState | None] = ContextVar("medcl_request_state", default=None)


def check_alive() -> None:
    """Raise if the current request has passed its deadline or lost its client; no-op outside a request."""
    state = CURRENT.get()
    if state is not None:
        state.check()
