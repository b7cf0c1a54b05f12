#!/usr/bin/env bash
# Cross-entropy vs S5CL encoders on HAM10000 (split by lesion) at 10% and 100% of the training labels,
# then held-out-lesion retrieval through the case index.
#   bash scripts/ham_retrieval_evidence.sh        (about 30 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
MEDCL=${MEDCL:-.venv/bin/medcl}
for frac in 0.1 1.0; do
  pct=$(python3 -c "print(int(float('$frac')*100))")
  for method in cross_entropy s5cl; do
    "$MEDCL" train configs/ham10000.yaml --quiet --set method.name=$method --set data.label_fraction=$frac \
      --set name=ham10000-$method-${pct}pct
  done
done
"${PYTHON:-.venv/bin/python}" -m bench.search_quality runs/ham10000-*pct --config configs/ham10000.yaml \
  --untrained runs/ham10000-s5cl-10pct --out docs/results/ham10000-retrieval
