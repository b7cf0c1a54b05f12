"""A model package on disk (model.onnx + card.json) opened as an onnxruntime session. No torch here."""

from __future__ import annotations

import logging
import os
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

    def run(self, batch: np.ndarray, output: str) -> np.ndarray:
        return self.session.run([output], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def run_joined(self, batch: np.ndarray, outputs: list[str]) -> np.ndarray:
        """Several (N, k) outputs of one run side by side: one array, so it batches like any other."""
        results = self.session.run(outputs, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.concatenate(results, axis=1)
