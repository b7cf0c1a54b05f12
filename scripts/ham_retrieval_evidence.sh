#!/usr/bin/env bash
# Cross-entropy vs S5CL encoders on HAM10000 (split by lesion) at 10% and 100% of the training labels,
# then held-out-lesion retrieval through the case index.
#   bash scripts/ham_retrieval_evidence.sh        (about 30 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/train_sweep.sh configs/ham10000.yaml ham10000 0.1 1.0
"${PYTHON:-.venv/bin/python}" -m bench.search_quality runs/ham10000-*pct --config configs/ham10000.yaml \
  --untrained runs/ham10000-s5cl-10pct --out docs/results/ham10000-retrieval
