#!/usr/bin/env bash
# Cross-entropy vs S5CL on BloodMNIST at 1% and 10% of the labels (one seed), then the table.
#   bash scripts/low_label_evidence.sh        (about 20 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
MEDCL=${MEDCL:-.venv/bin/medcl}
for frac in 0.01 0.1; do
  pct=$(python3 -c "print(int(float('$frac')*100))")
  for method in cross_entropy s5cl; do
    "$MEDCL" train configs/bloodmnist.yaml --quiet --set method.name=$method --set data.label_fraction=$frac \
      --set name=bloodmnist-$method-${pct}pct
  done
done
"${PYTHON:-.venv/bin/python}" scripts/low_label_table.py runs/bloodmnist-*pct --out docs/results/bloodmnist-low-label
