"""Render docs/export.md from the JSON that `medcl export --variants fp16,int8` prints.

    medcl export .medcl/runs/demo-bloodmnist --out .medcl/packages/demo-bloodmnist-variants \
        --variants fp16,int8 > docs/results/demo-export-variants.json
    python scripts/render_export_doc.py docs/results/demo-export-variants.json --out docs/export.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_json", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/export.md"))
    args = ap.parse_args()
    d = json.loads(args.export_json.read_text())
    v, p = d["variants"], d["parity"]
    rows = []
    for name in ("fp32", "fp16", "int8"):
        if name not in v:
            continue
        f = v[name]
        status = "" if f.get("written", True) else " (refused: " + f["refused_because"] + ")"
        rows.append(f"| {name}{status} | {f.get('file', '—')} | {f.get('top1_agreement_with_fp32', 1.0):.4f} | "
                    f"{f['accuracy']:.4f} | {f['macro_f1']:.4f} | {100 * f.get('accuracy_change', 0):+.2f} | "
                    f"{100 * f.get('macro_f1_change', 0):+.2f} | {f['images_per_second_b32']:.0f} |")
    calib = v.get("int8", {}).get("calibration_images", "?")
    args.out.write_text(f"""# Export: the demo model as fp32, fp16 and int8 ONNX

Commands (the raw output is [results/{args.export_json.name}](results/{args.export_json.name})):

    medcl export .medcl/runs/demo-bloodmnist --out .medcl/packages/demo-bloodmnist-variants --variants fp16,int8 \\
        > docs/results/{args.export_json.name}
    python scripts/render_export_doc.py docs/results/{args.export_json.name} --out docs/export.md

Parity of fp32 ONNX with PyTorch on {p['images']} held-out images: max |Δ logits| {p['max_abs_diff_logits']:.2e},
max |Δ embedding| {p['max_abs_diff_embedding']:.2e}, batch-1 max |Δ logits| {p['max_abs_diff_logits_batch1']:.2e},
top-1 agreement {p['top1_agreement']:.3f} (gate: {p['tolerance']:g}).

Variants, scored on the {v['fp32']['held_out_images']} held-out images of the demo's test split. Speed is onnxruntime on
the CPU provider, batch 32 at 28 px, the median of 5 runs, on this 2-core machine (AVX2, no VNNI):

| variant | file | top-1 agreement with fp32 | accuracy | macro-F1 | Δ accuracy (points) | Δ macro-F1 (points) | images/s |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

int8 is static QDQ quantisation (per-channel weights, MinMax calibration on {calib} training images)
and is written only if it loses at most 1 point of accuracy and of macro-F1 (`--max-int8-drop`). On
this CPU it brings no speed. That matches the stack notes (no VNNI), though it may pay on servers
with VNNI or AMX. fp16 keeps float32 inputs and outputs; on the CPU it is mainly a smaller file. Its
speed-up is a GPU matter, not yet measured (no GPU was lent to this task).
""")


if __name__ == "__main__":
    main()
