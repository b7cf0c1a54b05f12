"""Datasets as in-memory uint8 arrays, three readers, group-safe splits and label-fraction subsampling.

Every reader returns ``ImageSet``s whose pixels have already passed the card's geometry
(``medcl.preprocess.to_model_pixels``), so training augments exactly what the service would see.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from medcl.card import PreprocessSpec
from medcl.errors import MedclError
from medcl.preprocess import IMAGE_SUFFIXES, ImageDecodeError, load_model_pixels

UNLABELLED = -1


class DataError(MedclError, ValueError):
    """The data on disk cannot be used as asked; the message says what is wrong and where."""


@dataclass
class ImageSet:
    """Images (N, H, W, 3) uint8 with integer labels (-1 = unlabelled) and optional group ids."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray | None = None
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.groups is not None and len(self.groups) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.groups)} group ids")
        if len(self.labels) and self.labels.max(initial=-1) >= len(self.class_names):
            raise DataError(f"label {self.labels.max()} out of range for {len(self.class_names)} classes")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray | Sequence[int]) -> "ImageSet":
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            groups=None if self.groups is None else self.groups[index],
            sources=[self.sources[i] for i in index] if self.sources else [],
        )

    def fingerprint(self) -> str:
        """Content hash of pixels and labels: two runs on the same data print the same value."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.tobytes())
        h.update("\n".join(self.class_names).encode())
        return h.hexdigest()[:16]


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    unlabelled: ImageSet | None = None  # extra images without labels (folder reader's unlabelled/)


# --------------------------------------------------------------------------------------- readers


def resize_images(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 through the card's crop and resize (``to_model_pixels``), one image at a time."""
    from PIL import Image

    from medcl.preprocess import to_model_pixels

    return np.stack([to_model_pixels(Image.fromarray(img), spec) for img in images])


