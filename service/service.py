"""BentoML 1.4 service: /classify, /embed, /search, /cases and /segment over ONNX packages; no torch.

Composed services: ``Medcl`` is the HTTP API (decode, validate, preprocess by
the card, auth, search); each served model is its own model service holding one onnxruntime
session (classifiers batch adaptively). BentoML runs each as a separate process, so the CPU-side
API and every model scale separately. Which models: service/registry.py (MEDCL_MODELS_FILE,
MEDCL_MODELS, or one package); requests name one with ``model`` or get the default.

    bentoml serve service.service:Medcl        # models from MEDCL_MODELS / MEDCL_PACKAGE (default: the demo)
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Literal

import aiohttp
import bentoml
import numpy as np
from bentoml._internal.context import server_context
from PIL import Image as PILImage
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound, ServiceUnavailable
from pydantic import BaseModel, Field, TypeAdapter

from medcl.answers import softmax
from medcl.drift import in_distribution
from medcl.answers import top_k as most_probable  # `top_k` is the API's parameter name
from medcl.card import Card
from medcl.index import index_root, open_index
from medcl.index.schema import (CaseIndexError, CaseMetadata, CaseRecord, DuplicateId, SearchFilter, SearchResult,
                                VersionMismatch)
from medcl.index.sources import check_client_source, store_source
from medcl.preprocess import (DEFAULT_MAX_PIXELS, SERVICE_FORMATS, ImageDecodeError, ImageTooLargeError, decode_image,
                              normalise, to_model_pixels, to_rgb)
from medcl.nuclei_check import answer_tile
from medcl.segmentation import (InstanceRules, as_brightfield, describe_instances, geojson, inference_window,
                                label_png, network_input, sliding_window)
from medcl.auth import KeyStore, auth_disabled
from service import metrics
from service.cases import extra_app
from service.batching import MicroBatcher
from service.drift_monitor import DriftMonitor
from service.fast_paths import cache_media_types
from service.hardening import (bound_request_metric_labels, defer_session_close, harden_multipart_parsing,
                               quiet_client_errors, refuse_deep_json)
from service.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware, metric_path
from service.launch import api_workers, exit_with_parent
from service.openapi import serve_complete_openapi
from service.raw_body import RawImageMiddleware, RawRoute
from service.request_state import REQUEST_TIMEOUT_S, check_alive
from service.package import ModelPackage
from service.registry import ModelsConfig, configured_models

log = logging.getLogger("medcl.service")

MAX_IMAGES_PER_REQUEST = int(os.environ.get("MEDCL_MAX_IMAGES", 256))
MAX_FILE_BYTES = int(os.environ.get("MEDCL_MAX_FILE_BYTES", 50 * 1024 * 1024))
MAX_PIXELS = int(os.environ.get("MEDCL_MAX_PIXELS", DEFAULT_MAX_PIXELS))
# BentoML's max_latency_ms is a load-shedding deadline, not a batching window: queued requests
# predicted to exceed it are cancelled with 503. 50 ms shed requests at concurrency 32 on 2 cores,
# so the deadline sits just under the request timeout and sheds only under real overload.
MAX_BATCH_SIZE = int(os.environ.get("MEDCL_MAX_BATCH_SIZE", 64))
SHED_AFTER_MS = int(os.environ.get("MEDCL_SHED_AFTER_MS", 20_000))
API_THREADS = 16  # request threads of the API process (4, 8 and 16 measured alike, docs/benchmarks.md)
MAX_BODY_BYTES = int(os.environ.get("MEDCL_MAX_BODY_BYTES", 256 * 1024 * 1024))
# Amplifiers: a small request must not buy a large answer. Vectors count like images; a search's
# answer holds queries x k hits (each a full case record); /segment's work grows with its pixels.
MAX_SEARCH_HITS = int(os.environ.get("MEDCL_MAX_SEARCH_HITS", 10_000))
# API keys (medcl/auth.py): on unless MEDCL_AUTH=off. A malformed key file stops the start here.
KEYS: KeyStore | None = None if auth_disabled() else KeyStore.from_environment()
if server_context.worker_index is not None:  # a worker process (not the launcher reading the definition)
    exit_with_parent()
harden_multipart_parsing()
refuse_deep_json()
bound_request_metric_labels(metric_path)
quiet_client_errors()
defer_session_close()
cache_media_types()
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


MODEL_FIELD = Field(None, description="Which served model (GET /models lists them); default: the configured default")
# ge: OpenAPI 3.0 has no numeric exclusiveMinimum
TILE_PIXEL_SIZE = Annotated[float | None, Field(
    ge=0.01, le=100, description="Microns per pixel of the images sent: each is cut to the model's field of view "
                                 "(its card's pixel_size_um x crop) before resizing; refused for a model whose card "
                                 "has no pixel size")]
MAX_SEGMENT_PIXELS = int(os.environ.get("MEDCL_MAX_SEGMENT_PIXELS", 4096 * 4096))  # per image
MAX_SEGMENT_REQUEST_PIXELS = int(os.environ.get("MEDCL_MAX_SEGMENT_REQUEST_PIXELS", 2 * 4096 * 4096))  # all images


class ClassScore(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    label: str = Field(description="Most probable class")
    score: float = Field(description="Its softmax probability")
    top_k: list[ClassScore]
    model: str
    model_version: str
    ood_score: float | None = Field(
        None, description="Cosine distance from the image's embedding to the nearest of the model's training "
                          "embeddings (a sample carried in its package); null for a package without one")
    image_ood_score: float | None = Field(
        None, description="Distance of the image's colour and texture statistics from the model's training "
                          "images' (mean distance to the 10 nearest, in standardised statistics; the card's "
                          "ood.image_score names the measure); null for a package without them")
    in_distribution: bool | None = Field(
        None, description="Both scores at or below the model card's thresholds (set on its validation images); "
                          "false means the image is unlike anything the model was trained on, so its label is "
                          "not to be trusted; null when the card has no thresholds")


class Embedding(BaseModel):
    embedding: list[float] = Field(description="L2-normalised embedding")
    dim: int
    model: str
    model_version: str


class Nucleus(BaseModel):
    id: int = Field(description="1..count within this answer")
    uid: str = Field(description="Stable id: the same model version finding the same nucleus at the same slide "
                                 "position (centroid to the pixel, with the offsets) and area gives the same uid")
    centroid: list[float] = Field(description="(x, y) in pixels of the tile sent, plus offset_x / offset_y")
    area_px: int
    area_um2: float | None = Field(None, description="With pixel_size_um")
    bbox: list[int] = Field(description="[x0, y0, x1, y1), pixels (plus the offsets)")
    contour: list[list[float]] = Field(description="Closed outer polygon, (x, y) pixel coordinates (plus the offsets)")
    probability: float = Field(description="Mean confidence of the map inside the nucleus, in [0, 1] (not calibrated): "
                                           "the network's map, or the normalised stain for classical answers")


class TileCheck(BaseModel):
    coverage: float = Field(description="Share of the tile the network's map marks")
    stain_coverage: float = Field(description="Share the haematoxylin-Otsu region covers")
    stain_agreement: float = Field(description="Dice between the two regions")
    passed: bool


class Segmentation(BaseModel):
    image: str = Field(description="The file name or images_base64[i] it answers")
    width: int
    height: int
    count: int = Field(description="Nuclei found")
    nuclei: list[Nucleus]
    pixel_size_um: float | None
    modality: str = Field(description="brightfield, or fluorescence (inverted to dark nuclei on a bright background "
                                      "before the model); detected from the image unless the request named it")
    produced_by: Literal["network", "classical"] = Field(
        description="Which method's nuclei these are: the network's, or colour deconvolution + Otsu (where the "
                    "network's map failed the label-free check, see check; or as the request's method or the model's "
                    "card asked)")
    check: TileCheck | None = Field(None, description="The label-free check of the network's map on this tile")
    offset: list[int] = Field(description="(offset_x, offset_y) added to every coordinate")
    assumed_pixel_size_um: float | None = Field(
        description="The pixel size the tile was segmented as: pixel_size_um when sent, else the model's training "
                    "pixel size (taken as is: the magnification is not estimated from the image)")
    resampled: bool = Field(description="Whether the tile was resampled to the model's pixel size for inference")
    label_png_base64: str | None = Field(None, description="16-bit label image (0 = background), with return_mask")
    geojson: dict | None = Field(None, description="FeatureCollection QuPath imports, with return_geojson")
    model: str
    model_version: str


class ModelInfo(BaseModel):
    name: str
    default: bool
    version: str
    task: str
    method: str
    classes: list[str]
    input_size: int
    embedding_dim: int | None
    provider: str = Field(description="Execution provider that really runs it: TensorRT, CUDA or CPU")
    variant: str | None = Field(None, description="The graph served: fp32, or an int8/fp16 variant that passed "
                                "the export's accuracy gate and ran fastest on this host")
    variant_speeds: dict[str, float] = Field(default_factory=dict,
                                             description="Images/s of each candidate graph at batch 8, measured "
                                             "at load on this host (empty when there was no choice)")
    pixel_size_um: float | None = Field(None, description="Microns per pixel of its training images, if known")
    ood_threshold: float | None = Field(None, description="/classify flags an image as out of distribution "
                                        "above this ood_score (set on the model's validation images)")
    image_ood_threshold: float | None = Field(None, description="... or above this image_ood_score")
    metrics: dict


# --- model services: one per served model, each its own process -----------------------------------
#
# Each holds two slots, "a" and "b", so a new version (a promotion, a rollback) is loaded beside the
# one in use and the API switches between them: requests already prepared for the old version's
# card still reach the old session, and none is dropped. BentoML's batchable methods take exactly
# one argument, so the slot is in the method's name (scores_a / scores_b).

SLOTS = ("a", "b")


class _Slots:
    """The packages of one model service, by slot; shared by the classifier and segmenter services."""

    def __init__(self, name: str, package_dir: Path, threads: int | None = None) -> None:
        self.name = name
        self.threads = threads  # onnxruntime intra-op threads per session (None: MEDCL_ORT_THREADS or all cores)
        self.packages: dict[str, ModelPackage | None] = {"a": ModelPackage(package_dir, threads), "b": None}
        _model_info_metric(self.packages["a"], name)

    def get(self, slot: str) -> ModelPackage:
        package = self.packages[slot]
        if package is None:
            raise ServiceUnavailable(f"model {self.name}: slot {slot} holds no model")
        return package

    def versions(self) -> dict[str, str | None]:
        return {slot: (p.card.version if p else None) for slot, p in self.packages.items()}

    def load(self, slot: str, package_dir: str) -> str:
        if slot not in SLOTS:
            raise InvalidArgument(f"slot must be one of {SLOTS}")
        current = self.packages[slot]
        incoming = Card.load(package_dir)
        if current is not None and current.card.version == incoming.version:
            return incoming.version
        package = ModelPackage(package_dir, self.threads)
        self.packages[slot] = package
        if current is not None and current.card.version not in self.versions().values():
            metrics.MODEL_INFO.labels(self.name, current.card.version, current.provider).set(0)
        _model_info_metric(package, self.name)
        log.info("model %s: version %s loaded into slot %s", self.name, package.card.version, slot)
        return package.card.version


def _model_info_metric(package: ModelPackage, name: str) -> None:
    metrics.MODEL_INFO.labels(name, package.card.version, package.provider).set(1)


class _SlotEndpoints:
    """What the API asks of every model service, whatever its task: BentoML collects inherited
    ``@bentoml.api`` methods (it walks ``dir()`` of the class), so both services share these."""

    slots: _Slots

    @bentoml.api
    def runtime(self) -> dict:
        """The provider that really runs the model, the graph variant served and the timings that chose it."""
        package = self.slots.get("a" if self.slots.packages["a"] else "b")
        return {"provider": package.provider, "variant": package.variant, "variant_speeds": package.variant_speeds}

    @bentoml.api
    def versions(self) -> dict[str, str | None]:
        return self.slots.versions()

    @bentoml.api
    def load(self, slot: str, package_dir: str) -> str:
        return self.slots.load(slot, package_dir)


def classifier_service(name: str, package_dir: Path) -> type:
    @bentoml.service(name=f"medcl-model-{name}", workers=1, traffic={"timeout": 60})
    class ClassifierModel(_SlotEndpoints):
        """An encoder's onnxruntime sessions; the batchable methods batch requests from all API workers."""

        def __init__(self) -> None:
            self.slots = _Slots(name, package_dir, classifier_ort_threads())

        def _run(self, slot: str, batch: np.ndarray, output: str) -> np.ndarray:
            start = time.perf_counter()
            package = self.slots.get(slot)
            # "scores": logits and embedding from one run (classify watches both for drift)
            result = package.run_joined(batch, ["logits", "embedding"]) if output == "scores" \
                else package.run(batch, output)
            metrics.INFERENCE_SECONDS.labels(name, output).observe(time.perf_counter() - start)
            metrics.BATCH_SIZE.labels(name, output).observe(len(batch))
            return result

        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=SHED_AFTER_MS)
        def scores_a(self, batch: np.ndarray) -> np.ndarray:
            return self._run("a", batch, "scores")

        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=SHED_AFTER_MS)
        def scores_b(self, batch: np.ndarray) -> np.ndarray:
            return self._run("b", batch, "scores")

        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=SHED_AFTER_MS)
        def embeddings_a(self, batch: np.ndarray) -> np.ndarray:
            return self._run("a", batch, "embedding")

        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=SHED_AFTER_MS)
        def embeddings_b(self, batch: np.ndarray) -> np.ndarray:
            return self._run("b", batch, "embedding")

    return ClassifierModel


