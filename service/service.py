"""BentoML 1.4 service: /classify and /embed over an ONNX package; onnxruntime only, no torch.

Two composed services (DESIGN.md, Serving): ``Medcl`` is the HTTP API (decode, validate,
preprocess by the card), ``EncoderModel`` holds the onnxruntime session and batches adaptively.
BentoML runs them as separate processes, so the CPU-side API and the model scale separately.

    bentoml serve service.service:Medcl        # package from MEDCL_PACKAGE (default: the demo)
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from pydantic import BaseModel, Field

from medcl.answers import softmax
from medcl.answers import top_k as most_probable  # `top_k` is the API's parameter name
from medcl.card import Card
from medcl.index import index_root, open_index
from medcl.index.schema import (CaseIndexError, CaseMetadata, DuplicateId, SearchFilter, SearchResult,
                                VersionMismatch)
from medcl.index.sources import store_source
from medcl.preprocess import (DEFAULT_MAX_PIXELS, SERVICE_FORMATS, ImageDecodeError, ImageTooLargeError, decode_image,
                              normalise, to_model_pixels)
from medcl.auth import KeyStore, auth_disabled
from service import metrics
from service.cases import cases_app
from service.hardening import defer_session_close, harden_multipart_parsing
from service.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
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
MAX_BODY_BYTES = int(os.environ.get("MEDCL_MAX_BODY_BYTES", 256 * 1024 * 1024))
# API keys (medcl/auth.py): on unless MEDCL_AUTH=off. A malformed key file stops the start here.
KEYS: KeyStore | None = None if auth_disabled() else KeyStore.from_environment()
harden_multipart_parsing()
defer_session_close()
IMAGES_BASE64 = Field(default_factory=list, description="Images as base64 strings (a data: URI prefix is accepted), "
                      "for JSON clients; multipart clients send files in 'images'")


def uploaded_name(path: Path) -> str:
    """The client's filename: BentoML stores an upload via NamedTemporaryFile(suffix=<filename>),
    whose name is 'tmp' + 8 random characters + the suffix."""
    name = Path(path).name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Conflict(BentoMLException):
    error_code = HTTPStatus.CONFLICT


class CasesAdded(BaseModel):
    ids: list[str] = Field(description="Ids of the added cases, in the order sent; returned once durable")
    model_version: str


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


@bentoml.asgi_app(cases_app, path="/")
@bentoml.service(name="medcl", workers=1, threads=16, traffic={"timeout": 60, "max_concurrency": 256})
class Medcl:
    """HTTP API. Images arrive as multipart field ``images`` (one or several files)."""

    model = bentoml.depends(EncoderModel)

    def __init__(self) -> None:
        if KEYS is not None and not KEYS.configured:
            raise RuntimeError("API keys are required but none are configured: set MEDCL_API_KEYS or "
                               "MEDCL_API_KEYS_FILE (`medcl keys new` writes one), or MEDCL_AUTH=off on a closed network")
        if KEYS is None:
            log.warning("MEDCL_AUTH=off: every endpoint is open to anyone who can reach this port")
        package = default_package_dir()
        self.card = Card.load(package)
        # The case index of exactly this model version: embeddings of versions are never mixed.
        self.index = open_index(self.card.name, self.card.version, self.card.architecture.embedding_dim)
        self.update_index_gauge()

    def update_index_gauge(self) -> None:
        metrics.INDEX_CASES.labels(self.card.name, self.card.version).set(self.index.count())

    @bentoml.on_shutdown
    def _close_index(self) -> None:
        self.index.close()  # saves the HNSW graph, if any, so the next start need not rebuild it

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

    def _uploads(self, images: list[Path], encoded: list[str], endpoint: str) -> list[tuple[str, bytes]]:
        """(name, bytes) of every image sent, multipart files first, then base64 strings."""
        if images and encoded:
            metrics.ERRORS.labels(endpoint, "images_and_base64").inc()
            raise InvalidArgument("send images as multipart files ('images') or base64 ('images_base64'), not both")
        count = len(images) + len(encoded)
        if not count:
            metrics.ERRORS.labels(endpoint, "no_images").inc()
            raise InvalidArgument("send at least one image: multipart field 'images' or JSON field 'images_base64'")
        if count > MAX_IMAGES_PER_REQUEST:
            metrics.ERRORS.labels(endpoint, "too_many_images").inc()
            raise PayloadTooLarge(f"{count} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")
        out = []
        for i, path in enumerate(images):
            size = Path(path).stat().st_size
            if size > MAX_FILE_BYTES:
                metrics.ERRORS.labels(endpoint, "file_too_large").inc()
                raise PayloadTooLarge(f"image {i} ({uploaded_name(path)}) is {size} bytes; the limit is {MAX_FILE_BYTES}")
            out.append((uploaded_name(path), Path(path).read_bytes()))
        for i, text in enumerate(encoded):
            name = f"images_base64[{i}]"
            payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
            if len(payload) * 3 // 4 > MAX_FILE_BYTES:
                metrics.ERRORS.labels(endpoint, "file_too_large").inc()
                raise PayloadTooLarge(f"{name} decodes to more than {MAX_FILE_BYTES} bytes")
            try:
                out.append((name, base64.b64decode("".join(payload.split()), validate=True)))
            except (binascii.Error, ValueError):
                metrics.ERRORS.labels(endpoint, "bad_base64").inc()
                raise InvalidArgument(f"{name} is not valid base64") from None
        return out

    def _prepare(self, uploads: list[tuple[str, bytes]], endpoint: str) -> np.ndarray:
        pixels = []
        for i, (name, data) in enumerate(uploads):
            try:
                pixels.append(to_model_pixels(decode_image(data, MAX_PIXELS, SERVICE_FORMATS), self.card.preprocess))
            except ImageTooLargeError as e:
                metrics.ERRORS.labels(endpoint, "too_many_pixels").inc()
                raise PayloadTooLarge(f"image {i} ({name}): {e}") from None
            except ImageDecodeError as e:
                metrics.ERRORS.labels(endpoint, "undecodable").inc()
                raise InvalidArgument(f"image {i} ({name}): {e}") from None
        metrics.IMAGES.labels(endpoint, self.card.name).inc(len(pixels))
        return normalise(np.stack(pixels), self.card.preprocess)

    @bentoml.api(route="/classify")
    def classify(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
                 top_k: Annotated[int, Field(ge=1, le=100)] = 5) -> list[Prediction]:
        """Class, probability and top-k classes for each image, in the order sent."""
        batch = self._prepare(self._uploads(images, images_base64, "classify"), "classify")
        probs = softmax(self._call_model("logits", batch, "classify"))
        out = []
        for row in probs:
            best = most_probable(row, self.card.class_names, top_k)
            out.append(Prediction(label=best[0][0], score=best[0][1],
                                  top_k=[ClassScore(label=name, probability=p) for name, p in best],
                                  model_version=self.card.version))
        return out

    @bentoml.api(route="/embed")
    def embed(self, images: list[Path] = Field(default_factory=list),
              images_base64: list[str] = IMAGES_BASE64) -> list[Embedding]:
        """The L2-normalised embedding of each image, in the order sent."""
        batch = self._prepare(self._uploads(images, images_base64, "embed"), "embed")
        vectors = self._call_model("embedding", batch, "embed")
        return [Embedding(embedding=v.astype(float).tolist(), dim=int(v.shape[0]), model_version=self.card.version)
                for v in vectors]

    def _query_vectors(self, uploads: list[tuple[str, bytes]], vectors: list[list[float]],
                       endpoint: str) -> np.ndarray | list:
        if uploads and vectors:
            metrics.ERRORS.labels(endpoint, "images_and_vectors").inc()
            raise InvalidArgument("send images or vectors, not both")
        if vectors:
            return vectors
        return self._call_model("embedding", self._prepare(uploads, endpoint), endpoint)

    def _uploads_or_vectors(self, images: list[Path], encoded: list[str], vectors: list[list[float]],
                            endpoint: str) -> list[tuple[str, bytes]]:
        if vectors and not images and not encoded:
            return []
        if not (images or encoded):
            metrics.ERRORS.labels(endpoint, "no_images").inc()
            raise InvalidArgument("send images (multipart 'images' or JSON 'images_base64') or vectors ('vectors')")
        return self._uploads(images, encoded, endpoint)

    @staticmethod
    def _index_error(endpoint: str, error: CaseIndexError) -> BentoMLException:
        metrics.ERRORS.labels(endpoint, type(error).__name__).inc()
        if isinstance(error, (VersionMismatch, DuplicateId)):
            return Conflict(str(error))
        return InvalidArgument(str(error))

    @bentoml.api(route="/search")
    def search(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
               vectors: list[list[float]] = Field(default_factory=list, description="Query embeddings (this model's)"),
               k: Annotated[int, Field(ge=1, le=1000)] = 10,
               label: str | None = None, case_id: str | None = None, slide_id: str | None = None,
               site: str | None = None, date_from: datetime | None = None, date_to: datetime | None = None,
               model_version: str | None = Field(None, description="The version that made `vectors`; checked")
               ) -> list[SearchResult]:
        """The k most similar indexed cases for each query image or vector, with the majority-vote label."""
        queries = self._query_vectors(self._uploads_or_vectors(images, images_base64, vectors, "search"), vectors,
                                      "search")
        where = SearchFilter(label=label, case_id=case_id, slide_id=slide_id, site=site, date_from=date_from,
                             date_to=date_to)
        start = time.perf_counter()
        try:
            results = self.index.search(queries, k=k, where=where, model_version=model_version if vectors else None)
        except CaseIndexError as e:
            raise self._index_error("search", e) from None
        metrics.SEARCH_SECONDS.labels(self.card.name, self.card.version).observe(time.perf_counter() - start)
        return results

    @bentoml.api(route="/cases")
    def add_cases(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
                  vectors: list[list[float]] = Field(default_factory=list),
                  metadata: list[CaseMetadata] = Field(default_factory=list,
                                                       description="One entry per image or vector, in order"),
                  model_version: str | None = None) -> CasesAdded:
        """Add cases (images, embedded by this model, or its vectors) with metadata; ids come back once durable.

        A posted image is kept (content-addressed) so a later model version can re-embed it; its
        source_uri records that copy unless the client gave its own."""
        uploads = self._uploads_or_vectors(images, images_base64, vectors, "cases")
        queries = self._query_vectors(uploads, vectors, "cases")
        n = len(queries)
        if metadata and len(metadata) != n:
            metrics.ERRORS.labels("cases", "metadata_count").inc()
            raise InvalidArgument(f"{n} images or vectors but {len(metadata)} metadata entries")
        metadata = metadata or [CaseMetadata() for _ in range(n)]
        if uploads:
            root = index_root()
            metadata = [m if m.source_uri else m.model_copy(update={"source_uri": store_source(root, data)})
                        for m, (_, data) in zip(metadata, uploads)]
        try:
            ids = self.index.add(queries, metadata, model_version=model_version if vectors else None)
        except CaseIndexError as e:
            raise self._index_error("cases", e) from None
        self.update_index_gauge()
        return CasesAdded(ids=ids, model_version=self.card.version)


# Outermost first: the request log sees every answer, including the limit's 413s and the keys' 401s.
Medcl.add_asgi_middleware(RequestContextMiddleware)
Medcl.add_asgi_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
Medcl.add_asgi_middleware(ApiKeyMiddleware, keys=KEYS, public_docs=os.environ.get("MEDCL_PUBLIC_DOCS") == "1")
