#!/usr/bin/env bash
# Every nuclei-segmentation result in docs/segmentation.md, from training to the result pages.
# Development images (configs/splits/monuseg-dev.txt) choose; MoNuSeg test and DSB 2018 only report.
# About 2.5 hours on 2 cores (each training run 5-12 minutes; the more-data runs up to 27). Needs ../shared/data.
#   scripts/segmentation_evidence.sh            # train what is missing, then score
set -euo pipefail
cd "$(dirname "$0")/.."
MEDCL=${MEDCL:-.venv/bin/medcl}
PY=${PY:-.venv/bin/python}
train() {  # config name seed
  [ -f "runs/$2/card.json" ] || "$MEDCL" train "$1" --quiet --set name="$2" --set seed="$3"
}
for s in 0 1 2; do
  sfx=$([ "$s" = 0 ] && echo "" || echo "-s$s")
  train configs/nuclei-dev/patch-contrast-stain-refined.yaml "nuclei-dev-stain-refined$sfx" "$s"
  [ -f "runs/demo-stain$sfx/card.json" ] || "$MEDCL" train configs/demo-nuclei.yaml --quiet \
      --set output_dir="$PWD/runs" --set name="demo-stain$sfx" --set seed="$s"
done
train configs/nuclei-dev/unet.yaml nuclei-dev-unet 0
for s in 0 1 2; do  # the more-unlabelled-data lever (development images only)
  sfx=$([ "$s" = 0 ] && echo "" || echo "-s$s")
  train configs/nuclei-dev/patch-contrast-stain-refined-more.yaml "nuclei-dev-stain-refined-more$sfx" "$s"
done

DEV_RUNS="runs/nuclei-dev-stain-refined runs/nuclei-dev-stain-refined-s1 runs/nuclei-dev-stain-refined-s2
  runs/nuclei-dev-unet"
DEMO_RUNS="runs/demo-stain runs/demo-stain-s1 runs/demo-stain-s2"
MONUSEG=../shared/data/monuseg
# development images: where every choice was made
$PY -m bench.segmentation_quality $DEV_RUNS --data $MONUSEG/train --names configs/splits/monuseg-dev.txt \
    --dataset monuseg-dev --out docs/results/monuseg-dev-segmentation
$PY -m bench.segmentation_quality $DEMO_RUNS --data $MONUSEG/train --names configs/splits/monuseg-dev.txt \
    --dataset monuseg-dev --out docs/results/demo-nuclei-on-monuseg-dev
$PY -m bench.segmentation_quality runs/nuclei-dev-stain-refined-more runs/nuclei-dev-stain-refined-more-s1 \
    runs/nuclei-dev-stain-refined-more-s2 --data $MONUSEG/train --names configs/splits/monuseg-dev.txt \
    --dataset monuseg-dev --out docs/results/monuseg-dev-more-data
$PY -m bench.segmentation_levers runs/demo-stain runs/nuclei-dev-stain-refined runs/nuclei-dev-stain-refined-s1 \
    runs/nuclei-dev-stain-refined-s2 --out docs/results/monuseg-dev-levers
# held out, reported only; summary.json's monuseg rows are all re-measured here
$PY -c "import json; p='docs/results/summary.json'; s=json.load(open(p)); s['monuseg']={}; json.dump(s, open(p, 'w'), indent=2, sort_keys=True)"
$PY -m bench.segmentation_quality $DEV_RUNS --out docs/results/monuseg-segmentation \
    --summary docs/results/summary.json
$PY -m bench.segmentation_quality $DEMO_RUNS --out docs/results/demo-nuclei-on-monuseg
for m in brightfield fluorescence; do
  $PY -m bench.segmentation_quality $DEV_RUNS --data ../shared/data/nuclei-dsb2018 --dataset "dsb2018-$m" \
      --modality "$m" --out "docs/results/dsb2018-$m-segmentation"
  $PY -m bench.segmentation_quality $DEMO_RUNS --data ../shared/data/nuclei-dsb2018 --dataset "dsb2018-$m" \
      --modality "$m" --out "docs/results/demo-nuclei-on-dsb2018-$m"
done
$PY -m bench.scale_estimate --out docs/results/scale-estimate
