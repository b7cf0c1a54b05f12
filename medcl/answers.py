"""Logits -> the classification answer (label, score, top-k), shared by the BentoML service and the
TorchServe handler so that both serve exactly the same numbers."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, stabilised by the row maximum."""
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes of one image, most probable first."""
    order = np.argsort(-probs)[:min(k, len(class_names))]
    return [(class_names[j], float(probs[j])) for j in order]