def read_npz(path: str | Path, class_names: list[str] | None = None) -> Splits:
    """A MedMNIST-style archive with ``{train,val,test}_{images,labels}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    with np.load(path) as archive:
        keys = set(archive.files)
        missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in keys]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)} (expected MedMNIST-style keys)")

        def load(split: str) -> tuple[np.ndarray, np.ndarray] | None:
            if f"{split}_images" not in keys:
                return None
            images = archive[f"{split}_images"]
            if images.ndim == 3:  # greyscale MedMNIST sets: (N, H, W)
                images = np.repeat(images[..., None], 3, axis=-1)
            return images.astype(np.uint8), archive[f"{split}_labels"].reshape(-1).astype(np.int64)

        parts = {s: load(s) for s in ("train", "val", "test")}
        if class_names is None and "class_names" in keys:
            class_names = [str(c) for c in archive["class_names"]]
    n_classes = int(max(int(p[1].max()) for p in parts.values() if p is not None)) + 1
    names = class_names or [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise DataError(f"{len(names)} class names given but labels go up to {n_classes - 1}")

    def make(p: tuple[np.ndarray, np.ndarray] | None) -> ImageSet | None:
        return None if p is None else ImageSet(p[0], p[1], list(names))

    train, val, test = (make(parts[s]) for s in ("train", "val", "test"))
    assert train is not None and test is not None
    return Splits(train=train, val=val, test=test)


def _load_many(paths: list[Path], spec: PreprocessSpec, desc: str) -> np.ndarray:
    out = np.empty((len(paths), spec.input_size, spec.input_size, 3), dtype=np.uint8)
    bad: list[str] = []
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False, disable=len(paths) < 200)):
        try:
            out[i] = load_model_pixels(p, spec)
        except ImageDecodeError as e:
            bad.append(f"{p}: {e}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable image(s): {'; '.join(bad[:3])}{more}")
    return out


def read_folder(root: str | Path, spec: PreprocessSpec,
                class_names: list[str] | None = None) -> tuple[ImageSet, ImageSet | None]:
    """``root/<class>/*.png|jpg|tif`` plus an optional ``root/unlabelled/`` (any depth below it).

    ``class_names`` renames the class folders in sorted order (PatchCamelyon's ``0``/``1`` become
    ``normal``/``tumor``); there must be exactly one name per class folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such folder: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name != "unlabelled")
    if class_names is not None and len(class_names) != len(class_dirs):
        raise DataError(f"{len(class_names)} class_names given for the {len(class_dirs)} class folders of {root} "
                        f"({', '.join(d.name for d in class_dirs)})")
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for d in class_dirs:
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            if class_names is not None:
                raise DataError(f"class folder {d} has no images")
            continue
        names.append(class_names[len(names)] if class_names is not None else d.name)
        paths += files
        labels += [len(names) - 1] * len(files)
    if not paths:
        raise DataError(f"{root} has no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    labelled = ImageSet(_load_many(paths, spec, "labelled"), np.array(labels), names,
                        sources=[str(p) for p in paths])
    unlabelled = None
    if (root / "unlabelled").is_dir():
        upaths = sorted(f for f in (root / "unlabelled").rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if upaths:
            unlabelled = ImageSet(_load_many(upaths, spec, "unlabelled"), np.full(len(upaths), UNLABELLED),
                                  names, sources=[str(p) for p in upaths])
    return labelled, unlabelled


def read_csv_manifest(path: str | Path, spec: PreprocessSpec, path_column: str = "path",
                      label_column: str = "label", group_column: str | None = None,
                      class_names: list[str] | None = None, path_template: str | None = None) -> ImageSet:
    """A CSV with an image path (relative to the CSV), a label, and optionally a group (patient, lesion).

    Rows with an empty label are unlabelled. Class order is ``class_names`` or sorted label values.
    ``path_template`` builds the path from the row's columns instead (``images/{image_id}.jpg``), for
    metadata tables such as ISIC/HAM10000's that name images by id only.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        wanted = re.findall(r"{(\w+)}", path_template) if path_template else [path_column]
        needed = [*wanted, label_column] + ([group_column] if group_column else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(columns)}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path} has no rows")
    raw_labels = [r[label_column].strip() for r in rows]
    names = class_names or sorted({v for v in raw_labels if v})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({v for v in raw_labels if v and v not in index})
    if unknown:
        raise DataError(f"labels not in class_names: {', '.join(unknown[:5])}")
    labels = np.array([index[v] if v else UNLABELLED for v in raw_labels])
    paths = [(path.parent / (path_template.format(**r) if path_template else r[path_column])).resolve()
             for r in rows]
    groups = np.array([r[group_column] for r in rows]) if group_column else None
    return ImageSet(_load_many(paths, spec, path.name), labels, names, groups=groups,
                    sources=[str(p) for p in paths])


# ------------------------------------------------------------------------ splits and subsampling


def group_split(labels: np.ndarray, groups: np.ndarray | None, test_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices; with groups, no group ever lands on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_splits = max(2, int(round(1.0 / test_fraction)))
    x = np.zeros(len(labels))
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, test = next(splitter.split(x, labels))
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, test = next(splitter.split(x, labels, groups))
    return np.sort(train), np.sort(test)


def label_subsample(labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Indices of a seeded, stratified labelled subset: ``fraction`` of each class, at least one each.

    With groups, whole groups are drawn (a lesion's images are all labelled or all unlabelled),
    so the labelled count per class is approximate.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        want = max(1, int(round(fraction * len(members))))
        if groups is None:
            chosen.append(rng.choice(members, size=want, replace=False))
            continue
        member_groups = np.unique(groups[members])
        rng.shuffle(member_groups)
        taken: list[int] = []
        for g in member_groups:
            if len(taken) >= want:
                break
            taken += [i for i in np.flatnonzero(groups == g) if labels[i] == c]
        chosen.append(np.array(taken, dtype=np.int64))
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


class MPerClassSampler:
    """Batches of ``m`` images from each of ``batch_size // m`` classes (S5CL's labelled stream).

    Classes with fewer than ``m`` images are sampled with replacement; classes are cycled so each
    gets equal turns even when a batch holds fewer classes than exist. ``state``/``set_state``
    capture the position too, so a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, m: int, seed: int) -> None:
        if m < 1 or batch_size < m or batch_size % m:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of m ({m})")
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
        if not self.by_class:
            raise DataError("no labelled images to sample from")
        self.m = m
        self.classes_per_batch = batch_size // m
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def next_batch(self) -> np.ndarray:
        batch: list[np.ndarray] = []
        while len(batch) < self.classes_per_batch:
            if not self.order:
                self.order = [int(i) for i in self.rng.permutation(len(self.by_class))]
            members = self.by_class[self.order.pop()]
            batch.append(self.rng.choice(members, size=self.m, replace=len(members) < self.m))
        return np.concatenate(batch)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": list(self.order)}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = list(state["order"])


class RandomBatches:
    """Shuffled batches over ``n`` items, epoch after epoch (the unlabelled stream); resumable."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise DataError("no images to sample from")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.rng = np.random.default_rng(seed)
        self.perm = self.rng.permutation(n)
        self.pos = 0

    def next_batch(self) -> np.ndarray:
        if self.pos + self.batch_size > self.n:  # drop the ragged tail, start a new epoch
            self.perm = self.rng.permutation(self.n)
            self.pos = 0
        batch = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perm": self.perm.tolist(), "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.perm = np.asarray(state["perm"], dtype=np.int64)
        self.pos = int(state["pos"])
