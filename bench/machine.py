"""What the machine can do and what a model costs: the yardsticks every speed figure is divided by.

- ``gemm_peak_gflops``: float32 matrix multiply, measured now on all cores (the best of numpy's BLAS
  and torch), the ceiling for convolution networks on a CPU.
- ``model_gflops``: floating-point operations of one forward pass, counted by torch's own
  ``FlopCounterMode`` (convolutions and matrix multiplies; element-wise work is not counted, so the
  floor it gives is a lower bound on time).
- ``tree_rss_mb``: resident memory of a server and all its worker processes.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np


def gemm_peak_gflops(n: int = 2048, seconds: float = 3.0) -> dict[str, float]:
    """Best sustained float32 GEMM rate, GFLOP/s, of numpy and torch (each gets ``seconds``)."""
    rates = {}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    rates["numpy"] = _rate(lambda: a @ b, 2 * n**3, seconds)
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates["torch"] = _rate(lambda: torch.mm(ta, tb), 2 * n**3, seconds)
    except ImportError:
        pass
    return {**{k: round(v, 1) for k, v in rates.items()}, "peak": round(max(rates.values()), 1)}


def _rate(step, flop: float, seconds: float) -> float:
    step()  # warm-up: thread pools, page faults
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        step()
        best = max(best, flop / (time.perf_counter() - t0) / 1e9)
    return best


def model_gflops(module, input_shape: tuple[int, ...]) -> float:
    """GFLOP of one forward pass of ``module`` on one input of ``input_shape`` (C, H, W)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(torch.zeros((1, *input_shape)))
    return counter.get_total_flops() / 1e9


def machine_description() -> dict:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()}


def tree_rss_mb(root: int) -> float:
    """RSS of a process and all its descendants (BentoML's and TorchServe's workers are children)."""
    parents: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024
