#!/usr/bin/env bash
# Cross-entropy vs S5CL on BloodMNIST at 1% and 10% of the labels (one seed), then the table.
#   bash scripts/low_label_evidence.sh        (about 20 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/train_sweep.sh configs/bloodmnist.yaml bloodmnist 0.01 0.1
"${PYTHON:-.venv/bin/python}" scripts/low_label_table.py runs/bloodmnist-*pct --out docs/results/bloodmnist-low-label
