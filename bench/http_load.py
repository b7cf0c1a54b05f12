"""Closed-loop HTTP load: N clients, each sending its next request as soon as the last one is answered.

Request bodies are built once, before timing, so the load generator spends its (shared) CPU on
sending, not on encoding. The measurement window starts after every client has had one answer
(warm-up: connections, first batches; nobody pauses, so the pipeline is full when it opens) and lasts at least ``seconds`` and at least three times the
slowest warm-up latency, so large requests at high concurrency still complete several rounds.\nThroughput counts the answers that arrive inside the window; latency percentiles are theirs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import aiohttp

from bench.engines import summarise_latencies


@dataclass(frozen=True)
class Request:
    """One prepared request: raw body bytes and their content type; ``images`` it carries."""

    body: bytes
    content_type: str
    images: int


def multipart_images(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> Request:
    """A multipart/form-data body with every file in field ``images`` (what /classify takes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        kind = "image/png" if filename.lower().endswith(".png") else "image/jpeg"
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{filename}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return Request(b"".join(parts), f"multipart/form-data; boundary={boundary}", len(files))


def raw_image(data: bytes, filename: str | None = None) -> Request:
    """The image as the whole body (TorchServe's inference API; the service's lean form), typed by its
    file name's suffix when one is given, else as plain bytes."""
    suffix = (filename or "").lower().rsplit(".", 1)[-1]
    kind = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "tif": "image/tiff",
            "tiff": "image/tiff"}.get(suffix, "application/octet-stream")
    return Request(data, kind, 1)


def run_closed_loop(url: str, requests: list[Request], concurrency: int, seconds: float,
                    headers: dict[str, str] | None = None, timeout: float = 300) -> dict:
    return asyncio.run(_closed_loop(url, requests, concurrency, seconds, headers or {}, timeout))


async def _closed_loop(url: str, requests: list[Request], concurrency: int, seconds: float,
                       headers: dict[str, str], timeout: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    images = 0
    answered_once: set[int] = set()
    slowest_warmup = 0.0
    window: dict[str, float] = {}

    async def client(worker: int, session: aiohttp.ClientSession) -> None:
        nonlocal images, slowest_warmup
        n = worker
        while True:
            request = requests[n % len(requests)]
            n += concurrency
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=request.body, headers={**headers, "Content-Type": request.content_type}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            t1 = time.perf_counter()
            if not window:  # warming up; the window opens when every client has had one answer
                slowest_warmup = max(slowest_warmup, t1 - t0)
                answered_once.add(worker)
                if len(answered_once) == concurrency:
                    window.update(start=t1, end=t1 + max(seconds, 3 * slowest_warmup))
                continue
            if t1 > window["end"]:
                return
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(t1 - t0)
                images += request.images

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(w, session) for w in range(concurrency)))
    elapsed = window["end"] - window["start"]
    result = summarise_latencies(latencies, images=images, requests=len(latencies), elapsed=elapsed)
    result["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    return result
