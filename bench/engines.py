"""In-process engines on prepared tensors: raw onnxruntime on the package, PyTorch eager on the checkpoint.

These are the ceilings the servers are compared with: no HTTP, no decoding, the model's own input
tensor ready in memory. "Concurrency N" for an in-process engine means a batch of N images per call
(what a perfect server would make of N waiting requests); latency is per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def time_calls(call: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float,
               min_calls: int = 5) -> dict:
    """Call ``call(batch)`` repeatedly for ``seconds`` (at least ``min_calls`` times) after one warm-up."""
    call(batch)
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < min_calls:
        t0 = time.perf_counter()
        call(batch)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return summarise_latencies(latencies, images=len(latencies) * len(batch), requests=len(latencies), elapsed=elapsed)


def summarise_latencies(latencies: list[float], images: int, requests: int, elapsed: float) -> dict:
    ms = np.asarray(latencies) * 1000 if latencies else np.array([np.nan])
    return {"images_per_s": round(images / elapsed, 2), "requests_per_s": round(requests / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": requests, "seconds": round(elapsed, 1)}


def onnxruntime_call(package_dir: Path, output: str = "logits") -> tuple[Callable[[np.ndarray], object], str]:
    """The package's model in a session set up exactly as the service sets it up; (call, provider)."""
    from service.package import ModelPackage

    package = ModelPackage(package_dir)
    return (lambda batch: package.run(batch, output)), package.provider


def torch_eager_call(run_dir: Path, threads: int | None = None) -> Callable[[np.ndarray], object]:
    """The run's checkpoint in PyTorch eager mode, inference only (no autograd)."""
    import os

    import torch

    from training.engine import load_trained

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, _ = load_trained(run_dir)

    def call(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    return call
