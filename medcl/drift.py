"""Drift signals: is the traffic still what the model was trained on?

Two signals per model version, measured on every image the service classifies or embeds:

- **top-class confidence** (the largest softmax probability): a model shown unfamiliar tiles grows
  less sure, or confidently wrong in a new way;
- **distance to the training set**: cosine distance from an image's embedding to the nearest of a
  fixed sample of training embeddings (at most 2,048): new scanners, stains or tissue move it.

The second signal is also answered per image: ``/classify`` returns it as ``ood_score`` with an
``in_distribution`` flag against the card's threshold (``ood_threshold``: a high quantile of the
validation images' distances). Nearest-neighbour distance in a contrastive embedding is a standard
label-free OOD detector (Sun et al., "Out-of-distribution detection with deep nearest neighbors",
ICML 2022).

The reference for both comes from training (``drift_reference.npz``, written by the engine and
carried in the package): the held-out images' confidences and distances, i.e. what in-distribution
traffic looks like. The service exports the traffic as Prometheus histograms and the reference as
cumulative fractions on the same buckets; ``medcl drift`` compares a window of traffic with the
reference by the population stability index (PSI) per signal. No torch here (the service imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_FILE = "drift_reference.npz"
REFERENCE_SAMPLE = 2048
IMAGE_STATISTICS = 26
# The image signal packages are built with: the mean distance to the 10 nearest training images in the
# first 14 standardised statistics, chosen on development images of other modalities against a Gaussian
# and against 26 statistics (bench/ood_signals.py, docs/results/ood-signals.md).
STATISTICS_KIND, STATISTICS_COUNT = "knn", 14

# Histogram upper bounds (Prometheus `le`); the last bucket (+Inf) is implicit.
BUCKETS: dict[str, tuple[float, ...]] = {
    "confidence": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
    "distance": (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
}
# PSI rule of thumb (credit scoring, where it comes from): < 0.1 stable, 0.1-0.25 moderate, > 0.25 a shift.
DEFAULT_PSI_THRESHOLD = 0.25


@dataclass
class StatisticsReference:
    """The training images' colour and texture statistics (``image_statistics``), as the second
    out-of-distribution signal scores them: ``kind`` "gaussian" is the Mahalanobis distance from their
    Gaussian, "knn" the mean distance to the ``neighbours`` nearest training images in standardised
    statistics (no single-cluster assumption: fat, stroma and tumour patches form separate clusters)."""

    kind: str  # "gaussian" | "knn"
    statistics: int  # how many of image_statistics' columns (14 or 26)
    mean: np.ndarray
    scale: np.ndarray  # standard deviation of each statistic on the training images (ones: unscaled)
    precision: np.ndarray | None = None  # gaussian: inverse covariance of the scaled statistics
    bank: np.ndarray | None = None  # knn: the scaled statistics of the training sample
    neighbours: int = 10

    @classmethod
    def fit(cls, train_pixels: np.ndarray, kind: str = STATISTICS_KIND, statistics: int = STATISTICS_COUNT,
            neighbours: int = 10) -> "StatisticsReference":
        stats = image_statistics(train_pixels, statistics).astype(np.float64)
        mean, scale = stats.mean(axis=0), np.maximum(stats.std(axis=0), 1e-6)
        z = (stats - mean) / scale
        if kind == "gaussian":
            # lightly regularised: statistics such as the two gradients are strongly correlated
            cov = np.cov(z, rowvar=False) + 1e-6 * np.eye(z.shape[1])
            return cls(kind, statistics, mean.astype(np.float32), scale.astype(np.float32),
                       precision=np.linalg.inv(cov).astype(np.float32))
        if kind == "knn":
            return cls(kind, statistics, mean.astype(np.float32), scale.astype(np.float32),
                       bank=z.astype(np.float32), neighbours=min(neighbours, len(z)))
        raise ValueError(f"unknown statistics reference kind {kind!r} (gaussian or knn)")

    @property
    def name(self) -> str:
        """How the score is measured, as the card names it (e.g. "knn10_statistics26")."""
        how = f"knn{self.neighbours}" if self.kind == "knn" else "mahalanobis"
        return f"{how}_statistics{self.statistics}"

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """Each image's distance from the training images' statistics (higher: less like them)."""
        z = (image_statistics(pixels, self.statistics) - self.mean) / self.scale
        if self.kind == "gaussian":
            return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))
        d2 = (z * z).sum(1)[:, None] - 2.0 * z @ self.bank.T + (self.bank * self.bank).sum(1)[None, :]
        nearest = np.partition(np.maximum(d2, 0.0), self.neighbours - 1, axis=1)[:, :self.neighbours]
        return np.sqrt(nearest).mean(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"statistics_kind": np.array(self.kind), "statistics_count": np.array(self.statistics),
               "statistics_mean": self.mean, "statistics_scale": self.scale,
               "statistics_neighbours": np.array(self.neighbours)}
        if self.precision is not None:
            out["statistics_precision"] = self.precision
        if self.bank is not None:
            out["statistics_bank"] = self.bank.astype(np.float16)
        return out

    @classmethod
    def from_arrays(cls, z) -> "StatisticsReference | None":
        if "statistics_mean" not in z.files:
            return None
        if "statistics_kind" not in z.files:  # written before the choice of kind: an unscaled Gaussian of 14
            mean = z["statistics_mean"]
            return cls("gaussian", 14, mean, np.ones_like(mean), precision=z["statistics_precision"])
        kind = str(z["statistics_kind"])
        return cls(kind, int(z["statistics_count"]), z["statistics_mean"], z["statistics_scale"],
                   precision=z["statistics_precision"] if "statistics_precision" in z.files else None,
                   bank=z["statistics_bank"].astype(np.float32) if "statistics_bank" in z.files else None,
                   neighbours=int(z["statistics_neighbours"]))


@dataclass
class Reference:
    train_embeddings: np.ndarray  # (R, D) L2-normalised float32
    confidence: np.ndarray  # held-out top-class probabilities
    distance: np.ndarray  # held-out nearest-training cosine distances
    # the training images' colour and texture statistics; None in references written before it existed
    statistics: StatisticsReference | None = None

    def image_distance(self, pixels: np.ndarray) -> np.ndarray | None:
        """Each image's statistics scored against the training images' (None without them)."""
        return None if self.statistics is None else self.statistics.score(pixels)

    def values(self, signal: str) -> np.ndarray:
        return self.confidence if signal == "confidence" else self.distance


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_distance(embeddings: np.ndarray, train_embeddings: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Cosine distance from each embedding to its nearest training embedding."""
    q = _unit(embeddings)
    out = np.empty(len(q), np.float32)
    for i in range(0, len(q), chunk):
        out[i:i + chunk] = 1.0 - (q[i:i + chunk] @ train_embeddings.T).max(axis=1)
    return np.clip(out, 0.0, 2.0)


