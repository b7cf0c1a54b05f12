"""Measure the demo model end to end: full-size PBC photographs POSTed to a running service.

    medcl demo serve &            # or: make serve
    python scripts/demo_report.py --url http://127.0.0.1:3000 \
        --photos ../shared/data/blood-photos --out docs/demo.md

Writes docs/demo.md, docs/demo.json and docs/demo_photos_confusion.png. None of the photographs'
source images was in the demo's training split (demo/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np

from medcl.card import Card
from training.metrics import classification_metrics
from training.plots import confusion_matrix_plot

FOLDER_TO_CLASS = {"ig": "immature_granulocyte"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--package", type=Path, default=Path(".medcl/packages/demo-bloodmnist"))
    ap.add_argument("--run", type=Path, default=Path(".medcl/runs/demo-bloodmnist"),
                    help="the demo's training run (for its learning curve)")
    ap.add_argument("--out", type=Path, default=Path("docs/demo.md"))
    ap.add_argument("--batch", type=int, default=25)
    args = ap.parse_args()

    card = Card.load(args.package)
    files = sorted(args.photos.rglob("*.jpg"))
    truth = np.array([card.class_names.index(FOLDER_TO_CLASS.get(f.parent.name, f.parent.name)) for f in files])
    predicted, versions = [], set()
    start = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(files), args.batch):
            chunk = files[i:i + args.batch]
            r = client.post(f"{args.url}/classify",
                            files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in chunk])
            r.raise_for_status()
            for answer in r.json():
                predicted.append(card.class_names.index(answer["label"]))
                versions.add(answer["model_version"])
    seconds = time.perf_counter() - start
    photos = classification_metrics(truth, np.array(predicted), card.class_names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure = args.out.with_name("demo_photos_confusion.png")
    confusion_matrix_plot(photos["confusion_matrix"], card.class_names, figure,
                          f"demo model on {len(files)} PBC photographs: accuracy {photos['accuracy']:.3f}")
    curve = args.run / "learning_curve.png"
    if curve.is_file():
        shutil.copyfile(curve, args.out.with_name("demo_learning_curve.png"))
    report = {"model_version": sorted(versions), "photos": photos, "n_photos": len(files),
              "http_seconds": round(seconds, 1), "test_split": {k: card.metrics[k] for k in
                                                               ("accuracy", "macro_f1", "balanced_accuracy",
                                                                "knn_accuracy")},
              "training": card.training, "parity": card.onnx.parity if card.onnx else None}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    per_class = "\n".join(f"| {name} | {photos['per_class_f1'][name]:.3f} |" for name in card.class_names)
    t = card.training
    args.out.write_text(f"""# The demo model

`make serve` trains this model on first run: S5CL on the carried BloodMNIST subset
(`demo/bloodmnist-demo.npz`, 3,000 training images, all labelled), using `configs/demo-bloodmnist.yaml`.

- version `{card.version}`, {t.get('steps_done')} steps in {t.get('train_seconds')} s on this 2-core machine
  (stopped on the time budget: {t.get('stopped_on_time_budget')})
- ONNX parity against PyTorch on {card.onnx.parity['images'] if card.onnx else '?'} held-out images: max |Δ logits|
  {card.onnx.parity['max_abs_diff_logits'] if card.onnx else '?':.2e}, max |Δ embedding| {card.onnx.parity['max_abs_diff_embedding'] if card.onnx else '?':.2e}

| evaluation | images | accuracy | macro-F1 | balanced accuracy |
|---|---|---|---|---|
| demo test split (28 px BloodMNIST tiles) | {card.data.n_test} | {card.metrics['accuracy']:.3f} | {card.metrics['macro_f1']:.3f} | {card.metrics['balanced_accuracy']:.3f} |
| full-size PBC photographs over HTTP (`/classify`) | {len(files)} | {photos['accuracy']:.3f} | {photos['macro_f1']:.3f} | {photos['balanced_accuracy']:.3f} |

The photographs are ~360x363 JPEGs. The service applies the card's preprocessing to them: the centre
200x200 crop and a bilinear resize to 28 px, as MedMNIST did. None of their source images was in the
demo's training split. {len(files)} images over HTTP in batches of {args.batch} took {seconds:.1f} s.

Per-class F1 on the photographs:

| class | F1 |
|---|---|
{per_class}

![confusion matrix on the photographs](demo_photos_confusion.png)

Learning curve of the demo run (loss terms per step; validation accuracy every 50 steps):

![learning curve](demo_learning_curve.png)

Produced by:

    make serve                        # first run trains; or: .venv/bin/medcl demo serve
    .venv/bin/python scripts/demo_report.py --url http://127.0.0.1:3000 --photos ../shared/data/blood-photos --out docs/demo.md
""")
    print(json.dumps({"photos_accuracy": photos["accuracy"], "photos_macro_f1": photos["macro_f1"],
                      "test_accuracy": card.metrics["accuracy"]}))


if __name__ == "__main__":
    main()
