"""Can a tile's magnification be read from its nuclei? A label-free size estimate, measured.

For each MoNuSeg training image (40x, 0.25 µm/px) and its copies resampled to 20x and 10x, the
typical nucleus size is estimated without labels by a grey-level granulometry of the haematoxylin
density (above its median): openings with k x k squares, k = 1..40 px; the size is the smallest k
whose opening keeps at most half of the stain mass. In the tile's own pixels a perfect estimator
halves from 40x to 20x and halves again to 10x; the table shows how far the estimates spread within
one magnification, against the factor of 2 that separates magnifications.

    python -m bench.scale_estimate --out docs/results/scale-estimate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.report import write_results

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "train" / "images"
SIZES = np.arange(1, 41)


def stain_size(rgb: np.ndarray) -> int:
    """The granulometric median size (px) of the tile's haematoxylin-dense structures."""
    from scipy import ndimage as ndi

    from medcl.segmentation import haematoxylin

    density = haematoxylin(rgb).astype(np.float32)
    density = np.clip(density - np.median(density), 0, None)
    total = float(density.sum()) or 1.0
    for k in SIZES:
        kept = ndi.maximum_filter(ndi.minimum_filter(density, size=int(k)), size=int(k)).sum() / total
        if kept <= 0.5:
            return int(k)
    return int(SIZES[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="a folder of 40x H&E images (MoNuSeg train)")
    p.add_argument("--out", type=Path, default=Path("docs/results/scale-estimate"))
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"scale_estimate: no images at {args.data}", file=sys.stderr)
        return 2
    from PIL import Image

    rows = {}
    for f in sorted(args.data.glob("*.png")):
        rgb = Image.open(f).convert("RGB")
        rows[f.stem] = {}
        for name, factor in (("40x", 1.0), ("20x", 0.5), ("10x", 0.25)):
            im = rgb if factor == 1.0 else rgb.resize((round(rgb.width * factor), round(rgb.height * factor)),
                                                      Image.Resampling.BICUBIC)
            rows[f.stem][name] = stain_size(np.asarray(im))
    lines = [f"# Nucleus size from the stain, by magnification ({len(rows)} MoNuSeg training images)", "",
             "Granulometric median size of the haematoxylin-dense structures, in each tile's own pixels "
             "(bench/scale_estimate.py). A usable estimator would separate the magnifications: its spread "
             "within one magnification must stay well inside the factor of 2 between them.", "",
             "| magnification | min | 10th pct | median | 90th pct | max |", "|---|---|---|---|---|---|"]
    for name in ("40x", "20x", "10x"):
        v = np.array([r[name] for r in rows.values()])
        lines.append(f"| {name} | {v.min()} | {np.percentile(v, 10):.1f} | {np.median(v):.1f} | "
                     f"{np.percentile(v, 90):.1f} | {v.max()} |")
    v40 = np.array([r["40x"] for r in rows.values()])
    v20 = np.array([r["20x"] for r in rows.values()])
    overlap = float(np.mean(v40 <= np.percentile(v20, 90)))
    lines += ["", f"{overlap:.0%} of the 40x tiles measure no larger than the 90th percentile of the 20x tiles: "
              "nucleus size varies between tissues (lymphocytes against tumour cells) about as much as between "
              "magnifications, so a tile's size alone cannot say its magnification."]
    write_results(args.out, {"per_image": rows}, lines, "python -m bench.scale_estimate --out " + str(args.out))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
