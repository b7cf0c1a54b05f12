"""BentoML 1.4 service: /classify and /embed over an ONNX package; onnxruntime only, no torch.

Two composed services (DESIGN.md, Serving): ``Medcl`` is the HTTP API (decode, validate,
preprocess by the card), ``EncoderModel`` holds the onnxruntime session and batches adaptively.
BentoML runs them as separate processes, so the CPU-side API and the model scale separately.

    bentoml serve service.service:Medcl        # package from MEDCL_PACKAGE (default: the demo)
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from pydantic import BaseModel, Field

from medcl.card import Card
from medcl.preprocess import (DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image, normalise,
                              to_model_pixels)
from service import metrics
from service.package import ModelPackage, default_package_dir

log = logging.getLogger("medcl.service")

MAX_IMAGES_PER_REQUEST = int(os.environ.get("MEDCL_MAX_IMAGES", 256))
MAX_FILE_BYTES = int(os.environ.get("MEDCL_MAX_FILE_BYTES", 50 * 1024 * 1024))
MAX_PIXELS = int(os.environ.get("MEDCL_MAX_PIXELS", DEFAULT_MAX_PIXELS))
# BentoML's max_latency_ms is a load-shedding deadline, not a batching window: queued requests
# predicted to exceed it are cancelled with 503. 50 ms shed requests at concurrency 32 on 2 cores,
# so the deadline sits just under the request timeout and sheds only under real overload.
MAX_BATCH_SIZE = int(os.environ.get("MEDCL_MAX_BATCH_SIZE", 64))
SHED_AFTER_MS = int(os.environ.get("MEDCL_SHED_AFTER_MS", 20_000))


def uploaded_name(path: Path) -> str:
    """The client's filename: BentoML stores an upload via NamedTemporaryFile(suffix=<filename>),
    whose name is 'tmp' + 8 random characters + the suffix."""
    name = Path(path).name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ClassScore(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    label: str = Field(description="Most probable class")
    score: float = Field(description="Its softmax probability")
    top_k: list[ClassScore]
    model_version: str


class Embedding(BaseModel):
    embedding: list[float] = Field(description="L2-normalised embedding")
    dim: int
    model_version: str


@bentoml.service(name="medcl-encoder", workers=1, traffic={"timeout": 60})
class EncoderModel:
    """The onnxruntime session. Its two methods batch requests from all API workers together."""

    def __init__(self) -> None:
        self.package = ModelPackage(default_package_dir())
        card = self.package.card
        metrics.MODEL_INFO.labels(card.name, card.version, self.package.provider).set(1)

    def _run(self, batch: np.ndarray, output: str) -> np.ndarray:
        start = time.perf_counter()
        result = self.package.run(batch, output)
        name = self.package.card.name
        metrics.INFERENCE_SECONDS.labels(name, output).observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels(name, output).observe(len(batch))
        return result

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=SHED_AFTER_MS)
    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, "logits")

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=SHED_AFTER_MS)
    def embeddings(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, "embedding")


@bentoml.service(name="medcl", workers=1, threads=16, traffic={"timeout": 60, "max_concurrency": 256})
class Medcl:
    """HTTP API. Images arrive as multipart field ``images`` (one or several files)."""

    model = bentoml.depends(EncoderModel)

    def __init__(self) -> None:
        self.card = Card.load(default_package_dir())

    def _call_model(self, output: str, batch: np.ndarray, endpoint: str) -> np.ndarray:
        """Call the model service, retrying connection-level failures: inference is idempotent.

        BentoML 1.4's internal client keeps pooled connections alive for 15 s but the dependent
        service's uvicorn closes them after 5 s, so the first burst after an idle gap can hit a
        closed connection (bentoml/BentoML#4971). Seen here as 17 of 300 requests failing with 500.
        """
        call = self.model.logits if output == "logits" else self.model.embeddings
        for attempt in range(3):
            try:
                return call(batch)
            except aiohttp.ClientConnectionError:
                metrics.ERRORS.labels(endpoint, "model_connection_retry").inc()
                if attempt == 2:
                    raise ServiceUnavailable("the model service did not answer; retry shortly") from None
        raise AssertionError("unreachable")

    def _prepare(self, images: list[Path], endpoint: str) -> np.ndarray:
        if not images:
            metrics.ERRORS.labels(endpoint, "no_images").inc()
            raise InvalidArgument("send at least one image in the multipart field 'images'")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            metrics.ERRORS.labels(endpoint, "too_many_images").inc()
            raise PayloadTooLarge(f"{len(images)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")
        pixels = []
        for i, path in enumerate(images):
            name = uploaded_name(path)
            size = Path(path).stat().st_size
            if size > MAX_FILE_BYTES:
                metrics.ERRORS.labels(endpoint, "file_too_large").inc()
                raise PayloadTooLarge(f"image {i} ({name}) is {size} bytes; the limit is {MAX_FILE_BYTES}")
            try:
                pixels.append(to_model_pixels(decode_image(path, MAX_PIXELS), self.card.preprocess))
            except ImageTooLargeError as e:
                metrics.ERRORS.labels(endpoint, "too_many_pixels").inc()
                raise PayloadTooLarge(f"image {i} ({name}): {e}") from None
            except ImageDecodeError as e:
                metrics.ERRORS.labels(endpoint, "undecodable").inc()
                raise InvalidArgument(f"image {i} ({name}): {e}") from None
        metrics.IMAGES.labels(endpoint, self.card.name).inc(len(pixels))
        return normalise(np.stack(pixels), self.card.preprocess)

    @bentoml.api(route="/classify")
    def classify(self, images: list[Path], top_k: Annotated[int, Field(ge=1, le=100)] = 5) -> list[Prediction]:
        """Class, probability and top-k classes for each image, in the order sent."""
        logits = self._call_model("logits", self._prepare(images, "classify"), "classify")
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        names = self.card.class_names
        k = min(top_k, len(names))
        out = []
        for row in probs:
            order = np.argsort(-row)[:k]
            out.append(Prediction(label=names[order[0]], score=float(row[order[0]]),
                                  top_k=[ClassScore(label=names[j], probability=float(row[j])) for j in order],
                                  model_version=self.card.version))
        return out

    @bentoml.api(route="/embed")
    def embed(self, images: list[Path]) -> list[Embedding]:
        """The L2-normalised embedding of each image, in the order sent."""
        vectors = self._call_model("embedding", self._prepare(images, "embed"), "embed")
        return [Embedding(embedding=v.astype(float).tolist(), dim=int(v.shape[0]), model_version=self.card.version)
                for v in vectors]