def segmenter_service(name: str, package_dir: Path) -> type:
    @bentoml.service(name=f"medcl-model-{name}", workers=1, traffic={"timeout": 120})
    class SegmenterModel(_SlotEndpoints):
        """A nuclei segmenter's sessions: tiles of any size, cut into overlapping windows and stitched exactly."""

        def __init__(self) -> None:
            # inline, the API workers share the cores; separate, the model process has them all
            self.slots = _Slots(name, package_dir, cores_per_worker() if PLACEMENT == "inline" else None)

        def _nuclei(self, slot: str, image: np.ndarray) -> np.ndarray:
            package = self.slots.get(slot)
            spec = package.card.segmentation
            start = time.perf_counter()
            def run(windows: np.ndarray) -> np.ndarray:
                check_alive()  # between windows: a large tile's work stops soon after its client leaves
                return package.run(windows, "nuclei")

            result = sliding_window(image, run, inference_window(spec.window, spec.receptive_radius),
                                    spec.receptive_radius)[0]
            metrics.INFERENCE_SECONDS.labels(name, "nuclei").observe(time.perf_counter() - start)
            return result

        @bentoml.api
        def nuclei_a(self, image: np.ndarray) -> np.ndarray:
            """(C, H, W) float32 (``network_input`` of the card) -> (H, W) nuclei probability."""
            return self._nuclei("a", image)

        @bentoml.api
        def nuclei_b(self, image: np.ndarray) -> np.ndarray:
            return self._nuclei("b", image)

    return SegmenterModel


