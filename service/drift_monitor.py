"""Per model version: the drift signals of its traffic (medcl/drift.py) as Prometheus histograms, and
its training reference as gauges on the same buckets, so that `medcl drift` (or a Grafana panel)
compares the two from /metrics alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcl.drift import BUCKETS, Reference, bucket_fractions, load_reference, nearest_distance, top_confidence
from service import metrics


class DriftMonitor:
    def __init__(self, model: str, version: str, reference: Reference) -> None:
        self.reference = reference
        self._confidence = metrics.DRIFT_CONFIDENCE.labels(model, version)
        self._distance = metrics.DRIFT_DISTANCE.labels(model, version)
        for signal, bounds in BUCKETS.items():
            cumulative = np.cumsum(bucket_fractions(reference.values(signal), bounds))
            for le, share in zip([*map(str, bounds), "+Inf"], cumulative):
                metrics.DRIFT_REFERENCE.labels(model, version, signal, le).set(float(share))

    @classmethod
    def for_package(cls, model: str, version: str, package_dir: Path) -> "DriftMonitor | None":
        reference = load_reference(package_dir)
        return cls(model, version, reference) if reference is not None else None

    def observe_logits(self, logits: np.ndarray) -> None:
        for value in top_confidence(logits):
            self._confidence.observe(float(value))

    def observe_embeddings(self, embeddings: np.ndarray) -> None:
        for value in nearest_distance(embeddings, self.reference.train_embeddings):
            self._distance.observe(float(value))
