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


def cuda_options() -> dict[str, str]:
    """cuDNN picks convolution algorithms by its heuristics instead of onnxruntime's default exhaustive
    search, which runs again for every new input shape (a batching server sees many). On an H100 the
    service was as fast or faster this way in every cell measured (docs/benchmarks-gpu.md; the
    difference is within the run-to-run spread). MEDCL_CUDNN_CONV_ALGO_SEARCH=EXHAUSTIVE or DEFAULT
    chooses otherwise."""
    import os

    return {"cudnn_conv_algo_search": os.environ.get("MEDCL_CUDNN_CONV_ALGO_SEARCH", "HEURISTIC").upper()}


def providers_for(package_dir: Path, available: list[str]) -> list:
    """TensorRT -> CUDA -> CPU, restricted to what this onnxruntime build offers."""
    chosen: list = []
    for p in PROVIDER_PREFERENCE:
        if p in available:
            if p == TRT_PROVIDER:
                chosen.append((p, tensorrt_options(package_dir)))
            elif p == "CUDAExecutionProvider":
                chosen.append((p, cuda_options()))
            else:
                chosen.append(p)
    return chosen
