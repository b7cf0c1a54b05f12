"""Filling an index: bulk indexing of a folder, manifest or .npz (resumable), and re-embedding for a
new model version. Runs on onnxruntime through the model package, like the service: no torch."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medcl.index import current_version, index_root, open_index, set_current_version
from medcl.index.base import CaseIndex
from medcl.index.schema import CaseIndexError, CaseMetadata
from medcl.index.sources import npz_uri, read_source
from medcl.preprocess import IMAGE_SUFFIXES, normalise, to_model_pixels


class Embedder:
    """A model package's embedding output for PIL images, preprocessed by the package's card."""

    def __init__(self, package_dir: str | Path, threads: int | None = None) -> None:
        from service.package import ModelPackage

        self.package = ModelPackage(package_dir, threads)
        self.card = self.package.card
        self.dim = int(self.run(np.zeros((1, 3, self.card.preprocess.input_size, self.card.preprocess.input_size),
                                         np.float32)).shape[1])

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.package.run(batch, "embedding")

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        spec = self.card.preprocess
        return self.run(normalise(np.stack([to_model_pixels(im, spec) for im in images]), spec))

    def open_index(self, uri: str | None = None, kind: str | None = None) -> CaseIndex:
        return open_index(self.card.name, self.card.version, self.dim, uri, kind)


@dataclass
class Item:
    source_uri: str
    metadata: CaseMetadata


def items_from(data: str | Path, class_names: list[str] | None = None) -> list[Item]:
    """What to index: ``DIR`` (class-per-folder, or a flat folder), ``FILE.csv`` (a manifest with a
    ``path`` column and optional label, case_id/group, slide_id, site, x, y, date) or ``FILE.npz[:split]``
    (MedMNIST; split ``train`` by default)."""
    text = str(data)
    split = "train"
    if ".npz:" in text:
        text, split = text.rsplit(":", 1)
    path = Path(text)
    if not path.exists():
        raise CaseIndexError(f"{path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if f"{split}_images" not in z.files:
                raise CaseIndexError(f"{path} has no split {split!r} (has: {', '.join(sorted(z.files))})")
            labels = z[f"{split}_labels"].reshape(-1) if f"{split}_labels" in z.files else None
            n = len(z[f"{split}_images"])
        def name(i: int) -> str | None:
            if labels is None:
                return None
            return class_names[int(labels[i])] if class_names else str(int(labels[i]))
        return [Item(npz_uri(path, split, i), CaseMetadata(label=name(i), case_id=f"{path.stem}:{split}:{i}"))
                for i in range(n)]
    if path.suffix == ".csv":
        return _manifest_items(path)
    if path.is_dir():
        items = []
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            parent = file.parent.relative_to(path)
            label = None if str(parent) in (".", "unlabelled") else parent.parts[0]
            items.append(Item(str(file.resolve()), CaseMetadata(label=label)))
        if not items:
            raise CaseIndexError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
        return items
    raise CaseIndexError(f"{path}: expected a folder, a .csv manifest or a .npz file")


def _manifest_items(path: Path) -> list[Item]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise CaseIndexError(f"{path}: a manifest needs a 'path' column (has: {reader.fieldnames})")
        items = []
        for line, row in enumerate(reader, start=2):
            file = Path(row["path"])
            file = file if file.is_absolute() else (path.parent / file)
            fields = {k: (row.get(k) or None) for k in ("label", "case_id", "slide_id", "site", "x", "y", "date")}
            fields["case_id"] = fields["case_id"] or row.get("group") or None
            try:
                items.append(Item(str(file.resolve()), CaseMetadata(**fields)))
            except ValueError as e:
                raise CaseIndexError(f"{path} line {line}: {e}") from None
        return items


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def build_index(embedder: Embedder, data: str | Path, uri: str | None = None, batch_size: int = 256,
                progress: bool = True, kind: str | None = None) -> dict:
    """Index every image of ``data`` not yet in the index (so an interrupted build resumes).

    Each batch is committed before the next is read: an interruption loses at most one batch's work."""
    from tqdm import tqdm

    index = embedder.open_index(uri, kind)
    try:
        items = items_from(data, embedder.card.class_names)
        done = index.existing_sources()
        todo = [it for it in items if it.source_uri not in done]
        root = index_root(uri)
        with tqdm(total=len(items), initial=len(items) - len(todo), desc="indexing", unit="img",
                  disable=not progress, file=sys.stderr) as bar:
            for batch in _batches(todo, batch_size):
                images = [read_source(root, it.source_uri) for it in batch]
                vectors = embedder.embed(images)
                index.add(vectors, [it.metadata.model_copy(update={"source_uri": it.source_uri}) for it in batch])
                bar.update(len(batch))
        if current_version(embedder.card.name, uri) is None:
            set_current_version(embedder.card.name, embedder.card.version, uri)
        return {"model": embedder.card.name, "version": embedder.card.version, "added": len(todo),
                "skipped_already_indexed": len(items) - len(todo), "cases": index.count()}
    finally:
        index.close()


def reembed(old: CaseIndex, embedder: Embedder, uri: str | None = None, batch_size: int = 256,
            progress: bool = True) -> dict:
    """Build the index of ``embedder``'s model version from the sources of ``old``, then switch the
    model's CURRENT pointer to it. ``old`` keeps serving throughout and stays on disk for rollback.
    Cases whose source cannot be read again (vectors added without an image) are listed, not guessed."""
    from tqdm import tqdm

    if embedder.card.version == old.model_version:
        raise CaseIndexError(f"the index is already of version {old.model_version}")
    new = embedder.open_index(uri)
    root = index_root(uri)
    unreadable: list[str] = []
    try:
        with tqdm(total=old.count(), desc="re-embedding", unit="img", disable=not progress, file=sys.stderr) as bar:
            for records in old.iter_records(batch_size):
                have = new.get_many([r.id for r in records])  # done before an interruption: skipped
                todo, images = [], []
                for r in records:
                    if r.id in have:
                        continue
                    if r.source_uri is None:
                        unreadable.append(r.id)
                        continue
                    try:
                        images.append(read_source(root, r.source_uri))
                        todo.append(r)
                    except CaseIndexError:
                        unreadable.append(r.id)
                if todo:
                    meta = [CaseMetadata(**r.model_dump(include=set(CaseMetadata.model_fields))) for r in todo]
                    new.add(embedder.embed(images), meta)
                bar.update(len(records))
        count = new.count()
    finally:
        new.close()
    set_current_version(embedder.card.name, embedder.card.version, uri)
    return {"model": embedder.card.name, "from": old.model_version, "to": embedder.card.version, "cases": count,
            "not_reembedded": unreadable}
