#!/usr/bin/env bash
# Train cross-entropy and S5CL on CONFIG at each label fraction, one run each, named PREFIX-METHOD-Npct.
#   bash scripts/train_sweep.sh CONFIG PREFIX FRACTION...
set -euo pipefail
cd "$(dirname "$0")/.."
MEDCL=${MEDCL:-.venv/bin/medcl}
config=$1 prefix=$2
shift 2
for frac in "$@"; do
  pct=$(python3 -c "print(int(float('$frac')*100))")
  for method in cross_entropy s5cl; do
    "$MEDCL" train "$config" --quiet --set method.name=$method --set data.label_fraction=$frac \
      --set name=$prefix-$method-${pct}pct
  done
done
