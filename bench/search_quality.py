"""Retrieval quality of encoders through the case index: index a training split (labels as metadata),
query with the test split, report precision@k and majority-vote accuracy@5 (the metric of SISH,
Yottixel and RetCCL).

    python -m bench.search_quality runs/bloodmnist-*pct --untrained runs/bloodmnist-s5cl-1pct \\
        --out docs/results/bloodmnist-retrieval

Encoders come from training runs (PyTorch); ``--untrained RUN`` adds the same architecture with
random weights (seed 0) as the floor. Search goes through the project's embedded index (exact).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import write_results
from medcl.index.embedded import EmbeddedIndex
from medcl.index.schema import CaseMetadata
from training.data import read_npz
from training.engine import load_trained
from training.metrics import predict
from training.models import create_model

KS = (1, 5, 10)


def retrieval_scores(bank: np.ndarray, bank_labels: list[str], queries: np.ndarray, query_labels: list[str],
                     name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        index = EmbeddedIndex(tmp, name, "eval", bank.shape[1], kind="flat")
        for i in range(0, len(bank), 4096):
            index.add(bank[i:i + 4096], [CaseMetadata(label=label) for label in bank_labels[i:i + 4096]])
        start = time.perf_counter()
        results = []
        for i in range(0, len(queries), 512):
            results += index.search(queries[i:i + 512], k=max(KS))
        seconds = time.perf_counter() - start
        index.close()
    out = {}
    for k in KS:
        out[f"precision@{k}"] = float(np.mean([np.mean([h.case.label == truth for h in r.hits[:k]])
                                               for r, truth in zip(results, query_labels)]))
    votes = []
    for r, truth in zip(results, query_labels):
        labels = [h.case.label for h in r.hits[:5]]
        winner = max(labels, key=lambda lab: (labels.count(lab), -labels.index(lab)))
        votes.append(winner == truth)
    out["majority_vote_accuracy@5"] = float(np.mean(votes))
    out["search_seconds"] = seconds
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--untrained", type=Path, help="a run whose architecture to use with random weights")
    p.add_argument("--data", type=Path, help="the .npz (default: the first run's data)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()

    encoders = []
    for run in args.runs:
        model, card = load_trained(run)
        encoders.append((run.name, card.method, model, card))
    if args.untrained:
        _, card = load_trained(args.untrained)
        torch.manual_seed(0)
        encoders.append(("untrained", "untrained", create_model(card.architecture, card.num_classes).eval(), card))
    card0 = encoders[0][3]
    data_path = args.data or Path(card0.data.path)
    splits = read_npz(data_path, card0.class_names)
    names = card0.class_names
    bank_labels = [names[i] for i in splits.train.labels]
    query_labels = [names[i] for i in splits.test.labels]
    rows = []
    for run_name, _, model, card in encoders:
        with torch.no_grad():
            _, bank = predict(model, splits.train.images, card.preprocess.mean, card.preprocess.std)
            _, queries = predict(model, splits.test.images, card.preprocess.mean, card.preprocess.std)
        scores = retrieval_scores(bank, bank_labels, queries, query_labels, run_name)
        rows.append({"encoder": run_name, "labels_used_in_training": card.data.label_fraction
                     if run_name != "untrained" else 0.0, **scores})
        print(json.dumps(rows[-1]))
    result = {"data": str(data_path), "index": f"train split, {len(bank_labels)} tiles, labels as metadata",
              "queries": f"test split, {len(query_labels)} tiles", "backend": "embedded (FAISS flat, exact)",
              "rows": rows}
    lines = [f"# Similar-case retrieval on {data_path.stem}", "",
             f"Index: {result['index']}. Queries: {result['queries']}. Backend: {result['backend']}.",
             "A hit is relevant when its label equals the query's. Majority-vote accuracy@5 is the share of",
             "queries whose top-5 majority label (ties: the better-ranked label) is the query's label.", "",
             "| encoder | labels used in training | P@1 | P@5 | P@10 | majority-vote acc@5 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['labels_used_in_training']:.0%} | {r['precision@1']:.3f} | "
                     f"{r['precision@5']:.3f} | {r['precision@10']:.3f} | {r['majority_vote_accuracy@5']:.3f} |")
    write_results(args.out, result, lines, "python -m bench.search_quality " + " ".join(str(r) for r in args.runs)
                  + (f" --untrained {args.untrained}" if args.untrained else "") + f" --out {args.out}")


if __name__ == "__main__":
    main()
