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

    def image_scores(self, batch: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray | None:
        """The image statistics' distance (image_ood_score) of a normalised (N, 3, H, W) batch, on the
        0-255 pixels it came from; None for a reference without statistics."""
        if self.reference.statistics is None:
            return None
        scale = np.asarray(std, np.float32) * 255.0
        offset = np.asarray(mean, np.float32) * 255.0
        return self.reference.image_distance(batch.transpose(0, 2, 3, 1) * scale + offset)

    def observe_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Record each image's distance to the training sample; the distances (answered as ood_score)."""
        distances = nearest_distance(embeddings, self.reference.train_embeddings)
        for value in distances:
            self._distance.observe(float(value))
        return distances
