"""Figures people would rather look at than read: learning curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: list[dict], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [h for h in history if "loss" in h]
    keys = sorted({k for h in rows for k in h if k.startswith(("ce", "supcon"))})
    for k in ["loss"] + keys:
        pts = [(h["step"], h[k]) for h in rows if k in h]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=1.5 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [h for h in history if "val_accuracy" in h]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [h["val_accuracy"] for h in evals], "k--o", ms=3, label="val accuracy")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix_plot(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    plt = _plt()
    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(class_names), 0.8 + 0.55 * len(class_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
