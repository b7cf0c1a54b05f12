"""What a scheduled retrain trains and judges on: the data read once, checked, and pinned by a manifest.

A manifest lists every file the data came from with its SHA-256 and size (for an npz, the archive;
for a folder or CSV, each image and the CSV), plus the class list and counts. Its digest names the
run: a retrain that is resumed after a crash goes on only if the data still hash the same, so a
checkpoint is never continued on other data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from medcl.card import PreprocessSpec
from medcl.preprocess import IMAGE_SUFFIXES
from training.config import DataConfig
from training.data import UNLABELLED, DataError, ImageSet, read_csv_manifest, read_folder, read_npz


class HoldoutConfig(BaseModel):
    """The fixed set champion and challenger are both judged on; it does not move with new data."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["npz", "folder", "csv"]
    path: str
    split: Literal["train", "val", "test"] = "test"  # npz only
    path_column: str = "path"
    path_template: str | None = None
    label_column: str = "label"


@dataclass
class LoadedData:
    images: ImageSet  # labelled images (unlabelled ones excluded)
    n_unlabelled: int
    files: list[Path]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _empty_class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "unlabelled"
                  and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*")))


def load_training_data(config: DataConfig, spec: PreprocessSpec) -> LoadedData:
    """Every image of the training source, decoded (an unreadable one is a DataError naming it)."""
    path = Path(config.path)
    if config.kind == "npz":
        splits = read_npz(path, config.class_names)
        train = splits.train
        return LoadedData(train, 0, [path])
    if config.kind == "folder":
        if path.is_dir():
            empty = _empty_class_folders(path)
            if empty:
                raise DataError(f"{path}: class folder(s) without images: {', '.join(empty)}")
        labelled, unlabelled = read_folder(path, spec)
        files = [Path(s) for s in labelled.sources] + ([Path(s) for s in unlabelled.sources] if unlabelled else [])
        return LoadedData(labelled, len(unlabelled) if unlabelled else 0, files)
    everything = read_csv_manifest(path, spec, config.path_column, config.label_column, config.group_column,
                                   config.class_names, config.path_template)
    keep = np.flatnonzero(everything.labels != UNLABELLED)
    return LoadedData(everything.subset(keep), int(len(everything) - len(keep)),
                      [path, *(Path(s) for s in everything.sources)])


def load_holdout(config: HoldoutConfig, spec: PreprocessSpec, class_names: list[str]) -> ImageSet:
    """The held-out images with labels in ``class_names``' order; every class must be present."""
    path = Path(config.path)
    if config.kind == "npz":
        part = getattr(read_npz(path, class_names), config.split)
        if part is None:
            raise DataError(f"{path} has no {config.split} split for the held-out set")
    elif config.kind == "folder":
        part, _ = read_folder(path, spec)
    else:
        part = read_csv_manifest(path, spec, config.path_column, config.label_column,
                                 path_template=config.path_template)
        part = part.subset(np.flatnonzero(part.labels != UNLABELLED))
    unknown = [n for n in part.class_names if n not in class_names]
    if unknown:
        raise DataError(f"held-out set {path} has classes the model does not: {', '.join(unknown)}")
    labels = np.array([class_names.index(part.class_names[y]) for y in part.labels], dtype=np.int64)
    missing = [n for i, n in enumerate(class_names) if not (labels == i).any()]
    if missing:
        raise DataError(f"held-out set {path} has no images of: {', '.join(missing)} (the gate compares "
                        "per-class recall, so every class needs some)")
    return ImageSet(part.images, labels, list(class_names), sources=list(part.sources))


def image_digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest() for im in images}


def manifest(data: LoadedData, holdout_files: list[Path], roots: list[Path]) -> dict:
    """Content hashes of every file, the class list and counts; ``digest`` summarises them."""

    def entry(p: Path) -> dict:
        name = next((str(p.relative_to(r)) for r in roots if p.is_relative_to(r)), str(p))
        return {"path": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}

    files = [entry(p) for p in sorted(set(data.files))]
    held = [entry(p) for p in sorted(set(holdout_files))]
    counts = np.bincount(data.images.labels, minlength=len(data.images.class_names))
    body = {"class_names": data.images.class_names,
            "labelled_per_class": {n: int(c) for n, c in zip(data.images.class_names, counts)},
            "unlabelled": data.n_unlabelled, "files": files, "holdout_files": held}
    payload = repr([(f["path"], f["sha256"]) for f in files] + [("holdout", f["sha256"]) for f in held]
                   + [body["class_names"]])
    return {"digest": hashlib.sha256(payload.encode()).hexdigest(), **body}


def holdout_file_list(config: HoldoutConfig, holdout: ImageSet) -> list[Path]:
    if config.kind == "npz":
        return [Path(config.path)]
    listing = [Path(config.path)] if config.kind == "csv" else []
    return listing + [Path(s) for s in holdout.sources]
