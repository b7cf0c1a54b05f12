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
from medcl.preprocess import (DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image, normalise,
                              to_model_pixels)
from service import metrics
from service.cases import cases_app
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
        probs = softmax(self._call_model("logits", self._prepare(images, "classify"), "classify"))
        out = []
        for row in probs:
            best = most_probable(row, self.card.class_names, top_k)
            out.append(Prediction(label=best[0][0], score=best[0][1],
                                  top_k=[ClassScore(label=name, probability=p) for name, p in best],
                                  model_version=self.card.version))
        return out

    @bentoml.api(route="/embed")
    def embed(self, images: list[Path]) -> list[Embedding]:
        """The L2-normalised embedding of each image, in the order sent."""
        vectors = self._call_model("embedding", self._prepare(images, "embed"), "embed")
        return [Embedding(embedding=v.astype(float).tolist(), dim=int(v.shape[0]), model_version=self.card.version)
                for v in vectors]

    def _query_vectors(self, images: list[Path], vectors: list[list[float]], endpoint: str) -> np.ndarray | list:
        if images and vectors:
            metrics.ERRORS.labels(endpoint, "images_and_vectors").inc()
            raise InvalidArgument("send images or vectors, not both")
        if vectors:
            return vectors
        if not images:
            metrics.ERRORS.labels(endpoint, "no_images").inc()
            raise InvalidArgument("send images (multipart field 'images') or vectors (JSON field 'vectors')")
        return self._call_model("embedding", self._prepare(images, endpoint), endpoint)

    @staticmethod
    def _index_error(endpoint: str, error: CaseIndexError) -> BentoMLException:
        metrics.ERRORS.labels(endpoint, type(error).__name__).inc()
        if isinstance(error, (VersionMismatch, DuplicateId)):
            return Conflict(str(error))
        return InvalidArgument(str(error))

    @bentoml.api(route="/search")
    def search(self, images: list[Path] = Field(default_factory=list),
               vectors: list[list[float]] = Field(default_factory=list, description="Query embeddings (this model's)"),
               k: Annotated[int, Field(ge=1, le=1000)] = 10,
               label: str | None = None, case_id: str | None = None, slide_id: str | None = None,
               site: str | None = None, date_from: datetime | None = None, date_to: datetime | None = None,
               model_version: str | None = Field(None, description="The version that made `vectors`; checked")
               ) -> list[SearchResult]:
        """The k most similar indexed cases for each query image or vector, with the majority-vote label."""
        queries = self._query_vectors(images, vectors, "search")
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
    def add_cases(self, images: list[Path] = Field(default_factory=list),
                  vectors: list[list[float]] = Field(default_factory=list),
                  metadata: list[CaseMetadata] = Field(default_factory=list,
                                                       description="One entry per image or vector, in order"),
                  model_version: str | None = None) -> CasesAdded:
        """Add cases (images, embedded by this model, or its vectors) with metadata; ids come back once durable.

        A posted image is kept (content-addressed) so a later model version can re-embed it; its
        source_uri records that copy unless the client gave its own."""
        queries = self._query_vectors(images, vectors, "cases")
        n = len(queries)
        if metadata and len(metadata) != n:
            metrics.ERRORS.labels("cases", "metadata_count").inc()
            raise InvalidArgument(f"{n} images or vectors but {len(metadata)} metadata entries")
        metadata = metadata or [CaseMetadata() for _ in range(n)]
        if images:
            root = index_root()
            metadata = [m if m.source_uri else m.model_copy(update={"source_uri": store_source(root, p.read_bytes())})
                        for m, p in zip(metadata, images)]
        try:
            ids = self.index.add(queries, metadata, model_version=model_version if vectors else None)
        except CaseIndexError as e:
            raise self._index_error("cases", e) from None
        self.update_index_gauge()
        return CasesAdded(ids=ids, model_version=self.card.version)
