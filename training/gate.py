"""Champion against challenger on one fixed held-out set, through the exported ONNX packages (what
would really be served), and the rule that decides whether the challenger may be promoted."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medcl.preprocess import normalise
from training.data import ImageSet
from training.metrics import classification_metrics, macro_auroc

PrimaryMetric = Literal["accuracy", "macro_f1", "balanced_accuracy", "macro_auroc"]


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    primary_metric: PrimaryMetric = "macro_f1"
    # The challenger may score at most this much below the champion on the primary metric.
    max_drop: float = Field(default=0.0, ge=0.0, le=1.0)
    # No class may lose more recall than this (a better average must not hide a class that got worse).
    max_class_recall_drop: float = Field(default=0.05, ge=0.0, le=1.0)
    # An absolute floor; with no champion yet it is the only test (None: a first model is promoted).
    min_primary: float | None = Field(default=None, ge=0.0, le=1.0)


def evaluate_package(package_dir: str | Path, holdout: ImageSet, batch_size: int = 256) -> dict:
    """Metrics of an exported package on the held-out images (onnxruntime on CPU, as in export's parity)."""
    from service.package import ModelPackage

    package = ModelPackage(package_dir)
    spec = package.card.preprocess
    if holdout.images.shape[1] != spec.input_size:
        raise ValueError(f"held-out images are {holdout.images.shape[1]} px but {package_dir} takes {spec.input_size}")
    logits = np.concatenate([package.run(normalise(holdout.images[i:i + batch_size], spec), "logits")
                             for i in range(0, len(holdout), batch_size)])
    metrics = classification_metrics(holdout.labels, logits.argmax(1), holdout.class_names)
    matrix = np.array(metrics["confusion_matrix"])
    metrics["per_class_recall"] = {n: float(matrix[i, i] / max(matrix[i].sum(), 1))
                                   for i, n in enumerate(holdout.class_names)}
    # How many images each recall rests on: with 50 images one image is 2 points of recall.
    metrics["per_class_support"] = {n: int(matrix[i].sum()) for i, n in enumerate(holdout.class_names)}
    metrics["macro_auroc"] = macro_auroc(holdout.labels, logits)
    metrics["images"] = int(len(holdout))
    metrics["version"] = package.card.version
    return metrics


def decide(gate: GateConfig, challenger: dict, champion: dict | None) -> tuple[bool, list[str]]:
    """(promote?, reasons): every rule that failed, or what passed when none did."""
    key = gate.primary_metric
    value = challenger.get(key)
    if value is None:
        return False, [f"the challenger has no {key} on the held-out set"]
    failed: list[str] = []
    if gate.min_primary is not None and value < gate.min_primary:
        failed.append(f"{key} {value:.4f} is below the floor {gate.min_primary:.4f}")
    if champion is None:
        return (not failed), failed or [f"no champion yet; {key} {value:.4f}"
                                         + (f" meets the floor {gate.min_primary:.4f}" if gate.min_primary else "")]
    base = champion.get(key)
    if base is not None and value < base - gate.max_drop:
        failed.append(f"{key} fell from {base:.4f} to {value:.4f} (allowed drop {gate.max_drop:.4f})")
    for name, before in champion["per_class_recall"].items():
        after = challenger["per_class_recall"].get(name, 0.0)
        if before - after > gate.max_class_recall_drop:
            failed.append(f"recall of {name} fell from {before:.3f} to {after:.3f} "
                          f"(allowed drop {gate.max_class_recall_drop:.3f})")
    if failed:
        return False, failed
    return True, [f"{key} {base:.4f} -> {value:.4f}; no class lost more than {gate.max_class_recall_drop:.3f} recall"]
