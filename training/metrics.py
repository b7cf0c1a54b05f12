"""Evaluation: classification metrics (scikit-learn) and kNN accuracy of the embeddings."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    labels = list(range(len(class_names)))
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": {name: float(v) for name, v in zip(class_names, per_class)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 k: int = 20, chunk: int = 1024) -> float:
    """Cosine kNN with similarity-weighted votes (the usual monitor for contrastive encoders).

    The bank is the labelled training images only: a user with 1% of labels has nothing else.
    """
    k = min(k, len(bank))
    bank_t = F.normalize(torch.from_numpy(bank).float(), dim=1)
    labels_t = torch.from_numpy(bank_labels).long()
    n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), chunk):
        q = F.normalize(torch.from_numpy(queries[start:start + chunk]).float(), dim=1)
        sim, idx = (q @ bank_t.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], n_classes).scatter_add_(1, labels_t[idx], sim.clamp(min=0) + 1e-6)
        correct += int((votes.argmax(1).numpy() == query_labels[start:start + chunk]).sum())
    return correct / max(len(queries), 1)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, mean: tuple[float, float, float],
            std: tuple[float, float, float], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits and raw embeddings for uint8 (N, H, W, 3) images through the card's normalisation."""
    from medcl.card import PreprocessSpec
    from medcl.preprocess import normalise

    spec = PreprocessSpec(input_size=images.shape[1], mean=mean, std=std)
    was_training = model.training
    model.eval()
    logits, embs = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(normalise(images[start:start + batch_size], spec))
        lo, em = model(x)
        logits.append(lo.numpy())
        embs.append(em.numpy())
    model.train(was_training)
    return np.concatenate(logits), np.concatenate(embs)


def macro_auroc(y_true: np.ndarray, logits: np.ndarray) -> float | None:
    """One-vs-rest AUROC averaged over classes (None when a class is absent from y_true)."""
    probs = torch.from_numpy(logits).float().softmax(dim=1).numpy()
    if len(np.unique(y_true)) < probs.shape[1]:
        return None
    if probs.shape[1] == 2:  # binary: scikit-learn wants the positive class's score alone
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