def top_confidence(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


OOD_QUANTILE = 0.99


def image_statistics(pixels: np.ndarray, count: int = STATISTICS_COUNT) -> np.ndarray:
    """(N, H, W, 3) model pixels (uint8, or float on the same 0-255 scale) -> (N, count) colour and
    texture statistics. The second out-of-distribution signal: a classifier's embedding answers "which
    class", and a blood smear or a skin photograph can land near a class of H&E patches there, while its
    colours and texture are plainly not those of any training image.

    The first 14: per-channel mean and spread of intensity and of optical density (OD), mean gradient
    across and along. The next 12: mean and spread of saturation, the two gradients at half resolution
    (texture scale), the mean absolute Laplacian, the shares of near-white (OD < 0.15) and dark
    (OD > 1.0) pixels, the three spreads of the image's OD colour cloud (flat for two stains, round for a
    photograph) and the share of OD variance along its main axis."""
    x = np.asarray(pixels, np.float32) / 255.0
    density = -np.log(np.clip(x, 1.0 / 255.0, 1.0))
    grey = x.mean(axis=-1)
    grad = np.stack([np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2)), np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2))], 1)
    first = [x.mean(axis=(1, 2)), x.std(axis=(1, 2)), density.mean(axis=(1, 2)), density.std(axis=(1, 2)), grad]
    if count == 14:
        return np.concatenate(first, axis=1)
    if count != IMAGE_STATISTICS:
        raise ValueError(f"image_statistics has 14 or {IMAGE_STATISTICS} columns, not {count}")
    n, h, w = grey.shape
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    saturation = (hi - lo) / np.maximum(hi, 1e-3)
    half = grey[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    grad_half = np.stack([np.abs(np.diff(half, axis=2)).mean(axis=(1, 2)),
                          np.abs(np.diff(half, axis=1)).mean(axis=(1, 2))], 1)
    laplacian = np.abs(4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
                       - grey[:, 1:-1, 2:]).mean(axis=(1, 2))
    total = density.sum(axis=-1)
    od = density.reshape(n, -1, 3)
    centred = od - od.mean(axis=1, keepdims=True)
    cov = np.einsum("npi,npj->nij", centred, centred) / od.shape[1]
    spreads = np.sqrt(np.maximum(np.linalg.eigvalsh(cov.astype(np.float64)), 0.0))[:, ::-1].astype(np.float32)
    main_axis = spreads[:, :1] ** 2 / np.maximum((spreads ** 2).sum(axis=1, keepdims=True), 1e-12)
    second = [np.stack([saturation.mean(axis=(1, 2)), saturation.std(axis=(1, 2))], 1), grad_half,
              laplacian[:, None], np.stack([(total < 0.15).mean(axis=(1, 2)), (total > 1.0).mean(axis=(1, 2))], 1),
              spreads, main_axis]
    return np.concatenate(first + second, axis=1)


def bank_as_stored(train_embeddings: np.ndarray) -> np.ndarray:
    """The training sample as the package carries it (float16), so thresholds are set on the same bank
    the service compares with."""
    return _unit(train_embeddings).astype(np.float16).astype(np.float32)


def ood_threshold(validation_distance: np.ndarray, quantile: float = OOD_QUANTILE) -> float:
    """The distance above which an image is called out of distribution: ``quantile`` of the
    validation images' distances (1% of in-distribution images flagged at the default)."""
    return float(np.quantile(np.asarray(validation_distance, np.float64), quantile))


def build_reference(train_embeddings: np.ndarray, heldout_logits: np.ndarray, heldout_embeddings: np.ndarray,
                    seed: int = 0, train_pixels: np.ndarray | None = None, statistics_kind: str = STATISTICS_KIND,
                    statistics: int = STATISTICS_COUNT) -> Reference:
    """The reference from training embeddings (sampled), the held-out images' outputs and, given the
    training images' pixels, their colour and texture statistics."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(train_embeddings))[:REFERENCE_SAMPLE]
    bank = bank_as_stored(train_embeddings[np.sort(pick)])
    stats = None if train_pixels is None else StatisticsReference.fit(train_pixels, statistics_kind, statistics)
    return Reference(bank, top_confidence(heldout_logits).astype(np.float32),
                     nearest_distance(heldout_embeddings, bank), stats)


def save_reference(reference: Reference, directory: Path) -> Path:
    path = Path(directory) / REFERENCE_FILE
    extra = {} if reference.statistics is None else reference.statistics.arrays()
    np.savez_compressed(path, train_embeddings=reference.train_embeddings.astype(np.float16),
                        confidence=reference.confidence, distance=reference.distance, **extra)
    return path


def load_reference(directory: Path) -> Reference | None:
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        return Reference(z["train_embeddings"].astype(np.float32), z["confidence"], z["distance"],
                         StatisticsReference.from_arrays(z))


def bucket_fractions(values: np.ndarray, bounds: tuple[float, ...]) -> np.ndarray:
    """Share of values in each bucket (le bounds, then +Inf)."""
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds) + 1)
    return counts / max(counts.sum(), 1)


def psi(reference: np.ndarray, traffic: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index of two bucket distributions (shares), empty buckets floored."""
    p = np.maximum(np.asarray(reference, float), floor)
    q = np.maximum(np.asarray(traffic, float), floor)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def compare(reference_cumulative: list[float], traffic_cumulative_counts: list[float],
            threshold: float = DEFAULT_PSI_THRESHOLD) -> dict:
    """One signal: reference cumulative shares and traffic cumulative counts on the same buckets
    (both ending with +Inf) -> PSI, the traffic's size and whether it shifted."""
    ref = np.diff(np.concatenate([[0.0], reference_cumulative]))
    counts = np.diff(np.concatenate([[0.0], traffic_cumulative_counts]))
    n = float(counts.sum())
    if n <= 0:
        return {"images": 0, "psi": None, "shifted": False}
    value = psi(ref, counts / n)
    return {"images": int(n), "psi": round(value, 4), "shifted": bool(value > threshold and not math.isnan(value))}


def in_distribution(ood, distance: float | None, image_score: float | None) -> bool | None:
    """The card's flag (``ood``: medcl.card.OodSpec or None): true when each score the package gives is
    within its threshold; None when there is no threshold or no score to judge by."""
    if ood is None or distance is None:
        return None
    if distance > ood.threshold:
        return False
    if ood.image_threshold is not None and image_score is not None:
        return image_score <= ood.image_threshold
    return True
