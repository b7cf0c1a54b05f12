"""A model package on disk (model.onnx + card.json) opened as an onnxruntime session. No torch here."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from medcl.card import Card
from medcl.errors import MedclError
from medcl.runtime import PROVIDER_LABEL, providers_for

log = logging.getLogger("medcl.service")


class PackageError(MedclError, RuntimeError):
    """The directory is not a usable model package; the message says what is missing."""


def default_package_dir() -> Path:
    """What to serve: ``MEDCL_PACKAGE`` (a package folder), else ``MEDCL_MODEL`` from the model store
    (``name`` = its champion, ``name@challenger``, ``name:version``), else the demo package under
    ``MEDCL_HOME`` (default ``.medcl``)."""
    explicit = os.environ.get("MEDCL_PACKAGE")
    if explicit:
        return Path(explicit)
    stored = os.environ.get("MEDCL_MODEL")
    if stored:
        from medcl.model_store import resolve

        return resolve(stored)
    return Path(os.environ.get("MEDCL_HOME", ".medcl")) / "packages" / "demo-bloodmnist"


def session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One intra-op pool sized to the cores; inter-op parallelism off so pools do not oversubscribe.
    opts.intra_op_num_threads = threads or int(os.environ.get("MEDCL_ORT_THREADS", 0)) or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    if os.environ.get("MEDCL_ORT_SPIN", "0") != "1":
        # onnxruntime's pool threads spin (busy-wait) after each run by default; in a server, where
        # the same cores decode images and parse HTTP between runs, that spinning took ~1 core here.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def create_session(model_path: Path, threads: int | None = None):
    """Session on the best available provider (TensorRT -> CUDA -> CPU); returns (session, label)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu from pip finds the CUDA and cuDNN libraries of the nvidia-* wheels only when
        # they are loaded first (or on LD_LIBRARY_PATH); torch would do it, but serving never imports torch.
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - the session below reports the provider that really runs
            log.warning("onnxruntime.preload_dlls failed: %s", exc)
    wanted = providers_for(model_path.parent, available)
    session = ort.InferenceSession(str(model_path), sess_options=session_options(threads), providers=wanted)
    # onnxruntime-gpu without CUDA libraries falls back silently: report what really runs.
    active = session.get_providers()[0]
    log.info("model %s runs on %s (available: %s)", model_path, active, ", ".join(sorted(available)))
    return session, PROVIDER_LABEL.get(active, active)


