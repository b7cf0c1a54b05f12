"""Build demo/bloodmnist-demo.npz: the BloodMNIST subset the project carries for its demo.

    python scripts/make_demo_data.py --bloodmnist ../shared/data/bloodmnist/bloodmnist.npz \
        --photos ../shared/data/blood-photos --out demo/bloodmnist-demo.npz

Stratified, seeded subsets of each official split (3000 train / 400 val / 800 test). The
BloodMNIST images that are the sources of the full-size PBC photographs in ``--photos`` are
found (centre 200x200 crop, bilinear resize to 28 px, nearest image by mean absolute difference)
and left out of the demo's training split, so those photographs are truly held out when the demo
model classifies them. BloodMNIST is CC BY 4.0 (MedMNIST v2, Yang et al. 2023; PBC data,
Acevedo et al. 2020).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
               "neutrophil", "platelet"]


def photo_sources(photos: Path, images: np.ndarray) -> np.ndarray:
    """Index into ``images`` of the nearest BloodMNIST image for every photograph."""
    files = sorted(p for p in photos.rglob("*.jpg"))
    bank = images.reshape(len(images), -1).astype(np.float32)
    found = []
    for f in files:
        im = Image.open(f).convert("RGB")
        left, top = (im.width - 200) // 2, (im.height - 200) // 2
        v = np.asarray(im.crop((left, top, left + 200, top + 200)).resize((28, 28), Image.Resampling.BILINEAR),
                       dtype=np.float32).reshape(-1)
        found.append(int(np.abs(bank - v).mean(1).argmin()))
    return np.array(found)


def stratified(labels: np.ndarray, n: int, rng: np.random.Generator, exclude: set[int]) -> np.ndarray:
    allowed = np.array([i for i in range(len(labels)) if i not in exclude])
    share = n / len(allowed)
    picked = []
    for c in np.unique(labels):
        members = allowed[labels[allowed] == c]
        picked.append(rng.choice(members, size=max(1, round(share * len(members))), replace=False))
    return np.sort(np.concatenate(picked))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bloodmnist", type=Path, required=True)
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = np.load(args.bloodmnist)
    rng = np.random.default_rng(args.seed)
    sizes = {"train": 3000, "val": 400, "test": 800}
    n_train = len(d["train_images"])
    n_val = len(d["val_images"])
    everything = np.concatenate([d["train_images"], d["val_images"], d["test_images"]])
    sources = photo_sources(args.photos, everything)
    offsets = {"train": 0, "val": n_train, "test": n_train + n_val}
    out, report = {}, {"photo_sources_by_split": {}}
    for split, n in sizes.items():
        labels = d[f"{split}_labels"].reshape(-1)
        lo, hi = offsets[split], offsets[split] + len(labels)
        in_split = {int(s) - lo for s in sources if lo <= s < hi}
        report["photo_sources_by_split"][split] = len(in_split)
        exclude = in_split if split == "train" else set()
        idx = stratified(labels, n, rng, exclude)
        out[f"{split}_images"] = d[f"{split}_images"][idx]
        out[f"{split}_labels"] = labels[idx].reshape(-1, 1)
        report[f"{split}_count"] = int(len(idx))
    out["class_names"] = np.array(CLASS_NAMES)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    # Which split each photograph's source image sits in (for honest reporting of photo accuracy).
    files = sorted(str(p.relative_to(args.photos)) for p in args.photos.rglob("*.jpg"))
    split_of = np.where(sources < n_train, "train", np.where(sources < n_train + n_val, "val", "test"))
    with (args.out.parent / "blood-photos-sources.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "bloodmnist_split", "bloodmnist_index_in_split"])
        for name, s, i in zip(files, split_of, sources):
            w.writerow([name, s, int(i - offsets[str(s)])])
    report["bytes"] = args.out.stat().st_size
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
