"""Nuclei segmentation on the MoNuSeg test split: trained runs side by side with the classical baseline.

Every method goes through the same post-processing (medcl/segmentation.py) and the same metrics
(Dice, AJI, PQ per image, then the mean). Training time and parameter count come from each run's card.

    python -m bench.segmentation_quality runs/nuclei-monuseg-patch-contrast runs/nuclei-monuseg-unet \
        --out docs/results/monuseg-segmentation
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import write_results

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "test"
KEYS = ("dice", "aji", "pq")


def _truth(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.int64)


def evaluate_classical(images: Path, instances: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from medcl.segmentation import classical_instances, segmentation_scores
    from training.nuclei import image_files, read_rgb

    per_image, predictions = {}, {}
    for f in image_files(images):
        pred = classical_instances(read_rgb(f))
        per_image[f.name] = segmentation_scores(_truth(instances / f.name), pred)
        predictions[f.name] = pred
    return per_image, predictions


def evaluate_run(run_dir: Path, images: Path, instances: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    from training.nuclei import evaluate_segmenter, load_segmenter

    network, card = load_segmenter(run_dir)
    predictions: dict[str, np.ndarray] = {}
    result = evaluate_segmenter(network, card.segmentation, images, instances, predictions=predictions)
    return result["per_image"], predictions, card.training | {"method": card.method,
                                                              "channel_rule": card.segmentation.channel_rule}


def overlay_figure(image_path: Path, instances: Path, predictions: dict[str, dict[str, np.ndarray]], out: Path) -> Path:
    """One test image: ground-truth contours, then each method's, on a 400x400 crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from training.nuclei import read_rgb

    rgb = read_rgb(image_path)
    y0, x0, size = 300, 300, 400
    panels = {"ground truth": _truth(instances / image_path.name), **{k: v[image_path.name] for k, v in predictions.items()}}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (title, labels) in zip(axes, panels.items()):
        crop = rgb[y0:y0 + size, x0:x0 + size].copy()
        edges = find_boundaries(labels[y0:y0 + size, x0:x0 + size], mode="inner")
        crop[edges] = (0, 255, 0) if title == "ground truth" else (255, 255, 0)
        ax.imshow(crop)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"MoNuSeg test {image_path.stem} (crop {size}x{size} px at 40x)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path, help="trained segmenter runs (task: segment)")
    p.add_argument("--data", type=Path, default=DATA, help="folder with images/ and instances/")
    p.add_argument("--out", type=Path, default=Path("docs/results/monuseg-segmentation"))
    args = p.parse_args(argv)
    images, instances = args.data / "images", args.data / "instances"
    if not images.is_dir() or not instances.is_dir():
        print(f"segmentation_quality: MoNuSeg test data not found at {args.data}", file=sys.stderr)
        return 2
    rows, raw, predictions = [], {}, {}
    start = time.perf_counter()
    per_image, predictions["classical (H + Otsu + watershed)"] = evaluate_classical(images, instances)
    raw["classical"] = {"per_image": per_image, "seconds_inference": round(time.perf_counter() - start, 1)}
    rows.append(("classical: colour deconvolution + Otsu + watershed", per_image, "none", 0, "-"))
    for run in args.runs:
        start = time.perf_counter()
        per_image, preds, training = evaluate_run(run, images, instances)
        raw[run.name] = {"per_image": per_image, "training": training,
                         "seconds_inference": round(time.perf_counter() - start, 1)}
        label = {"patch_contrast": "self-supervised patch contrast (no labels)",
                 "supervised_unet": "supervised U-Net (MoNuSeg train masks)"}.get(training["method"], run.name)
        predictions[label.split(" (")[0]] = preds
        rows.append((label, per_image, f"{training['seconds']:.0f} s ({training['steps_run']} steps, kept "
                     f"{training['chosen_step']})", training["parameters"], training.get("channel_rule", "")))
    lines = ["# Nuclei segmentation on MoNuSeg test (14 images, 1000x1000, 40x)", "",
             "Mean over images of per-image scores; every method through the same post-processing "
             "(opening disk 3, closing disk 1, holes filled, < 30 px dropped, distance-transform watershed).", "",
             "| method | Dice | AJI | PQ | training (this CPU) | parameters |", "|---|---|---|---|---|---|"]
    for label, per_image, seconds, params, _ in rows:
        means = {k: np.mean([v[k] for v in per_image.values()]) for k in KEYS}
        stds = {k: np.std([v[k] for v in per_image.values()]) for k in KEYS}
        lines.append(f"| {label} | {means['dice']:.3f} ± {stds['dice']:.3f} | {means['aji']:.3f} ± {stds['aji']:.3f} "
                     f"| {means['pq']:.3f} ± {stds['pq']:.3f} | {seconds} | {params:,} |")
        raw.setdefault("summary", {})[label] = {k: round(float(means[k]), 4) for k in KEYS}
    rules = [r for r in rows if r[4] not in ("", "-")]
    if rules:
        lines += ["", *[f"- {label}: nuclei map chosen by {rule}." for label, _, _, _, rule in rules]]
    figure = overlay_figure(sorted(images.glob("*.png"))[0], instances, predictions, args.out.with_suffix(".png"))
    lines += ["", f"![overlays]({figure.name})", "",
              "± is the spread over the 14 test images (one training seed)."]
    write_results(args.out, raw, lines, "python -m bench.segmentation_quality " + " ".join(map(str, args.runs))
                  + f" --out {args.out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