@dataclass(frozen=True)
class Active:
    """What one served model answers with right now; a request reads it once and uses it throughout."""

    name: str
    slot: str
    card: Card
    package_dir: Path
    index: object | None  # the case index of this version (None for segmenters)
    drift: DriftMonitor | None = None  # None for segmenters and for packages without a drift reference


MODELS: ModelsConfig = configured_models()
PACKAGE_DIRS: dict[str, Path] = {m.name: m.package_dir() for m in MODELS.models}
CARDS: dict[str, Card] = {name: Card.load(d) for name, d in PACKAGE_DIRS.items()}
# Each model service is a class attribute of the API (BentoML finds dependencies among its attributes).
_DEPENDENCY_ATTR = {name: f"model_{i}" for i, name in enumerate(CARDS)}
# Where each model runs. "inline" (the default): in the API process, concurrent requests batched by
# service/batching.py; on a CPU host, where API and model share the same cores, this avoids an HTTP
# hop, a pickle and a second server per request (docs/benchmarks.md measured the difference).
# "separate": each model its own BentoML service process with adaptive batching (bentoml.depends),
# for deployments that put models on GPU nodes and scale them apart from the API.
PLACEMENT = os.environ.get("MEDCL_MODEL_PLACEMENT", "inline").strip().lower()
if PLACEMENT not in ("inline", "separate"):
    raise ValueError(f"MEDCL_MODEL_PLACEMENT={PLACEMENT!r}: use 'inline' or 'separate'")
BATCHED_METHODS = frozenset({"scores", "embeddings"})


WORKERS = api_workers()
# Of several API workers, the first alone writes index snapshots (a cache; SQLite is the record).
SAVES_SNAPSHOTS = server_context.worker_index in (None, 1)


