"""onnxruntime execution providers, shared by export (engine builds) and the service (sessions)."""

from __future__ import annotations

from pathlib import Path

TRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_PREFERENCE = (TRT_PROVIDER, "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_LABEL = {TRT_PROVIDER: "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}
TRT_CACHE_DIR = "trt_cache"


def tensorrt_options(package_dir: Path, fp16: bool = True) -> dict[str, str | bool]:
    """One engine cache per package, so an engine built at export is reused by the service."""
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(Path(package_dir) / TRT_CACHE_DIR),
            "trt_fp16_enable": fp16}


def providers_for(package_dir: Path, available: list[str]) -> list:
    """TensorRT -> CUDA -> CPU, restricted to what this onnxruntime build offers."""
    chosen: list = []
    for p in PROVIDER_PREFERENCE:
        if p in available:
            chosen.append((p, tensorrt_options(package_dir)) if p == TRT_PROVIDER else p)
    return chosen
