"""Reduced-precision variants of a package: fp16 and static int8, each gated against fp32.

Both are measured on real held-out images against the fp32 graph (top-1 agreement, change in
accuracy and macro-F1) and timed on this CPU. An int8 model that loses more than ``max_drop``
(default 1 point) of accuracy or macro-F1 is not written; the refusal and its figures are kept. int8 uses static QDQ quantisation with a
calibration set drawn from the *training* images, never from the held-out ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from medcl.card import Card
from medcl.errors import MedclError
from medcl.preprocess import normalise

VARIANT_FILES = {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _logits(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def images_per_second(session, x: np.ndarray, batch: int = 32, repeats: int = 5) -> float:
    """Median throughput at a fixed batch size after one warm-up run."""
    chunk = x[:batch] if len(x) >= batch else np.resize(x, (batch,) + x.shape[1:])
    session.run(["logits"], {"image": chunk})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(["logits"], {"image": chunk})
        times.append(time.perf_counter() - t)
    return float(batch / np.median(times))


def make_fp16(fp32_path: Path, out_path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: clients keep sending float32 and reading float32.
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))


def make_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i:i + 32] for i in range(0, len(calibration), 32)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    prepared = out_path.with_name("model.int8-prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)


def build_variants(package_dir: Path, card: Card, held_out: np.ndarray, held_out_labels: np.ndarray,
                   calibration: np.ndarray, variants: list[str], max_drop: float = 0.01) -> dict:
    """Write the requested variants into ``package_dir`` and return their measured figures.

    ``held_out`` and ``calibration`` are uint8 model pixels; the first is scored, the second only
    calibrates int8 activation ranges.
    """
    from sklearn.metrics import accuracy_score, f1_score

    unknown = sorted(set(variants) - set(VARIANT_FILES))
    if unknown:
        raise MedclError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANT_FILES)}")
    x = normalise(held_out, card.preprocess)
    fp32 = _session(package_dir / "model.onnx")
    ref = _logits(fp32, x)
    labels = list(range(card.num_classes))

    def task_metrics(logits: np.ndarray) -> tuple[float, float]:
        pred = logits.argmax(1)
        return (float(accuracy_score(held_out_labels, pred)),
                float(f1_score(held_out_labels, pred, labels=labels, average="macro", zero_division=0)))

    ref_acc, ref_f1 = task_metrics(ref)
    report: dict = {"fp32": {"file": "model.onnx", "accuracy": ref_acc, "macro_f1": ref_f1,
                             "images_per_second_b32": images_per_second(fp32, x), "held_out_images": int(len(x))}}
    for name in variants:
        path = package_dir / VARIANT_FILES[name]
        if name == "fp16":
            make_fp16(package_dir / "model.onnx", path)
        else:
            make_int8(package_dir / "model.onnx", path, normalise(calibration, card.preprocess))
        session = _session(path)
        logits = _logits(session, x)
        acc, f1 = task_metrics(logits)
        figures = {
            "file": path.name,
            "top1_agreement_with_fp32": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff_logits_vs_fp32": float(np.abs(logits - ref).max()),
            "accuracy": acc, "macro_f1": f1,
            "accuracy_change": acc - ref_acc, "macro_f1_change": f1 - ref_f1,
            "images_per_second_b32": images_per_second(session, x),
        }
        if name == "int8":
            figures["calibration_images"] = int(len(calibration))
        if name == "int8" and (ref_acc - acc > max_drop or ref_f1 - f1 > max_drop):
            path.unlink()
            figures["written"] = False
            figures["refused_because"] = (f"loses {100 * (ref_acc - acc):.2f} points of accuracy and "
                                          f"{100 * (ref_f1 - f1):.2f} of macro-F1; the gate allows {100 * max_drop:.1f}")
            figures.pop("file")
        else:
            figures["written"] = True
        report[name] = figures
    return report
