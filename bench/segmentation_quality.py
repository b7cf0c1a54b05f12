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


# The post-processing chosen on the MoNuSeg development images (docs/segmentation.md): the stain
# smoothed by a Gaussian of 2 px before Otsu, watershed on the smoothed stain with markers 12 px apart.
DEV_CHOSEN_RULES = {"threshold_rule": "otsu", "markers": "map", "min_distance": 12}


def selected_images(images: Path, names: set[str] | None, modality: str | None) -> list[Path]:
    """The images to score: those named (``names``), of one modality (as the service detects it)."""
    from medcl.segmentation import looks_fluorescent
    from training.nuclei import image_files, read_rgb

    chosen = [f for f in image_files(images) if names is None or f.stem in names]
    if modality:
        chosen = [f for f in chosen if looks_fluorescent(read_rgb(f)) == (modality == "fluorescence")]
    return chosen


def evaluate_classical(files: list[Path], instances: Path,
                       dev_chosen: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """The classical baseline as defined (colour deconvolution, Otsu, distance watershed), or with the
    post-processing chosen on the development images (``dev_chosen``: the answer /segment gives when
    it does not use the network)."""
    from medcl.nuclei_check import answer_tile
    from medcl.segmentation import InstanceRules, as_brightfield, classical_instances, segmentation_scores
    from training.nuclei import read_rgb

    per_image, predictions = {}, {}
    rules = InstanceRules(**DEV_CHOSEN_RULES)
    for f in files:
        if not (instances / f.name).is_file():
            continue
        rgb = as_brightfield(read_rgb(f))[0]
        pred = answer_tile(None, rgb, rules, "classical").labels if dev_chosen else classical_instances(rgb)
        per_image[f.name] = segmentation_scores(_truth(instances / f.name), pred)
        predictions[f.name] = pred
    return per_image, predictions


def evaluate_checked(run_dir: Path, files: list[Path], instances: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """What /segment answers with ``method=network-or-classical``: the network's nuclei where its map
    passes the label-free check against the stain, else the classical method's (medcl/nuclei_check.py);
    only the classical method's if the segmenter failed its build self-check."""
    from medcl.nuclei_check import answer_tile
    from medcl.segmentation import InstanceRules, as_brightfield, segmentation_scores
    from training.nuclei import load_segmenter, nuclei_probability, read_rgb

    network, card = load_segmenter(run_dir)
    spec = card.segmentation
    per_image, predictions = {}, {}
    for f in files:
        if not (instances / f.name).is_file():
            continue
        rgb = as_brightfield(read_rgb(f))[0]
        rule = "classical" if card.training.get("self_check_passed") is False else "network-or-classical"
        probability = None if rule == "classical" else nuclei_probability(network, spec, rgb)
        answer = answer_tile(probability, rgb, InstanceRules.of(spec), rule)
        per_image[f.name] = {**segmentation_scores(_truth(instances / f.name), answer.labels),
                             "produced_by": answer.produced_by}
        predictions[f.name] = answer.labels
    return per_image, predictions


def _main_folder_images(path: str) -> int:
    from training.nuclei import SegmenterError, image_files

    try:
        return len(image_files(path))
    except SegmenterError:
        return 0


def evaluate_run(run_dir: Path, images: Path, instances: Path,
                 files: list[Path]) -> tuple[dict, dict[str, np.ndarray], dict]:
    from training.nuclei import evaluate_segmenter, load_segmenter

    network, card = load_segmenter(run_dir)
    predictions: dict[str, np.ndarray] = {}
    result = evaluate_segmenter(network, card.segmentation, images, instances, predictions=predictions,
                                names={f.stem for f in files})
    # variants of one method (stain input channel, self-training refinement) are separate rows
    method = card.method
    if card.segmentation.inputs != "rgb":
        method += "+stain_input"
    if card.training.get("refine_steps"):
        method += "+refined"
    if card.data.kind == "folder" and card.data.n_unlabelled > _main_folder_images(card.data.path):
        method += "+more_data"  # trained on further unlabelled folders (data.more) beside its main one
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
    fig.suptitle(f"{title}: {image_path.stem[:24]} (crop {size}x{size} px); green: ground truth, "
                 "yellow: the method's nuclei", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# how each training method is named in the table, and its share of labels in summary.json
# (0.0: no labels at all; 1.0: every training mask)
METHODS = {"classical": ("classical: colour deconvolution + Otsu + watershed", 0.0),
           "classical+dev_rules": ("classical with the development-chosen post-processing (stain smoothed "
                                   "2 px, watershed on the stain, markers 12 px apart)", 0.0),
           "patch_contrast": ("self-supervised patch contrast (no labels)", 0.0),
           "patch_contrast+stain_input+refined": ("patch contrast, stain input channel, self-training on "
                                                  "stain-agreement pseudo-labels (no labels)", 0.0),
           "patch_contrast+stain_input+refined+more_data": ("patch contrast, stain input channel, self-training, "
                                                            "trained on every unlabelled H&E at hand (MoNuSeg "
                                                            "training, CRC, Kather, PatchCamelyon; no labels)",
                                                            0.0),
           "supervised_unet": ("supervised U-Net (MoNuSeg train masks)", 1.0)}


def _label(method: str) -> tuple[str, float]:
    if method.endswith("+checked"):
        base, share = METHODS.get(method[:-len("+checked")], (method[:-len("+checked")], 0.0))
        return f"{base}, checked: the classical answer where its map fails the stain check", share
    return METHODS.get(method, (method, 1.0))


def paired_difference_figure(raw: dict, method: str, baseline: str, out: Path, title: str) -> Path | None:
    """Per image: the method's Dice and AJI minus the baseline's (first seed), sorted; one bar each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = next((r for r in raw["runs"].values() if r.get("training", {}).get("method") == method), None)
    if run is None or baseline not in raw["runs"]:
        return None
    base = raw["runs"][baseline]["per_image"]
    names = sorted(run["per_image"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(names) + 1.6), sharey=True)
    for ax, key in zip(axes, ("dice", "aji")):
        diff = [run["per_image"][n][key] - base[n][key] for n in names]
        ax.barh(range(len(names)), diff, color=["#2a7" if d >= 0 else "#c44" for d in diff])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), [n[:23] for n in names], fontsize=7)
        ax.set_xlabel(f"{key.upper()}: {method} minus {baseline}")
    fig.suptitle(f"{title}: per image, paired against {baseline} (green: the method is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


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
    p.add_argument("--modality", choices=("brightfield", "fluorescence"), default=None,
                   help="score only images of this modality, as /segment detects it (DSB 2018 holds both)")
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
    files = selected_images(images, names, args.modality)
    for method, dev_chosen in (("classical", False), ("classical+dev_rules", True)):
        start = time.perf_counter()
        per_image, predictions[method.replace("_", " ")] = evaluate_classical(files, instances, dev_chosen)
        raw["runs"][method] = {"per_image": per_image, "seconds_inference": round(time.perf_counter() - start, 1)}
        by_method[method] = [{"scores": _image_means(per_image), "seconds": None, "parameters": 0, "rule": "",
                              "steps": "none", "seed": None}]
    for run in args.runs:
        start = time.perf_counter()
        per_image, preds, training = evaluate_run(run, images, instances, files)
        raw["runs"][run.name] = {"per_image": per_image, "training": training,
                                 "seconds_inference": round(time.perf_counter() - start, 1)}
        method = training["method"]
        predictions.setdefault(method.replace("_", " "), preds)  # the first seed's picture
        row = {"seconds": training["seconds"], "parameters": training["parameters"],
               "rule": training.get("channel_rule", ""), "seed": training.get("seed"),
               "steps": f"{training['steps_run']} steps, kept {training['chosen_step']}"}
        by_method.setdefault(method, []).append({"scores": _image_means(per_image), **row})
        served, served_preds = evaluate_checked(run, files, instances)
        raw["runs"][run.name + "+checked"] = {"per_image": served, "training": {**training,
                                                                               "method": method + "+checked"}}
        predictions.setdefault("network checked", served_preds)
        by_method.setdefault(method + "+checked", []).append({
            "scores": _image_means(served), **row, "rule": "",
            "network_share": float(np.mean([v["produced_by"] == "network" for v in served.values()]))})
    n_images = len(next(iter(raw["runs"].values()))["per_image"])
    seeds = max(len(v) for k, v in by_method.items() if not k.startswith("classical")) if args.runs else 0
    lines = [f"# Nuclei segmentation on {args.dataset} ({n_images} images with instance masks"
             + (f", {args.modality} only" if args.modality else "") + ")", "",
             "Per run: the mean over images of per-image scores; a row: mean ± standard deviation of that over "
             f"training seeds ({seeds} per trained method; the classical rows have no seed). Every method "
             "goes through the same morphology (opening disk 3, closing disk 1, holes filled, < 30 px dropped); "
             "the classical baseline as defined splits touching nuclei by a distance-transform watershed "
             "(markers 6 px apart); trained runs and the second classical row use the watershed the "
             "development images chose (on the smoothed map or stain, markers 12 px apart). \"Checked\" rows "
             "are what /segment answers with method=network-or-classical: the network's nuclei where its map "
             "passes the label-free stain check, the second classical row's elsewhere. /segment's default for "
             "the demo model is the second classical row (docs/segmentation.md).", "",
             "| method | seeds | Dice | AJI | PQ | training per run (this CPU) | parameters | network answers |",
             "|---|---|---|---|---|---|---|---|"]
    summary_rows = []
    for method, runs in by_method.items():
        label, share = _label(method)
        cells = " | ".join(_cell([r["scores"][k] for r in runs]) for k in KEYS)
        seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
        cost = f"{np.mean(seconds):.0f} s ({runs[0]['steps']})" if seconds else "none"
        n_seeds = len(runs) if not method.startswith("classical") else "–"
        answered = (f"{np.mean([r['network_share'] for r in runs]):.0%} of images" if "network_share" in runs[0]
                    else "")
        lines.append(f"| {label} | {n_seeds} | {cells} | {cost} | {runs[0]['parameters']:,} | {answered} |")
        raw.setdefault("summary", {})[method] = {k: [round(r["scores"][k], 4) for r in runs] for k in KEYS}
        summary_rows += [{"method": method, "label_fraction": share, "seed": r["seed"],
                          **{k: round(r["scores"][k], 4) for k in KEYS}} for r in runs]
    rules = [(METHODS.get(m, (m,))[0], r["rule"]) for m, runs in by_method.items() for r in runs[:1]
             if r["rule"] not in ("", "-")]
    lines += ["", *[f"- {label}: nuclei map chosen by {rule} (first seed)." for label, rule in rules]]
    figure = overlay_figure(images / sorted(next(iter(raw["runs"].values()))["per_image"])[0], instances, predictions, args.out.with_suffix(".png"),
                            args.dataset)
    lines += ["", f"![overlays]({figure.name})"]
    served_methods = [m for m in by_method if m.endswith("+checked")]
    if served_methods:
        paired = paired_difference_figure(raw, served_methods[0], "classical",
                                          args.out.parent / (args.out.name + "-paired.png"), args.dataset)
        if paired is not None:
            lines += ["", f"![per-image difference against the classical baseline]({paired.name})"]
    command = "python -m bench.segmentation_quality " + " ".join(map(str, args.runs))
    if args.data != DATA:
        command += f" --data {args.data} --dataset {args.dataset}"
    if args.names:
        command += f" --names {args.names}"
    if args.modality:
        command += f" --modality {args.modality}"
    command += f" --out {args.out}" + (f" --summary {args.summary}" if args.summary else "")
    write_results(args.out, raw, lines, command)
    if args.summary:
        from training.experiment import merge_summary

        merge_summary(args.summary, args.dataset, summary_rows, list(KEYS))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
