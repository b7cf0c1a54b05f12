"""TensorRT engines through onnxruntime's TensorRT execution provider, cached inside the package.

The engine is built by running the package once with the TensorRT provider and its engine cache
switched on (``PKG/trt_cache/``), so the service's first request does not pay the build. It is
checked against the fp32 CPU graph on held-out images. Where onnxruntime has no TensorRT provider
(no GPU, or the CPU build of onnxruntime), nothing is built and the reason is reported; only
``mode="require"`` turns that into an error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np

from medcl.card import Card
from medcl.errors import MedclError
from medcl.preprocess import normalise
from medcl.runtime import TRT_CACHE_DIR, TRT_PROVIDER, tensorrt_options


class TensorRTUnavailable(MedclError, RuntimeError):
    """TensorRT was demanded but cannot run here."""


def build_engine(package_dir: Path, card: Card, held_out: np.ndarray,
                 mode: Literal["auto", "require"] = "auto") -> dict:
    """Build and check the engine; returns figures for the card, or why nothing was built."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if TRT_PROVIDER not in available:
        reason = f"onnxruntime offers no TensorRT provider here (available: {', '.join(available)})"
        if mode == "require":
            raise TensorRTUnavailable(f"TensorRT was required but {reason}")
        return {"built": False, "reason": reason}
    x = normalise(held_out, card.preprocess)
    model = str(package_dir / "model.onnx")
    (package_dir / TRT_CACHE_DIR).mkdir(exist_ok=True)
    start = time.perf_counter()
    trt = ort.InferenceSession(model, providers=[(TRT_PROVIDER, tensorrt_options(package_dir)),
                                                 "CUDAExecutionProvider", "CPUExecutionProvider"])
    if trt.get_providers()[0] != TRT_PROVIDER:  # onnxruntime-gpu can fall back silently
        reason = f"the TensorRT provider did not load (session runs on {trt.get_providers()[0]})"
        if mode == "require":
            raise TensorRTUnavailable(reason)
        return {"built": False, "reason": reason}
    got = trt.run(["logits"], {"image": x})[0]
    build_seconds = time.perf_counter() - start
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    return {"built": True, "cache": TRT_CACHE_DIR, "fp16": True, "build_seconds": round(build_seconds, 1),
            "top1_agreement_with_fp32": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff_logits_vs_fp32": float(np.abs(got - ref).max()), "images": int(len(x))}
