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


def evaluate_classical(images: Path, instances: Path,
                       names: set[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    from medcl.segmentation import as_brightfield, classical_instances, segmentation_scores
    from training.nuclei import image_files, read_rgb

    per_image, predictions = {}, {}
    for f in image_files(images):
        if names is not None and f.stem not in names:
            continue
        pred = classical_instances(as_brightfield(read_rgb(f))[0])
        per_image[f.name] = segmentation_scores(_truth(instances / f.name), pred)
        predictions[f.name] = pred
    return per_image, predictions


def evaluate_run(run_dir: Path, images: Path, instances: Path,
                 names: set[str] | None = None) -> tuple[dict, dict[str, np.ndarray], dict]:
    from training.nuclei import evaluate_segmenter, load_segmenter

    network, card = load_segmenter(run_dir)
    predictions: dict[str, np.ndarray] = {}
    result = evaluate_segmenter(network, card.segmentation, images, instances, predictions=predictions, names=names)
    # variants of one method (stain input channel, self-training refinement) are separate rows
    method = card.method
    if card.segmentation.inputs != "rgb":
        method += "+stain_input"
    if card.training.get("refine_steps"):
        method += "+refined"
    return result["per_image"], predictions, card.training | {"method": method,
                                                              "channel_rule": card.segmentation.channel_rule}


def overlay_figure(image_path: Path, instances: Path, predictions: dict[str, dict[str, np.ndarray]], out: Path,
                   title: str) -> Path:
    """One test image: ground-truth contours, then each method's, on a central crop of at most 400x400."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from training.nuclei import read_rgb

    rgb = read_rgb(image_path)
    size = min(400, *rgb.shape[:2])
    y0, x0 = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
    panels = {"ground truth": _truth(instances / image_path.name), **{k: v[image_path.name] for k, v in predictions.items()}}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (name, labels) in zip(axes, panels.items()):
        crop = rgb[y0:y0 + size, x0:x0 + size].copy()
        edges = find_boundaries(labels[y0:y0 + size, x0:x0 + size], mode="inner")
        crop[edges] = (0, 255, 0) if name == "ground truth" else (255, 255, 0)
        ax.imshow(crop)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{title}: {image_path.stem[:24]} (crop {size}x{size} px)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# how each training method is named in the table, and its share of labels in summary.json
# (0.0: no labels at all; 1.0: every training mask)
METHODS = {"classical": ("classical: colour deconvolution + Otsu + watershed", 0.0),
           "patch_contrast": ("self-supervised patch contrast (no labels)", 0.0),
           "patch_contrast+stain_input+refined": ("patch contrast, stain input channel, self-training on "
                                                  "stain-agreement pseudo-labels (no labels)", 0.0),
           "supervised_unet": ("supervised U-Net (MoNuSeg train masks)", 1.0)}


def _image_means(per_image: dict) -> dict[str, float]:
    return {k: float(np.mean([v[k] for v in per_image.values()])) for k in KEYS}


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path, help="trained segmenter runs (task: segment); several runs of "
                   "one method (seeds) are one row, mean ± std over them")
    p.add_argument("--data", type=Path, default=DATA, help="folder with images/ and instances/")
    p.add_argument("--dataset", default="monuseg", help="its name in the title and in summary.json")
    p.add_argument("--names", type=Path, default=None, help="score only the images named in this list "
                   "(stems, one per line), e.g. configs/splits/monuseg-dev.txt with --data .../monuseg/train")
    p.add_argument("--out", type=Path, default=Path("docs/results/monuseg-segmentation"))
    p.add_argument("--summary", type=Path, default=None,
                   help="merge per-seed Dice/AJI/PQ into this summary.json (dataset -> method -> label share)")
    args = p.parse_args(argv)
    images, instances = args.data / "images", args.data / "instances"
    if not images.is_dir() or not instances.is_dir():
        print(f"segmentation_quality: no images/ and instances/ under {args.data}", file=sys.stderr)
        return 2
    raw: dict = {"dataset": args.dataset, "data": str(args.data), "runs": {}}
    by_method: dict[str, list[dict]] = {}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    start = time.perf_counter()
    from training.nuclei import read_name_list

    names = set(read_name_list(args.names)) if args.names else None
    per_image, predictions["classical"] = evaluate_classical(images, instances, names)
    raw["runs"]["classical"] = {"per_image": per_image, "seconds_inference": round(time.perf_counter() - start, 1)}
    by_method["classical"] = [{"scores": _image_means(per_image), "seconds": None, "parameters": 0, "rule": "",
                               "steps": "none", "seed": None}]
    for run in args.runs:
        start = time.perf_counter()
        per_image, preds, training = evaluate_run(run, images, instances, names)
        raw["runs"][run.name] = {"per_image": per_image, "training": training,
                                 "seconds_inference": round(time.perf_counter() - start, 1)}
        method = training["method"]
        predictions.setdefault(method.replace("_", " "), preds)  # the first seed's picture
        by_method.setdefault(method, []).append({
            "scores": _image_means(per_image), "seconds": training["seconds"], "parameters": training["parameters"],
            "rule": training.get("channel_rule", ""), "seed": training.get("seed"),
            "steps": f"{training['steps_run']} steps, kept {training['chosen_step']}"})
    n_images = len(next(iter(raw["runs"].values()))["per_image"])
    seeds = max(len(v) for k, v in by_method.items() if k != "classical") if args.runs else 0
    lines = [f"# Nuclei segmentation on {args.dataset} ({n_images} images with instance masks)", "",
             "Per run: the mean over images of per-image scores; a row: mean ± standard deviation of that over "
             f"training seeds ({seeds} per trained method; the classical baseline has no seed). Every method "
             "goes through the same post-processing (opening disk 3, closing disk 1, holes filled, < 30 px "
             "dropped, distance-transform watershed).", "",
             "| method | seeds | Dice | AJI | PQ | training per run (this CPU) | parameters |",
             "|---|---|---|---|---|---|---|"]
    summary_rows = []
    for method, runs in by_method.items():
        label, share = METHODS.get(method, (method, 1.0))
        cells = " | ".join(_cell([r["scores"][k] for r in runs]) for k in KEYS)
        seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
        cost = f"{np.mean(seconds):.0f} s ({runs[0]['steps']})" if seconds else "none"
        n_seeds = len(runs) if method != "classical" else "–"
        lines.append(f"| {label} | {n_seeds} | {cells} | {cost} | {runs[0]['parameters']:,} |")
        raw.setdefault("summary", {})[method] = {k: [round(r["scores"][k], 4) for r in runs] for k in KEYS}
        summary_rows += [{"method": method, "label_fraction": share, "seed": r["seed"],
                          **{k: round(r["scores"][k], 4) for k in KEYS}} for r in runs]
    rules = [(METHODS.get(m, (m,))[0], r["rule"]) for m, runs in by_method.items() for r in runs[:1]
             if r["rule"] not in ("", "-")]
    lines += ["", *[f"- {label}: nuclei map chosen by {rule} (first seed)." for label, rule in rules]]
    figure = overlay_figure(images / sorted(next(iter(raw["runs"].values()))["per_image"])[0], instances, predictions, args.out.with_suffix(".png"),
                            args.dataset)
    lines += ["", f"![overlays]({figure.name})"]
    command = "python -m bench.segmentation_quality " + " ".join(map(str, args.runs))
    if args.data != DATA:
        command += f" --data {args.data} --dataset {args.dataset}"
    if args.names:
        command += f" --names {args.names}"
    command += f" --out {args.out}" + (f" --summary {args.summary}" if args.summary else "")
    write_results(args.out, raw, lines, command)
    if args.summary:
        from training.experiment import merge_summary

        merge_summary(args.summary, args.dataset, summary_rows, list(KEYS))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