class ModelPackage:
    def __init__(self, directory: str | os.PathLike[str], threads: int | None = None) -> None:
        self.directory = Path(directory)
        if not (self.directory / "card.json").is_file():
            raise PackageError(f"no model package at {self.directory} (card.json missing); "
                               "run `medcl export RUN --out DIR` or `medcl demo prepare`")
        self.card = Card.load(self.directory)
        if self.card.onnx is None:
            raise PackageError(f"{self.directory}/card.json describes a checkpoint, not an exported package")
        model_path = self.directory / self.card.onnx.file
        if not model_path.is_file():
            raise PackageError(f"{model_path} is missing")
        self.session, self.provider = create_session(model_path, threads)
        self.input_name = self.card.onnx.input_name
        self.variant, self.variant_speeds = "fp32", {}
        if self.card.task != "segment":
            self._choose_variant(threads)
        # On a GPU the first run of each new batch size pays for building its kernels' plans, and a
        # batching server makes batches of every size. There, batches are padded up to a power of two
        # and those few sizes are run once now, so no request pays for a new shape (on an H100 the
        # service's throughput stayed the same or rose, docs/benchmarks-gpu.md). Segmenters take whole
        # images of any size: not padded.
        self.pad_batches = self.provider in GPU_LABELS and self.card.task != "segment"
        if self.pad_batches:
            self._warm_up()

    def _choose_variant(self, threads: int | None) -> None:
        """Serve the fastest graph on this host among fp32 and the variants that passed the export's
        accuracy gate (export/variants.py). int8 is 2-3x faster than fp32 on CPUs with VNNI and slower
        on others, and small models can lose to the quantise/dequantise overhead anywhere, so the
        choice is measured here, not assumed. MEDCL_VARIANT=fp32|int8|fp16 forces one."""
        wanted = os.environ.get("MEDCL_VARIANT", "auto").strip().lower() or "auto"
        candidates = {"fp32": self.directory / self.card.onnx.file}
        for name, figures in self.card.onnx.variants.items():
            if name in VARIANT_NAMES and isinstance(figures, dict) and figures.get("written") and figures.get("file"):
                path = self.directory / str(figures["file"])
                if path.is_file():
                    candidates[name] = path
        if wanted != "auto":
            if wanted not in candidates:
                raise PackageError(f"MEDCL_VARIANT={wanted}: {self.directory} holds {', '.join(sorted(candidates))} "
                                   "(variants are written by `medcl export --variants` when they pass its gate)")
            if wanted != "fp32":
                self.session, self.provider = create_session(candidates[wanted], threads)
            self.variant = wanted
            return
        if len(candidates) == 1 or self.provider == "TensorRT":  # TensorRT chooses its own precision
            return
        sessions = {"fp32": self.session}
        for name, path in candidates.items():
            if name != "fp32":
                try:
                    sessions[name] = create_session(path, threads)[0]
                except Exception as e:  # noqa: BLE001 - a variant this build cannot run is simply not chosen
                    log.warning("model %s: variant %s not usable here (%s)", self.directory, name, e)
        self.variant_speeds = time_sessions(sessions, self.input_name, self.card.preprocess.input_size)
        best = max(self.variant_speeds, key=self.variant_speeds.get)
        # fp32 unless a variant is clearly faster: within 10% the exact graph is worth more than the noise
        if best != "fp32" and self.variant_speeds[best] >= VARIANT_MIN_GAIN * self.variant_speeds["fp32"]:
            self.session, self.variant = sessions[best], best
        log.info("model %s: serving %s (images/s at batch %d on this host: %s)", self.directory, self.variant,
                 TIMING_BATCH, self.variant_speeds)

    def _warm_up(self) -> None:
        size = self.card.preprocess.input_size
        start = time.perf_counter()
        for n in batch_buckets():
            self.session.run(None, {self.input_name: np.zeros((n, 3, size, size), np.float32)})
        log.info("model %s: batch sizes %s warmed up on %s in %.1f s", self.directory, batch_buckets(),
                 self.provider, time.perf_counter() - start)

    def _inputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n = len(batch)
        if self.pad_batches and n & (n - 1):  # not a power of two
            padded = np.empty((1 << n.bit_length(),) + batch.shape[1:], np.float32)
            padded[:n] = batch
            padded[n:] = batch[-1]
            batch = padded
        return {self.input_name: batch}

    def run(self, batch: np.ndarray, output: str) -> np.ndarray:
        return self.session.run([output], self._inputs(batch))[0][:len(batch)]

    def run_joined(self, batch: np.ndarray, outputs: list[str]) -> np.ndarray:
        """Several (N, k) outputs of one run side by side: one array, so it batches like any other."""
        results = self.session.run(outputs, self._inputs(batch))
        return np.concatenate(results, axis=1)[:len(batch)]


GPU_LABELS = frozenset({"CUDA", "TensorRT"})
VARIANT_NAMES = ("int8", "fp16")
VARIANT_MIN_GAIN = 1.1
TIMING_BATCH = 8


def time_sessions(sessions: dict, input_name: str, size: int, rounds: int = 5) -> dict[str, float]:
    """Images per second of each session at batch TIMING_BATCH: one warm-up run each, then
    ``rounds`` rounds that run every session in turn (drift in the host's speed hits all alike), the
    median per session; each timed run lasts at least ~20 ms so a tiny model's figure is not noise."""
    x = np.random.default_rng(0).standard_normal((TIMING_BATCH, 3, size, size)).astype(np.float32)
    repeats = {}
    for name, session in sessions.items():
        start = time.perf_counter()
        session.run(None, {input_name: x})
        repeats[name] = max(1, min(50, int(0.02 / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                session.run(None, {input_name: x})
            times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: round(TIMING_BATCH / float(np.median(t)), 1) for name, t in times.items()}


def batch_buckets() -> list[int]:
    """The padded batch sizes warmed up on a GPU: powers of two up to the first at or above
    MEDCL_MAX_BATCH_SIZE (default 64), the largest batch the server makes of single requests."""
    limit = max(1, int(os.environ.get("MEDCL_MAX_BATCH_SIZE", 64)))
    return [1 << k for k in range((limit - 1).bit_length() + 1)]
