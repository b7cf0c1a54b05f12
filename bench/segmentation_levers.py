"""Post-processing levers for nuclei segmentation, measured on the development images only.

For each trained run (and the stain alone), the same maps are cut into instances several ways:
watershed markers from the distance transform (peaks 4-10 px apart) or its h-maxima, or a watershed
on the map itself smoothed by 2 px (peaks 8-14 px apart); the map smoothed before the cut; and the
network and the stain combined (mean of the two maps, intersection and union of their regions).
Mean Dice / AJI / PQ over the development images. Every setting /segment uses was chosen from this
table, on these images alone.

    python -m bench.segmentation_levers runs/demo-stain runs/nuclei-dev-stain-refined \
        --out docs/results/monuseg-dev-levers
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.report import write_results

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "train"
NAMES = Path(__file__).resolve().parents[1] / "configs" / "splits" / "monuseg-dev.txt"


def _hmax_instances(mask: np.ndarray, rules, h: float) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from medcl.segmentation import instances_from_mask, relabel

    cleaned = instances_from_mask(mask, replace(rules, min_distance=0, markers="distance")) > 0
    distance = ndi.distance_transform_edt(cleaned)
    return relabel(watershed(-distance, ndi.label(h_maxima(distance, h))[0], mask=cleaned))


def variants(probability: np.ndarray, rgb: np.ndarray, rules) -> dict[str, np.ndarray]:
    """Instance label images of one map (and of the stain) under each lever."""
    from scipy import ndimage as ndi

    from medcl.nuclei_check import stain_density
    from medcl.segmentation import instances_from_mask, probability_foreground

    density, cut = stain_density(rgb)
    stain, stain_map = density > cut, np.clip(density / (2 * cut), 0, 1)
    foreground = probability_foreground(probability, rules)
    distance, on_map = replace(rules, markers="distance"), replace(rules, markers="map")
    out = {}
    for source, mask, score in (("network", foreground, probability), ("stain", stain, density)):
        for d in (4, 6, 8, 10):
            out[f"{source}: distance markers {d} px"] = instances_from_mask(mask, replace(distance, min_distance=d))
        for h in (1, 2, 3):
            out[f"{source}: h-maxima markers h={h}"] = _hmax_instances(mask, rules, h)
        for d in (8, 10, 12, 14):
            out[f"{source}: map watershed {d} px"] = instances_from_mask(mask, replace(on_map, min_distance=d), score)
    smoothed = ndi.gaussian_filter(probability, 2)
    out["network smoothed 2 px before the cut"] = instances_from_mask(
        probability_foreground(smoothed, rules), replace(on_map, min_distance=12), smoothed)
    mean = 0.5 * probability + 0.5 * stain_map
    twelve = replace(on_map, min_distance=12)
    out["mean of network and stain maps"] = instances_from_mask(probability_foreground(mean, rules), twelve, mean)
    out["intersection of network and stain regions"] = instances_from_mask(foreground & stain, twelve, mean)
    out["union of network and stain regions"] = instances_from_mask(foreground | stain, twelve, mean)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="trained patch-contrast runs")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--names", type=Path, default=NAMES)
    p.add_argument("--out", type=Path, default=Path("docs/results/monuseg-dev-levers"))
    args = p.parse_args(argv)
    from PIL import Image

    from medcl.segmentation import InstanceRules, segmentation_scores
    from training.nuclei import image_files, load_segmenter, nuclei_probability, read_name_list, read_rgb

    names = set(read_name_list(args.names))
    files = [f for f in image_files(args.data / "images") if f.stem in names
             and (args.data / "instances" / f.name).is_file()]
    if not files:
        print(f"segmentation_levers: no development images with instances under {args.data}", file=sys.stderr)
        return 2
    table: dict[str, dict[str, list[dict]]] = {}
    for run in args.runs:
        network, card = load_segmenter(run)
        rules = InstanceRules.of(card.segmentation)
        for f in files:
            rgb = read_rgb(f)
            truth = np.asarray(Image.open(args.data / "instances" / f.name)).astype(np.int64)
            for lever, labels in variants(nuclei_probability(network, card.segmentation, rgb), rgb, rules).items():
                table.setdefault(lever, {}).setdefault(run.name, []).append(segmentation_scores(truth, labels))
    runs = [r.name for r in args.runs]
    lines = [f"# Post-processing levers on the {len(files)} development images", "",
             "Mean Dice / AJI / PQ over the development images (configs/splits/monuseg-dev.txt), per run; the "
             "stain rows do not depend on the run (shown once). Chosen from here: the map watershed with "
             "markers 12 px apart for networks and stain, the stain smoothed by 2 px.", "",
             "| lever | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for lever, by_run in table.items():
        cells = []
        for r in runs:
            if lever.startswith("stain") and r != runs[0]:
                cells.append("")
                continue
            v = by_run[r]
            cells.append(" / ".join(f"{np.mean([x[k] for x in v]):.3f}" for k in ("dice", "aji", "pq")))
        lines.append(f"| {lever} | " + " | ".join(cells) + " |")
    raw = {lever: {r: [{k: round(x[k], 4) for k in ("dice", "aji", "pq")} for x in v] for r, v in by_run.items()}
           for lever, by_run in table.items()}
    command = "python -m bench.segmentation_levers " + " ".join(map(str, args.runs)) + f" --out {args.out}"
    write_results(args.out, {"images": [f.name for f in files], "levers": raw}, lines, command)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