def cores_per_worker() -> int:
    return max(1, (os.cpu_count() or 1) // WORKERS)


def classifier_ort_threads() -> int | None:
    """Inline, a classifier's session runs each batch on one thread and MicroBatcher runs one batch
    per core; separate, the model process has the cores to itself and one run uses them all."""
    explicit = int(os.environ.get("MEDCL_ORT_THREADS", 0))
    return explicit or (1 if PLACEMENT == "inline" else None)


def batcher_workers() -> int:
    """Batch runners per classifier method: enough single-threaded runs to fill the cores, on a GPU too:
    on an H100 two runners (bigger batches) served 5-20x fewer single-image requests than one runner
    per core (docs/benchmarks-gpu.md). MEDCL_BATCH_WORKERS overrides."""
    explicit = int(os.environ.get("MEDCL_BATCH_WORKERS", 0))
    if explicit:
        return explicit
    threads = classifier_ort_threads()
    return 1 if threads is None else max(1, cores_per_worker() // threads)


# Models named by a store reference (champion/challenger) are re-resolved this often, so a promotion
# or rollback reaches the running service; 0 turns it off (POST /models/reload still works).
FOLLOW_SECONDS = float(os.environ.get("MEDCL_FOLLOW_SECONDS", 10))
# A replaced version's case index stays open this long for requests that started before the switch.
RETIRE_AFTER_SECONDS = 120.0


class Medcl:
    """HTTP API. Images arrive as multipart field ``images`` (one or several files) or base64 in JSON."""

    def __init__(self) -> None:
        if KEYS is not None and not KEYS.configured:
            raise RuntimeError("API keys are required but none are configured: set MEDCL_API_KEYS or "
                               "MEDCL_API_KEYS_FILE (`medcl keys new` writes one), or MEDCL_AUTH=off on a closed network")
        if KEYS is None:
            log.warning("MEDCL_AUTH=off: every endpoint is open to anyone who can reach this port")
        self.default_model = MODELS.default_name
        # Slot "a" of every model service holds what this process resolved at import (same environment,
        # same store): the two agree at start, and reload() keeps them agreeing.
        self.active: dict[str, Active] = {name: self._activate(name, "a", CARDS[name], PACKAGE_DIRS[name])
                                          for name in CARDS}
        self._runtimes: dict[tuple[str, str], dict] = {}  # (model, version) -> what its model service runs
        # Inline placement: the model services' classes instantiated here, in this process.
        self._inline = {name: MODEL_SERVICES[name]() for name in CARDS} if PLACEMENT == "inline" else {}
        self._batchers: dict[tuple[str, str], MicroBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._followed = [m for m in MODELS.models if m.model is not None]
        self._last_follow = time.monotonic()

    @staticmethod
    def _activate(name: str, slot: str, card: Card, package_dir: Path) -> Active:
        index = None if card.task == "segment" else open_index(card.name, card.version,
                                                                 card.architecture.embedding_dim)
        drift = None if card.task == "segment" else DriftMonitor.for_package(name, card.version, package_dir)
        active = Active(name=name, slot=slot, card=card, package_dir=package_dir, index=index, drift=drift)
        if index is not None:
            metrics.INDEX_CASES.labels(card.name, card.version).set(index.count())
        return active

    @property
    def cards(self) -> dict[str, Card]:
        return {name: a.card for name, a in self.active.items()}

    # -- which model ---------------------------------------------------------------------------
    def resolve(self, model: str | None, endpoint: str, tasks: tuple[str, ...]) -> tuple[str, Active]:
        self._follow_aliases()
        name = model or self.default_model
        if model is None and self.active[name].card.task not in tasks:
            # the default is of another kind (e.g. a segmenter): the first model that fits
            name = next((n for n, a in self.active.items() if a.card.task in tasks), name)
        active = self.active.get(name)
        if active is None:
            metrics.ERRORS.labels(endpoint, "unknown_model").inc()
            raise NotFound(f"no model {name!r}; served: {', '.join(self.active)} (GET /models)")
        if active.card.task not in tasks:
            metrics.ERRORS.labels(endpoint, "wrong_task").inc()
            raise InvalidArgument(f"model {name!r} is a {active.card.task} model; {endpoint} needs one of: "
                                  f"{', '.join(tasks)}")
        return name, active

    def index_for(self, model: str | None, endpoint: str) -> tuple[str, object]:
        name, active = self.resolve(model, endpoint, ("classify", "embed"))
        return name, active.index

    def update_index_gauge(self, name: str | None = None) -> None:
        active = self.active[name or self.default_model]
        if active.index is not None:
            metrics.INDEX_CASES.labels(active.card.name, active.card.version).set(active.index.count())

    # -- following the model store -------------------------------------------------------------
    def _follow_aliases(self) -> None:
        """Re-resolve store references at most every FOLLOW_SECONDS, on the request that finds it due."""
        if not self._followed or FOLLOW_SECONDS <= 0 or time.monotonic() - self._last_follow < FOLLOW_SECONDS:
            return
        if self._reload_lock.locked():
            return  # another request is already reloading; this one goes on with what is active
        self._last_follow = time.monotonic()
        try:
            self.reload()
        except Exception:  # noqa: BLE001 - a failed follow must not fail the request that triggered it
            log.exception("following the model store failed; serving the current versions")

    def reload(self) -> list[dict]:
        """Re-resolve every model; load each changed version into its model service's free slot, then
        switch to it. Requests in flight finish on the version they started with."""
        changes = []
        with self._reload_lock:
            for entry in MODELS.models:
                current = self.active[entry.name]
                try:
                    package_dir = entry.package_dir()
                    card = Card.load(package_dir)
                except Exception as e:  # noqa: BLE001 - one unresolvable model must not stop the others
                    changes.append({"model": entry.name, "error": str(e).splitlines()[0]})
                    continue
                if card.version == current.card.version:
                    continue
                if card.task != current.card.task:
                    changes.append({"model": entry.name, "error": f"task changed ({current.card.task} -> {card.task}); "
                                                               "restart the service to change a model's task"})
                    continue
                slot = "b" if current.slot == "a" else "a"
                try:
                    self._service_of(entry.name).load(slot, str(package_dir))
                    switched = self._activate(entry.name, slot, card, package_dir)
                except Exception as e:  # noqa: BLE001 - keep serving the current version, report why
                    log.error("model %s: version %s could not be loaded: %s", entry.name, card.version, e)
                    changes.append({"model": entry.name, "error": f"version {card.version} not loaded: {e}"})
                    continue
                self.active[entry.name] = switched
                if current.index is not None:
                    threading.Timer(RETIRE_AFTER_SECONDS, current.index.close,
                                    kwargs={"save": SAVES_SNAPSHOTS}).start()
                metrics.MODEL_SWITCHES.labels(entry.name).inc()
                log.info("model %s: now serving version %s (was %s)", entry.name, card.version, current.card.version)
                changes.append({"model": entry.name, "from": current.card.version, "to": card.version})
        self._last_follow = time.monotonic()
        return changes

    @bentoml.on_shutdown
    def _close_index(self) -> None:
        for active in self.active.values():
            if active.index is not None:
                # the first worker saves the HNSW graph, if any, so the next start need not rebuild it
                active.index.close(save=SAVES_SNAPSHOTS)

    def _service_of(self, name: str):
        """The model's service: the instance in this process (inline) or the proxy to its process."""
        return self._inline[name] if self._inline else getattr(self, _DEPENDENCY_ATTR[name])

    def _batcher(self, name: str, method: str) -> MicroBatcher:
        key = (name, method)
        with self._batchers_lock:
            if key not in self._batchers:
                self._batchers[key] = MicroBatcher(getattr(self._inline[name], method), MAX_BATCH_SIZE,
                                                   f"{name}-{method}", workers=batcher_workers())
            return self._batchers[key]

    def _call_model(self, active: Active, method: str, payload: np.ndarray, endpoint: str) -> np.ndarray:
        """Call a model service's ``method`` on the request's slot, retrying connection-level failures:
        inference is idempotent.

        BentoML 1.4's internal client keeps pooled connections alive for 15 s but the dependent
        service's uvicorn closes them after 5 s, so the first burst after an idle gap can hit a
        closed connection (bentoml/BentoML#4971). Seen here as 17 of 300 requests failing with 500.
        """
        name = f"{method}_{active.slot}"
        if self._inline:
            run = self._batcher(active.name, name) if method in BATCHED_METHODS else getattr(self._inline[active.name], name)
            return run(payload)
        call = getattr(self._service_of(active.name), name)
        for attempt in range(3):
            try:
                return call(payload)
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

    def _decode(self, index: int, name: str, data: bytes, endpoint: str, max_pixels: int = MAX_PIXELS):
        try:
            return decode_image(data, max_pixels, SERVICE_FORMATS)
        except ImageTooLargeError as e:
            metrics.ERRORS.labels(endpoint, "too_many_pixels").inc()
            raise PayloadTooLarge(f"image {index} ({name}): {e}") from None
        except ImageDecodeError as e:
            metrics.ERRORS.labels(endpoint, "undecodable").inc()
            raise InvalidArgument(f"image {index} ({name}): {e}") from None

    def _prepare(self, uploads: list[tuple[str, bytes]], endpoint: str, active: Active,
                 pixel_size_um: float | None = None) -> np.ndarray:
        preprocess = active.card.preprocess
        if pixel_size_um is not None and preprocess.pixel_size_um is None:
            metrics.ERRORS.labels(endpoint, "no_pixel_size").inc()
            raise InvalidArgument(f"model {active.name!r} does not record the pixel size it was trained at, so "
                                  "pixel_size_um cannot be used with it; send the tile without it")
        pixels = []
        for i, (name, data) in enumerate(uploads):
            if i % 16 == 0:
                check_alive()
            pixels.append(to_model_pixels(self._decode(i, name, data, endpoint), preprocess, pixel_size_um))
        metrics.IMAGES.labels(endpoint, active.name).inc(len(pixels))
        return normalise(np.stack(pixels), preprocess)

    @bentoml.api(route="/classify")
    def classify(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
                 top_k: Annotated[int, Field(ge=1, le=100)] = 5, model: str | None = MODEL_FIELD,
                 pixel_size_um: TILE_PIXEL_SIZE = None) -> list[Prediction]:
        """Class, probability and top-k classes for each image, in the order sent, with its
        out-of-distribution score and flag."""
        return self.classify_uploads(self._uploads(images, images_base64, "classify"), top_k=top_k, model=model,
                                     pixel_size_um=pixel_size_um)

    def classify_uploads(self, uploads: list[tuple[str, bytes]], top_k: int = 5,
                         model: str | None = None, pixel_size_um: float | None = None) -> list[Prediction]:
        """/classify on (name, bytes) uploads, whichever form of the request carried them."""
        name, active = self.resolve(model, "classify", ("classify",))
        card = active.card
        started = time.perf_counter()
        batch = self._prepare(uploads, "classify", active, pixel_size_um)
        scores = self._call_model(active, "scores", batch, "classify")
        logits = scores[:, :card.num_classes]
        distances: list[float | None] = [None] * len(logits)
        image_scores: list[float | None] = [None] * len(logits)
        if active.drift is not None:
            active.drift.observe_logits(logits)
            distances = [round(float(d), 6) for d in active.drift.observe_embeddings(scores[:, card.num_classes:])]
            found = active.drift.image_scores(batch, card.preprocess.mean, card.preprocess.std)
            if found is not None:
                image_scores = [round(float(d), 4) for d in found]
        probs = softmax(logits)
        out = []
        for row, distance, image_score in zip(probs, distances, image_scores):
            best = most_probable(row, card.class_names, top_k)
            out.append(Prediction(label=best[0][0], score=best[0][1],
                                  top_k=[ClassScore(label=label, probability=p) for label, p in best],
                                  model=name, model_version=card.version, ood_score=distance,
                                  image_ood_score=image_score,
                                  in_distribution=in_distribution(card.ood, distance, image_score)))
        metrics.observe_request(name, "classify", started)
        return out

    @bentoml.api(route="/embed")
    def embed(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
              model: str | None = MODEL_FIELD, pixel_size_um: TILE_PIXEL_SIZE = None) -> list[Embedding]:
        """The L2-normalised embedding of each image, in the order sent."""
        return self.embed_uploads(self._uploads(images, images_base64, "embed"), model=model,
                                  pixel_size_um=pixel_size_um)

    def embed_uploads(self, uploads: list[tuple[str, bytes]], model: str | None = None,
                      pixel_size_um: float | None = None) -> list[Embedding]:
        """/embed on (name, bytes) uploads, whichever form of the request carried them."""
        name, active = self.resolve(model, "embed", ("classify", "embed"))
        card = active.card
        started = time.perf_counter()
        batch = self._prepare(uploads, "embed", active, pixel_size_um)
        vectors = self._call_model(active, "embeddings", batch, "embed")
        if active.drift is not None:
            active.drift.observe_embeddings(vectors)
        metrics.observe_request(name, "embed", started)
        return [Embedding(embedding=v.astype(float).tolist(), dim=int(v.shape[0]), model=name,
                          model_version=card.version) for v in vectors]

    @bentoml.api(route="/segment")
    def segment(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
                pixel_size_um: Annotated[float | None, Field(ge=0.01, le=100)] = None,  # ge: OpenAPI 3.0 has no numeric exclusiveMinimum
                return_mask: bool = False, return_geojson: bool = False,
                modality: Literal["auto", "brightfield", "fluorescence"] = "auto",
                method: Literal["auto", "network-or-classical", "network", "classical"] = "auto",
                offset_x: Annotated[int, Field(ge=0, le=10_000_000)] = 0,
                offset_y: Annotated[int, Field(ge=0, le=10_000_000)] = 0,
                model: str | None = MODEL_FIELD) -> list[Segmentation]:
        """Nuclei instances in each tile: count, centroid, area, bounding box and contour of each nucleus;
        optionally the label image (16-bit PNG) and a GeoJSON FeatureCollection for QuPath. Tiles larger
        than the network's window are processed in overlapping windows and stitched without seams.
        Fluorescence images (bright nuclei on black; ``modality``, detected when "auto") are turned into
        dark nuclei on a bright background first, as the segmenters learned on H&E. ``offset_x`` /
        ``offset_y``: the tile's top-left corner on the slide, added to every coordinate returned.
        ``method``: "auto" answers by the model card's rule; "network-or-classical" gives the network's
        nuclei where its map passes a label-free check against the tile's stain and the classical
        method's elsewhere; "network" the network's unchecked; "classical" colour deconvolution + Otsu
        with the card's post-processing. ``produced_by`` says which produced each answer."""
        return self.segment_uploads(self._uploads(images, images_base64, "segment"), pixel_size_um=pixel_size_um,
                                    return_mask=return_mask, return_geojson=return_geojson, modality=modality,
                                    method=method, offset_x=offset_x, offset_y=offset_y, model=model)

    def segment_uploads(self, uploads: list[tuple[str, bytes]], pixel_size_um: float | None = None,
                        return_mask: bool = False, return_geojson: bool = False, modality: str = "auto",
                        method: str = "auto", offset_x: int = 0, offset_y: int = 0,
                        model: str | None = None) -> list[Segmentation]:
        """/segment on (name, bytes) uploads, whichever form of the request carried them."""
        name, active = self.resolve(model, "segment", ("segment",))
        card = active.card
        started = time.perf_counter()
        spec = card.segmentation
        # the card's rules are in the model's pixels; a tile at another known pixel size is cut in its own
        factor = pixel_size_um / spec.pixel_size_um if pixel_size_um and spec.pixel_size_um else 1.0
        rules = InstanceRules.of(spec).at_scale(factor)
        rule = spec.serve if method == "auto" else method
        out = []
        self._check_segment_pixels(uploads)
        for i, (filename, data) in enumerate(uploads):
            check_alive()  # a client that left, or a request past its deadline, stops here
            image = to_rgb(self._decode(i, filename, data, "segment", MAX_SEGMENT_PIXELS))
            rgb, used = as_brightfield(np.asarray(image), modality)
            work = image if used == "brightfield" else PILImage.fromarray(rgb)
            probability = (None if rule == "classical"
                           else self._nuclei_map(active, work, spec.pixel_size_um, pixel_size_um))
            check_alive()
            answer = answer_tile(probability, rgb, rules, rule, scale=factor, between=check_alive)
            check_alive()
            labels = answer.labels
            nuclei = describe_instances(labels, pixel_size_um, probability=answer.confidence,
                                        offset=(offset_x, offset_y), model_version=card.version)
            metrics.IMAGES.labels("segment", name).inc()
            metrics.NUCLEI_PER_TILE.labels(name).observe(len(nuclei))
            metrics.SEGMENT_ANSWERS.labels(name, answer.produced_by).inc()
            out.append(Segmentation(
                image=filename, width=image.width, height=image.height, count=len(nuclei),
                nuclei=[Nucleus(**n) for n in nuclei], pixel_size_um=pixel_size_um, modality=used,
                produced_by=answer.produced_by, check=TileCheck(**answer.check.as_dict()) if answer.check else None,
                offset=[offset_x, offset_y],
                assumed_pixel_size_um=pixel_size_um or spec.pixel_size_um,
                resampled=probability is not None and abs(factor - 1.0) > 0.1,
                label_png_base64=base64.b64encode(label_png(labels)).decode() if return_mask else None,
                geojson=geojson(nuclei, card.version) if return_geojson else None,
                model=name, model_version=card.version))
        metrics.observe_request(name, "segment", started)
        return out

    @staticmethod
    def _check_segment_pixels(uploads: list[tuple[str, bytes]]) -> None:
        """413 before any work when the images of one /segment request hold more pixels than
        MEDCL_MAX_SEGMENT_REQUEST_PIXELS together (read from the headers; undecodable ones are
        refused later with their own message)."""
        import io

        total = 0
        for _, data in uploads:
            try:
                with PILImage.open(io.BytesIO(data)) as im:
                    total += im.width * im.height
            except Exception:  # noqa: BLE001 - decoding reports it with the image's name
                continue
        if total > MAX_SEGMENT_REQUEST_PIXELS:
            metrics.ERRORS.labels("segment", "too_many_pixels").inc()
            raise PayloadTooLarge(f"the images hold {total} pixels together; one /segment request takes at most "
                                  f"{MAX_SEGMENT_REQUEST_PIXELS} (MEDCL_MAX_SEGMENT_REQUEST_PIXELS): send fewer "
                                  "per request")

    def _nuclei_map(self, active: Active, image, model_um: float | None, tile_um: float | None) -> np.ndarray:
        """The nuclei map at the tile's own pixels. A tile at another resolution than the model's
        (both pixel sizes known, more than 10% apart) is resampled to the model's for inference and
        the map resampled back, so a 20x tile meets a 40x model at the scale it learned."""
        from PIL import Image

        factor = tile_um / model_um if model_um and tile_um else 1.0
        work = image
        if abs(factor - 1.0) > 0.1:
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            if size[0] * size[1] > MAX_SEGMENT_PIXELS:
                metrics.ERRORS.labels("segment", "too_many_pixels").inc()
                raise PayloadTooLarge(f"at the model's {model_um} µm/px the tile would be {size[0]}x{size[1]} px; "
                                      f"the limit is {MAX_SEGMENT_PIXELS} pixels")
            work = image.resize(size, Image.Resampling.BICUBIC)
        chw = network_input(np.asarray(work), active.card.segmentation.inputs)
        probability = self._call_model(active, "nuclei", chw, "segment")
        if work is not image:
            probability = np.asarray(Image.fromarray(probability.astype(np.float32), mode="F").resize(
                image.size, Image.Resampling.BILINEAR))
        return probability

    def models_info(self) -> list[ModelInfo]:
        """Every served model; the provider is asked of the model's own process (what really runs)."""
        self._follow_aliases()
        out = []
        for name, card in self.cards.items():
            key = (name, card.version)
            if key not in self._runtimes:
                try:
                    self._runtimes[key] = self._service_of(name).runtime()
                except Exception:  # noqa: BLE001 - a model process still starting must not fail the listing
                    out.append(self._info(name, card, {"provider": "unknown (model service not ready)"}))
                    continue
            out.append(self._info(name, card, self._runtimes[key]))
        return out

    def _info(self, name: str, card: Card, runtime: dict) -> ModelInfo:
        return ModelInfo(name=name, default=name == self.default_model, version=card.version, task=card.task,
                         method=card.method, pixel_size_um=card.preprocess.pixel_size_um,
                         ood_threshold=card.ood.threshold if card.ood is not None else None,
                         image_ood_threshold=card.ood.image_threshold if card.ood is not None else None,
                         classes=[] if card.task == "segment" else card.class_names,
                         input_size=card.preprocess.input_size,
                         embedding_dim=None if card.task == "segment" else card.architecture.embedding_dim,
                         provider=runtime["provider"], variant=runtime.get("variant"),
                         variant_speeds=runtime.get("variant_speeds") or {}, metrics=card.metrics)

    def _query_vectors(self, uploads: list[tuple[str, bytes]], vectors: list[list[float]],
                       endpoint: str, active: Active) -> np.ndarray | list:
        if uploads and vectors:
            metrics.ERRORS.labels(endpoint, "images_and_vectors").inc()
            raise InvalidArgument("send images or vectors, not both")
        if vectors:
            if len(vectors) > MAX_IMAGES_PER_REQUEST:
                metrics.ERRORS.labels(endpoint, "too_many_vectors").inc()
                raise PayloadTooLarge(f"{len(vectors)} vectors in one request; the limit is {MAX_IMAGES_PER_REQUEST} "
                                      "(MEDCL_MAX_IMAGES, as for images)")
            return vectors
        return self._call_model(active, "embeddings", self._prepare(uploads, endpoint, active), endpoint)

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
               model_version: str | None = Field(None, description="The version that made `vectors`; checked"),
               model: str | None = MODEL_FIELD) -> list[SearchResult]:
        """The k most similar indexed cases for each query image or vector, with the majority-vote label."""
        return self.search_uploads(self._uploads_or_vectors(images, images_base64, vectors, "search"), vectors,
                                   k=k, label=label, case_id=case_id, slide_id=slide_id, site=site,
                                   date_from=date_from, date_to=date_to, model_version=model_version, model=model)

    def search_uploads(self, uploads: list[tuple[str, bytes]], vectors: list[list[float]] | None = None, k: int = 10,
                       label: str | None = None, case_id: str | None = None, slide_id: str | None = None,
                       site: str | None = None, date_from: datetime | None = None, date_to: datetime | None = None,
                       model_version: str | None = None, model: str | None = None) -> list[SearchResult]:
        """/search on (name, bytes) uploads or on vectors, whichever form of the request carried them."""
        vectors = vectors or []
        name, active = self.resolve(model, "search", ("classify", "embed"))
        card, index = active.card, active.index
        started = time.perf_counter()
        queries = self._query_vectors(uploads, vectors, "search", active)
        if len(queries) * k > MAX_SEARCH_HITS:
            metrics.ERRORS.labels("search", "too_many_hits").inc()
            raise PayloadTooLarge(f"{len(queries)} queries x k={k} asks for {len(queries) * k} hits; one request "
                                  f"returns at most {MAX_SEARCH_HITS} (MEDCL_MAX_SEARCH_HITS): lower k or send "
                                  "fewer queries per request")
        where = SearchFilter(label=label, case_id=case_id, slide_id=slide_id, site=site, date_from=date_from,
                             date_to=date_to)
        start = time.perf_counter()
        try:
            results = index.search(queries, k=k, where=where, model_version=model_version if vectors else None)
        except CaseIndexError as e:
            raise self._index_error("search", e) from None
        metrics.SEARCH_SECONDS.labels(card.name, card.version).observe(time.perf_counter() - start)
        metrics.observe_request(name, "search", started)
        return results

    @bentoml.api(route="/cases")
    def add_cases(self, images: list[Path] = Field(default_factory=list), images_base64: list[str] = IMAGES_BASE64,
                  vectors: list[list[float]] = Field(default_factory=list),
                  metadata: list[CaseMetadata] = Field(default_factory=list,
                                                       description="One entry per image or vector, in order"),
                  model_version: str | None = None, model: str | None = MODEL_FIELD) -> CasesAdded:
        """Add cases (images, embedded by this model, or its vectors) with metadata; ids come back once durable.

        A posted image is kept (content-addressed) so a later model version can re-embed it; its
        source_uri records that copy unless the client gave its own."""
        name, active = self.resolve(model, "cases", ("classify", "embed"))
        card, index = active.card, active.index
        started = time.perf_counter()
        uploads = self._uploads_or_vectors(images, images_base64, vectors, "cases")
        queries = self._query_vectors(uploads, vectors, "cases", active)
        n = len(queries)
        if metadata and len(metadata) != n:
            metrics.ERRORS.labels("cases", "metadata_count").inc()
            raise InvalidArgument(f"{n} images or vectors but {len(metadata)} metadata entries")
        metadata = metadata or [CaseMetadata() for _ in range(n)]
        try:  # before anything is stored: a refused source_uri leaves no image behind
            metadata = [m.model_copy(update={"source_uri": check_client_source(m.source_uri)}) if m.source_uri else m
                        for m in metadata]
        except CaseIndexError as e:
            raise self._index_error("cases", e) from None
        if uploads:
            root = index_root()
            metadata = [m if m.source_uri else m.model_copy(update={"source_uri": store_source(root, data)})
                        for m, (_, data) in zip(metadata, uploads)]
        try:
            ids = index.add(queries, metadata, model_version=model_version if vectors else None)
        except CaseIndexError as e:
            raise self._index_error("cases", e) from None
        self.update_index_gauge(name)
        metrics.observe_request(name, "cases", started)
        return CasesAdded(ids=ids, model_version=card.version)


MODEL_SERVICES = {name: (segmenter_service if card.task == "segment" else classifier_service)(name, PACKAGE_DIRS[name])
                  for name, card in CARDS.items()}
if PLACEMENT == "separate":
    for _name, _service in MODEL_SERVICES.items():
        setattr(Medcl, _DEPENDENCY_ATTR[_name], bentoml.depends(_service))

Medcl = bentoml.asgi_app(extra_app, path="/")(
    # BentoML's own access log is off: RequestContextMiddleware writes one JSON line per request (with
    # its id and caller); the second line per request was ~5% of the event loop's py-spy samples.
    bentoml.service(name="medcl", workers=WORKERS, threads=API_THREADS,
                    # BentoML's own timeout answers 504 but leaves the work running; ours (MEDCL_REQUEST_TIMEOUT_S,
                    # service/request_state.py) stops it, so BentoML's sits behind it as a backstop.
                    traffic={"timeout": REQUEST_TIMEOUT_S + 20, "max_concurrency": 256},
                    logging={"access": {"enabled": False}})(Medcl))

# Outermost first: the request log sees every answer, including the limit's 413s and the keys' 401s.
serve_complete_openapi(ModelInfo, CaseRecord)  # GET /docs.json as the service really answers (service/openapi.py)

# The key check before the body: a caller without a key gets its 401 before any body byte is read.
Medcl.add_asgi_middleware(RequestContextMiddleware)
Medcl.add_asgi_middleware(ApiKeyMiddleware, keys=KEYS, public_docs=os.environ.get("MEDCL_PUBLIC_DOCS") == "1")
Medcl.add_asgi_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
# Innermost: one image as the raw request body (service/raw_body.py), inside every check above.
Medcl.add_asgi_middleware(RawImageMiddleware, service=bentoml.get_current_service, threads=API_THREADS, routes={
    "/classify": RawRoute("classify_uploads", Medcl.apis["classify"].input_spec, TypeAdapter(list[Prediction])),
    "/embed": RawRoute("embed_uploads", Medcl.apis["embed"].input_spec, TypeAdapter(list[Embedding])),
    "/segment": RawRoute("segment_uploads", Medcl.apis["segment"].input_spec, TypeAdapter(list[Segmentation])),
    "/search": RawRoute("search_uploads", Medcl.apis["search"].input_spec, TypeAdapter(list[SearchResult])),
})
