"""Retrieval quality of encoders through the case index: index a training split (labels as metadata),
query with the test split, report precision@k and majority-vote accuracy@5 (the metric of SISH,
Yottixel and RetCCL).

    python -m bench.search_quality runs/bloodmnist-*pct --untrained runs/bloodmnist-s5cl-1pct \\
        --out docs/results/bloodmnist-retrieval
    python -m bench.search_quality runs/ham10000-*pct --config configs/ham10000.yaml \\
        --untrained runs/ham10000-s5cl-10pct --out docs/results/ham10000-retrieval

An official split (``.npz``) indexes its train split and queries its test split. ``--config`` rebuilds
the seeded, group-safe split the encoders were trained on (HAM10000: by lesion), indexes everything
outside the test groups (train + validation) and queries the held-out groups.

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
from training.config import load_config
from training.data import ImageSet, read_npz
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
    # Mean over classes of the per-class share: what a rare class (df, vasc in HAM10000) gets.
    truths = np.array(query_labels)
    out["balanced_majority_vote_accuracy@5"] = float(np.mean([np.mean(np.array(votes)[truths == c])
                                                              for c in np.unique(truths)]))
    out["search_seconds"] = seconds
    return out


def load_bank_and_queries(args: argparse.Namespace, card) -> tuple[ImageSet, ImageSet, Path, str]:
    """(index images, query images, data path, what the index holds) for an official or a rebuilt split."""
    if args.config is None:
        data_path = args.data or Path(card.data.path)
        splits = read_npz(data_path, card.class_names)
        return splits.train, splits.test, data_path, "train split"
    from training.engine import load_splits

    config = load_config(args.config)
    if config.preprocess != card.preprocess:
        raise SystemExit(f"{args.config}'s preprocessing differs from the encoders' card: not the same data")
    splits = load_splits(config.data, config.preprocess, config.seed)
    bank = splits.train
    if splits.val is not None:
        bank = ImageSet(np.concatenate([bank.images, splits.val.images]),
                        np.concatenate([bank.labels, splits.val.labels]), bank.class_names,
                        groups=None if bank.groups is None else np.concatenate([bank.groups, splits.val.groups]))
    if bank.groups is not None and splits.test.groups is not None:
        shared = set(bank.groups) & set(splits.test.groups)
        if shared:  # the whole point of a grouped split; never report numbers from a leaky one
            raise SystemExit(f"{len(shared)} {config.data.group_column} values are on both sides of the split")
    group = config.data.group_column or "image"
    return bank, splits.test, Path(config.data.path), f"all images outside the held-out {group}s (train + val)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--untrained", type=Path, help="a run whose architecture to use with random weights")
    p.add_argument("--data", type=Path, help="the .npz (default: the first run's data)")
    p.add_argument("--config", type=Path, help="the training config whose seeded split to rebuild (CSV/folder data)")
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
    bank_set, query_set, data_path, index_what = load_bank_and_queries(args, card0)
    names = card0.class_names
    bank_labels = [names[i] for i in bank_set.labels]
    query_labels = [names[i] for i in query_set.labels]
    rows = []
    for run_name, _, model, card in encoders:
        with torch.no_grad():
            _, bank = predict(model, bank_set.images, card.preprocess.mean, card.preprocess.std)
            _, queries = predict(model, query_set.images, card.preprocess.mean, card.preprocess.std)
        scores = retrieval_scores(bank, bank_labels, queries, query_labels, run_name)
        rows.append({"encoder": run_name, "labels_used_in_training": card.data.label_fraction
                     if run_name != "untrained" else 0.0, **scores})
        print(json.dumps(rows[-1]))
    result = {"data": str(data_path), "index": f"{index_what}, {len(bank_labels)} images, labels as metadata",
              "queries": f"test split, {len(query_labels)} images", "backend": "embedded (FAISS flat, exact)",
              "rows": rows}
    lines = [f"# Similar-case retrieval on {card0.data.name}", "",
             f"Index: {result['index']}. Queries: {result['queries']}. Backend: {result['backend']}.",
             "A hit is relevant when its label equals the query's. Majority-vote accuracy@5 is the share of",
             "queries whose top-5 majority label (ties: the better-ranked label) is the query's label;",
             "balanced = its mean over classes.", "",
             "| encoder | labels used in training | P@1 | P@5 | P@10 | majority-vote acc@5 | balanced |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['labels_used_in_training']:.0%} | {r['precision@1']:.3f} | "
                     f"{r['precision@5']:.3f} | {r['precision@10']:.3f} | {r['majority_vote_accuracy@5']:.3f} | "
                     f"{r['balanced_majority_vote_accuracy@5']:.3f} |")
    write_results(args.out, result, lines, "python -m bench.search_quality " + " ".join(str(r) for r in args.runs)
                  + (f" --config {args.config}" if args.config else "")
                  + (f" --untrained {args.untrained}" if args.untrained else "") + f" --out {args.out}")


if __name__ == "__main__":
    main()
