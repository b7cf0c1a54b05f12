"""The few settings the PatchCamelyon demo model was chosen among, compared on the validation share of
``train/`` only (``valid/`` is the evaluation split and plays no part here): each finished run, with and
without D4 test-time augmentation (the mean over a tile's 8 flips and quarter-turns).

    python -m bench.pcam_settings runs/demo-pcam runs/demo-pcam-stain --data ../shared/data/pcam \\
        --out docs/results/pcam-settings

Each run must come from configs/demo-pcam.yaml with the same seed (so the validation share is the same
images); the run's own settings are listed beside its figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medcl.demo import DEMO_PCAM_CONFIG
from training.config import load_config
from training.engine import load_trained, prepare_data
from training.metrics import predict


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="PatchCamelyon as DIR/{train,valid}/{0,1}/*.jpg")
    ap.add_argument("--out", type=Path, default=Path("docs/results/pcam-settings"))
    ap.add_argument("--describe", action="append", default=[], metavar="RUN=TEXT",
                    help="what sets a run apart, for the table (repeatable)")
    ap.add_argument("--note", default="", help="a closing sentence for the page (which setting was kept, and why)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    data = args.data.resolve()
    config = load_config(DEMO_PCAM_CONFIG, {"data.path": str(data / "train"), "data.test_path": str(data / "valid")})
    val = prepare_data(config).val
    rows = []
    for run in args.runs:
        model, card = load_trained(run)
        if card.training.get("seed") != config.seed:
            raise SystemExit(f"{run} was trained with seed {card.training.get('seed')}: its validation share differs")
        described = dict(d.split("=", 1) for d in args.describe)
        row = {"run": str(run), "method": card.method, "steps": card.training.get("steps_done"),
               "settings": described.get(run.name, "")}
        for tta in ("none", "d4"):
            model.test_time_augmentation = tta
            logits, _ = predict(model, val.images, card.preprocess.mean, card.preprocess.std)
            p = softmax(logits)
            row[tta] = {"accuracy": float((p.argmax(1) == val.labels).mean()), "auroc": float(roc_auc_score(val.labels, p[:, 1]))}
        rows.append(row)
    result = {"command": "python -m bench.pcam_settings " + shlex.join(argv), "validation_images": len(val),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Settings of the PatchCamelyon demo model, compared on the validation share of train/", "",
             f"Made by `{result['command'].strip()}`; {len(val)} validation images (10% of train/, seeded, the "
             "same for every run). `valid/` takes no part in this choice.", "",
             "| run | settings | accuracy | AUROC | accuracy, D4 TTA | AUROC, D4 TTA |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['run']).name} | {r['settings']} | {r['none']['accuracy']:.3f} | {r['none']['auroc']:.3f} | "
                     f"{r['d4']['accuracy']:.3f} | {r['d4']['auroc']:.3f} |")
    if args.note:
        lines += ["", args.note]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
