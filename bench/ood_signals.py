"""Which image signal the out-of-distribution flag should use, chosen on development images only.

The flag in /classify joins two signals: the embedding's distance to the training set, and a score of
the image's colour and texture statistics against the training images'. This compares candidate image
scores for the two demo models:

- ``gaussian14``: Mahalanobis distance of 14 statistics (channel mean and spread of intensity and of
  optical density, mean gradient across and along) from a Gaussian fitted to the training images;
- ``gaussian26``: the same with 26 statistics (adds saturation, gradients at half resolution, the
  Laplacian, the shares of near-white and dark pixels, and the three spreads of the optical-density
  colour cloud, which is flat for two stains and round for a photograph);
- ``knn14`` / ``knn26``: mean Euclidean distance to the 10 nearest training images in the standardised
  statistics (no single-Gaussian assumption: fat, stroma and tumour patches form separate clusters).

Each threshold is the 99th percentile of its score on the model's validation images. The choice is made
on **development** sets of other modalities (retinal fundus photographs: DRIVE, CHASE_DB1 and
RetinaMNIST; DSB 2018 nuclei, mostly fluorescence; an IHC tile), one candidate for every model: the
highest share of all development images flagged (with the embedding signal), pooled over the models;
a tie goes to the first in CANDIDATES' order (the simpler). The evaluation sets (blood-cell photographs and dermoscopy for the
PatchCamelyon model; H&E for the blood-cell model; each model's own test images) are printed beside it
and choose nothing.

    python -m bench.ood_signals --data ../shared/data --out docs/results/ood-signals
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.pcam_demo import Served, image_files, npz_images, read_images
from medcl.demo import DEMO_PCAM, demo_package_dir
from medcl.drift import OOD_QUANTILE, StatisticsReference, nearest_distance
from medcl.preprocess import to_model_pixels
from training.config import load_config
from training.engine import prepare_data

CANDIDATES = ("gaussian14", "gaussian26", "knn14", "knn26")
REPO = Path(__file__).resolve().parent.parent


def candidate_reference(name: str, train_pixels: np.ndarray) -> StatisticsReference:
    """``gaussian14`` -> a Gaussian over the first 14 statistics, ``knn26`` -> nearest neighbours over 26, ..."""
    kind, count = name[:-2], int(name[-2:])
    return StatisticsReference.fit(train_pixels, kind=kind, statistics=count)


def pixels_of(model: Served, images: list[Image.Image]) -> np.ndarray:
    return np.stack([to_model_pixels(im, model.card.preprocess) for im in images])


def embedding_distance(model: Served, images: list[Image.Image]) -> np.ndarray:
    _, embeddings, _ = model.run(images)
    return nearest_distance(embeddings, model.bank)


def dev_sets(d: Path) -> dict[str, list[Image.Image]]:
    sets: dict[str, list[Image.Image]] = {}
    fundus = image_files(d / "drive") + image_files(d / "chasedb1")
    fundus = [p for p in fundus if "images" in p.parts or p.parent.name == "chasedb1"]
    fundus = [p for p in fundus if "manual" not in p.name.lower() and "_1st" not in p.name and "_2nd" not in p.name]
    if fundus:
        sets["fundus photographs (DRIVE, CHASE_DB1)"] = read_images(fundus)
    if (d / "retinamnist" / "retinamnist.npz").is_file():
        sets["RetinaMNIST"] = npz_images(d / "retinamnist" / "retinamnist.npz", "test")
    dsb = [p for p in image_files(d / "nuclei-dsb2018") if "images" in p.parts]
    if dsb:
        sets["DSB 2018 nuclei (mostly fluorescence)"] = read_images(dsb)
    if (d / "misc" / "ihc.png").is_file():
        sets["IHC tile"] = read_images([d / "misc" / "ihc.png"])
    return sets


def evaluate(model: Served, train_pixels: np.ndarray, val_images: list[Image.Image], own: tuple[str, list],
             dev: dict[str, list], held: dict[str, list]) -> dict:
    """Share flagged per set and candidate (embedding signal OR image signal, thresholds at the 99th
    percentile of the validation images)."""
    val_pixels = pixels_of(model, val_images)
    val_distance = embedding_distance(model, val_images)
    emb_threshold = float(np.quantile(val_distance, OOD_QUANTILE))
    sets = {"validation": ("validation", val_images), own[0]: ("in distribution", own[1])}
    sets.update({k: ("development (chooses)", v) for k, v in dev.items()})
    sets.update({k: ("evaluation (reported only)", v) for k, v in held.items()})
    distances = {k: embedding_distance(model, v[1]) for k, v in sets.items()}
    pixels = {k: (val_pixels if k == "validation" else pixels_of(model, v[1])) for k, v in sets.items()}
    out: dict = {"model": model.card.name, "embedding_threshold": emb_threshold, "candidates": {}}
    for name in CANDIDATES:
        ref = candidate_reference(name, train_pixels)
        threshold = float(np.quantile(ref.score(val_pixels), OOD_QUANTILE))
        rows = {}
        for k, (kind, images) in sets.items():
            image_flag = ref.score(pixels[k]) > threshold
            both = image_flag | (distances[k] > emb_threshold)
            rows[k] = {"kind": kind, "images": len(images), "image_signal": float(image_flag.mean()),
                       "embedding_signal": float((distances[k] > emb_threshold).mean()), "flagged": float(both.mean())}
        dev = [r for r in rows.values() if r["kind"].startswith("development")]
        out["candidates"][name] = {"threshold": threshold, "sets": rows,
                                   "development_images": sum(r["images"] for r in dev),
                                   "development_flagged": sum(round(r["flagged"] * r["images"]) for r in dev)}
    return out


def choose(models: list[dict]) -> str:
    """The candidate that flags the largest share of all development images, pooled over the models."""
    def share(name: str) -> float:
        flagged = sum(m["candidates"][name]["development_flagged"] for m in models)
        return flagged / max(sum(m["candidates"][name]["development_images"] for m in models), 1)
    return max(CANDIDATES, key=lambda n: (share(n), -CANDIDATES.index(n)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--blood", type=Path, default=None, help="default: MEDCL_HOME/packages/demo-bloodmnist")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ood-signals"))
    ap.add_argument("--note", default="", help="a closing paragraph for the page")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    d = args.data.resolve()
    if not (d / "pcam" / "valid").is_dir():
        raise SystemExit(f"no PatchCamelyon under {d}: pass --data")
    dev = dev_sets(d)
    result: dict = {"command": "python -m bench.ood_signals " + shlex.join(argv), "models": [], "note": args.note}

    pcam = Served(DEMO_PCAM / "package")
    config = load_config(REPO / "configs" / "demo-pcam.yaml",
                         {"data.path": str(d / "pcam" / "train"), "data.test_path": str(d / "pcam" / "valid")})
    data = prepare_data(config)
    train = data.labelled.images[np.sort(np.random.default_rng(0).permutation(len(data.labelled))[:2048])]
    held = {"blood-cell photographs": read_images(image_files(d / "blood-photos")),
            "dermoscopy (HAM10000)": read_images(image_files(d / "ham10000" / "images"))}
    result["models"].append(evaluate(pcam, train, [Image.fromarray(x) for x in data.val.images],
                                     ("PatchCamelyon valid/", [Image.fromarray(x) for x in data.test.images]),
                                     dev, held))

    blood_dir = args.blood or demo_package_dir()
    if (blood_dir / "card.json").is_file():
        blood = Served(blood_dir)
        config = load_config(REPO / "configs" / "demo-bloodmnist.yaml")
        data = prepare_data(config)
        pick = np.sort(np.random.default_rng(0).permutation(len(data.labelled))[:2048])
        he = {"PatchCamelyon valid/ (H&E)": read_images(image_files(d / "pcam" / "valid")),
              "H&E tiles (CRC, Kather, MoNuSeg test)": read_images(image_files(d / "histology-tiles")
                                                                  + image_files(d / "monuseg" / "test" / "images"))}
        result["models"].append(evaluate(blood, data.labelled.images[pick], [Image.fromarray(x) for x in data.val.images],
                                         ("BloodMNIST test", npz_images(d / "bloodmnist" / "bloodmnist.npz", "test")),
                                         dev, he))
    result["chosen"] = choose(result["models"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result) + "\n")
    print(json.dumps({"chosen": result["chosen"], **{m["model"]: {k: v["development_flagged"] / v["development_images"]
                      for k, v in m["candidates"].items()} for m in result["models"]}}))
    return 0


def render(r: dict) -> str:
    lines = ["# The out-of-distribution image signal, chosen on development images", "",
             f"Made by `{r['command']}`. Each cell: share of images flagged by the embedding signal or the image "
             "signal (image signal alone in brackets); thresholds at the 99th percentile of each score on the "
             "model's validation images. Development sets choose one candidate for all models (the largest share "
             "of all development images flagged, pooled over the models; ties to the simpler); evaluation sets and "
             f"the models' own test images only report. **Chosen: {r['chosen']}.**", ""]
    for m in r["models"]:
        names = list(m["candidates"])
        lines += [f"## {m['model']}", "",
                  "| images | role | count | embedding signal alone | " + " | ".join(names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        sets = m["candidates"][names[0]]["sets"]
        for k, row in sets.items():
            cells = [f"{m['candidates'][n]['sets'][k]['flagged']:.1%} ({m['candidates'][n]['sets'][k]['image_signal']:.1%})"
                     for n in names]
            lines.append(f"| {k} | {row['kind']} | {row['images']} | {row['embedding_signal']:.1%} | "
                         + " | ".join(cells) + " |")
        lines.append("| all development images | | " + str(m["candidates"][names[0]]["development_images"]) + " | | "
                     + " | ".join(f"{m['candidates'][n]['development_flagged'] / m['candidates'][n]['development_images']:.1%}"
                                  for n in names) + " |")
        lines.append("")
    if r.get("note"):
        lines.append(r["note"])
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
