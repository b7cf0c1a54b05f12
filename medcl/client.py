"""Python client of the medcl service, synchronous and asynchronous, with retries and clear errors.

    from medcl.client import MedclClient
    with MedclClient("http://127.0.0.1:3000", api_key="medcl_...") as client:
        client.classify(["tile.png"], top_k=3)
        client.search(["tile.png"], k=10, label="neutrophil")

``api_key`` defaults to ``MEDCL_API_KEY``; ``url`` to ``MEDCL_URL`` (else http://127.0.0.1:3000).
Idempotent calls (everything but adding cases) are retried on connection failures and on 429/502/503/504
with exponential backoff; adding cases is retried only when the request never reached the server, so a
retry can never add a case twice. Errors raise ``MedclAPIError`` with the status and the service's message.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Union

import httpx

from medcl.errors import MedclError

ImageInput = Union[str, os.PathLike, bytes]
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Failures where the request provably never reached the server: safe to retry even for writes.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class MedclAPIError(MedclError, RuntimeError):
    """The service refused or failed a request. ``status`` is the HTTP status (0: no answer at all)."""

    def __init__(self, status: int, message: str, request_id: str | None = None) -> None:
        self.status, self.message, self.request_id = status, message, request_id
        where = f" (request {request_id})" if request_id else ""
        super().__init__(f"HTTP {status}: {message}{where}" if status else f"{message}{where}")


def _files(images: Iterable[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    out = []
    for i, image in enumerate(images):
        if isinstance(image, (bytes, bytearray)):
            out.append(("images", (f"image-{i}", bytes(image), "application/octet-stream")))
        else:
            path = Path(image)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise MedclAPIError(0, f"cannot read {path}: {e.strerror or e}") from None
            out.append(("images", (path.name, data, "application/octet-stream")))
    if not out:
        raise MedclAPIError(0, "no images given")
    return out


def _form(fields: dict[str, Any]) -> dict[str, str]:
    """Multipart form values: scalars as text, lists and objects as JSON (what BentoML parses)."""
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items() if v is not None}


def _error(response: httpx.Response) -> MedclAPIError:
    try:
        body = response.json()
        message = body.get("error") or body.get("detail") or body.get("message") or json.dumps(body)
    except ValueError:
        message = response.text.strip()[:500] or response.reason_phrase
    return MedclAPIError(response.status_code, str(message), response.headers.get("x-request-id"))


def _filters(label=None, case_id=None, slide_id=None, site=None, date_from=None, date_to=None) -> dict[str, Any]:
    values = {"label": label, "case_id": case_id, "slide_id": slide_id, "site": site,
              "date_from": str(date_from) if date_from else None, "date_to": str(date_to) if date_to else None}
    return {k: v for k, v in values.items() if v is not None}


class _Calls:
    """What each call sends: (method, path, idempotent, httpx arguments). Shared by both clients."""

    @staticmethod
    def classify(images: Iterable[ImageInput], top_k: int = 5, model: str | None = None,
                 pixel_size_um: float | None = None):
        fields = {"top_k": top_k, "model": model, "pixel_size_um": pixel_size_um}
        return "POST", "/classify", True, {"files": _files(images), "data": _form(fields)}

    @staticmethod
    def embed(images: Iterable[ImageInput], model: str | None = None, pixel_size_um: float | None = None):
        return "POST", "/embed", True, {"files": _files(images),
                                        "data": _form({"model": model, "pixel_size_um": pixel_size_um})}

    @staticmethod
    def segment(images: Iterable[ImageInput], pixel_size_um: float | None = None, return_mask: bool = False,
                return_geojson: bool = False, model: str | None = None, modality: str = "auto"):
        fields = {"pixel_size_um": pixel_size_um, "return_mask": return_mask, "return_geojson": return_geojson,
                  "model": model, "modality": modality}
        return "POST", "/segment", True, {"files": _files(images), "data": _form(fields)}

    @staticmethod
    def models():
        return "GET", "/models", True, {}

    @staticmethod
    def search(images=None, vectors=None, k: int = 10, model_version: str | None = None, **filters):
        fields = {"k": k, **_filters(**filters)}
        if vectors is not None:
            return "POST", "/search", True, {"json": {**fields, "vectors": vectors, "model_version": model_version}}
        return "POST", "/search", True, {"files": _files(images or []), "data": _form(fields)}

    @staticmethod
    def add_cases(images=None, vectors=None, metadata: list[dict] | None = None, model_version: str | None = None):
        if vectors is not None:
            body = {"vectors": vectors, "metadata": metadata or [], "model_version": model_version}
            return "POST", "/cases", False, {"json": body}
        return "POST", "/cases", False, {"files": _files(images or []), "data": _form({"metadata": metadata or []})}

    @staticmethod
    def get_case(case_id: str):
        return "GET", f"/cases/{case_id}", True, {}

    @staticmethod
    def delete_case(case_id: str):
        return "DELETE", f"/cases/{case_id}", True, {}


class _Base:
    def __init__(self, url: str | None, api_key: str | None, timeout: float, retries: int, backoff: float) -> None:
        self.url = (url or os.environ.get("MEDCL_URL") or "http://127.0.0.1:3000").rstrip("/")
        key = api_key if api_key is not None else os.environ.get("MEDCL_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("retry-after") if response is not None else None
        if after and after.isdigit():
            return min(float(after), 30.0)
        return self.backoff * (2 ** attempt)

    def _decide(self, attempt: int, idempotent: bool, response: httpx.Response | None,
                error: Exception | None) -> bool:
        """True to retry."""
        if attempt >= self.retries:
            return False
        if error is not None:
            return idempotent or isinstance(error, _NOT_SENT)
        return idempotent and response is not None and response.status_code in RETRY_STATUSES

    def _result(self, response: httpx.Response | None, error: Exception | None) -> Any:
        if error is not None:
            raise MedclAPIError(0, f"no answer from {self.url}: {type(error).__name__}: {error}") from None
        assert response is not None
        if response.status_code >= 400:
            raise _error(response)
        return response.json()


class MedclClient(_Base):
    """Blocking client; one pooled connection set, so reuse it (``with MedclClient(...) as c``).
    Images are paths or bytes; search filters: label, case_id, slide_id, site, date_from, date_to."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        super().__init__(url, api_key, timeout, retries, backoff)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> "MedclClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def classify(self, images: Iterable[ImageInput], top_k: int = 5, model: str | None = None,
                 pixel_size_um: float | None = None) -> list[dict]:
        """Each answer carries ``in_distribution`` (false: unlike the model's training images)."""
        return self._request(*_Calls.classify(images, top_k, model, pixel_size_um))

    def embed(self, images: Iterable[ImageInput], model: str | None = None,
              pixel_size_um: float | None = None) -> list[dict]:
        return self._request(*_Calls.embed(images, model, pixel_size_um))

    def segment(self, images: Iterable[ImageInput], pixel_size_um: float | None = None, return_mask: bool = False,
                return_geojson: bool = False, model: str | None = None, modality: str = "auto") -> list[dict]:
        return self._request(*_Calls.segment(images, pixel_size_um, return_mask, return_geojson, model, modality))

    def models(self) -> list[dict]:
        return self._request(*_Calls.models())["models"]

    def search(self, images: Iterable[ImageInput] | None = None, vectors: list[list[float]] | None = None,
               k: int = 10, model_version: str | None = None, **filters: Any) -> list[dict]:
        return self._request(*_Calls.search(images, vectors, k, model_version, **filters))

    def add_cases(self, images: Iterable[ImageInput] | None = None, vectors: list[list[float]] | None = None,
                  metadata: list[dict] | None = None, model_version: str | None = None) -> dict:
        return self._request(*_Calls.add_cases(images, vectors, metadata, model_version))

    def get_case(self, case_id: str) -> dict:
        return self._request(*_Calls.get_case(case_id))

    def delete_case(self, case_id: str) -> dict:
        return self._request(*_Calls.delete_case(case_id))

    def _request(self, method: str, path: str, idempotent: bool, kwargs: dict) -> Any:
        attempt = 0
        while True:
            response, error = None, None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                error = e
            if not self._decide(attempt, idempotent, response, error):
                return self._result(response, error)
            time.sleep(self._delay(attempt, response))
            attempt += 1

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncMedclClient(_Base):
    """The same calls for asyncio code (``async with AsyncMedclClient(...) as c: await c.classify(...)``)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        super().__init__(url, api_key, timeout, retries, backoff)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout)

    async def __aenter__(self) -> "AsyncMedclClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def classify(self, images: Iterable[ImageInput], top_k: int = 5, model: str | None = None,
                       pixel_size_um: float | None = None) -> list[dict]:
        return await self._request(*_Calls.classify(images, top_k, model, pixel_size_um))

    async def embed(self, images: Iterable[ImageInput], model: str | None = None,
                    pixel_size_um: float | None = None) -> list[dict]:
        return await self._request(*_Calls.embed(images, model, pixel_size_um))

    async def segment(self, images: Iterable[ImageInput], pixel_size_um: float | None = None,
                      return_mask: bool = False, return_geojson: bool = False, model: str | None = None,
                      modality: str = "auto") -> list[dict]:
        return await self._request(*_Calls.segment(images, pixel_size_um, return_mask, return_geojson, model,
                                                   modality))

    async def models(self) -> list[dict]:
        return (await self._request(*_Calls.models()))["models"]

    async def search(self, images: Iterable[ImageInput] | None = None, vectors: list[list[float]] | None = None,
                     k: int = 10, model_version: str | None = None, **filters: Any) -> list[dict]:
        return await self._request(*_Calls.search(images, vectors, k, model_version, **filters))

    async def add_cases(self, images: Iterable[ImageInput] | None = None, vectors: list[list[float]] | None = None,
                        metadata: list[dict] | None = None, model_version: str | None = None) -> dict:
        return await self._request(*_Calls.add_cases(images, vectors, metadata, model_version))

    async def get_case(self, case_id: str) -> dict:
        return await self._request(*_Calls.get_case(case_id))

    async def delete_case(self, case_id: str) -> dict:
        return await self._request(*_Calls.delete_case(case_id))

    async def _request(self, method: str, path: str, idempotent: bool, kwargs: dict) -> Any:
        attempt = 0
        while True:
            response, error = None, None
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                error = e
            if not self._decide(attempt, idempotent, response, error):
                return self._result(response, error)
            await asyncio.sleep(self._delay(attempt, response))
            attempt += 1
