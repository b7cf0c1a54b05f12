"""`medcl bench-gpu`: the same models and images as `medcl bench`, on a GPU.

For the demo classifier (its own input size) and the ResNet-18 at 224x224, in one run:
- onnxruntime with the CUDA provider on the package's fp32 graph and on its fp16 variant (the graph
  converted by export/variants.py, float32 in and out), onnxruntime's TensorRT provider in fp32 and
  fp16 where this onnxruntime build can load TensorRT (else the reason is recorded), PyTorch eager on
  the checkpoint in float32 and float16, and onnxruntime on the machine's CPU cores for scale;
  each at batch 1, 8, 32 and 256 (a batch of N stands for N waiting requests, as in `medcl bench`),
  images/s and p50/p95/p99 per call. Every call starts from the float32 array in host memory and
  ends with the logits back in host memory: the copies a server pays are inside the figures.
- the agreement of every engine with float32 on the CPU, on the real images: top-1 agreement and
  the largest logit difference (fp16 must not change the answers);
- the BentoML service end to end over HTTP with the package on the CUDA provider, single-image and
  8-tile requests at concurrency 1, 8 and 32, with the default batch runners (one per core) and with
  two runners (bigger batches) for comparison.
The device's name, driver and measured matrix-multiply rates (fp32, tf32, fp16) are recorded with
the figures. Results: OUT.json and OUT.md (docs/benchmarks-gpu.*).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.engines import time_calls
from medcl.runtime import tensorrt_options
from bench.http_load import run_closed_loop
from bench.speed import (REPO, BenchOptions, classify_requests, demo_images, log, model_tensors, prepare_subject,
                         tissue_images)

BATCHES = (1, 8, 32, 256)
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"


# --- the device ------------------------------------------------------------------------------------

def device_description() -> dict:
    import onnxruntime as ort
    import torch

    out: dict = {"torch": torch.__version__, "onnxruntime": ort.__version__,
                 "onnxruntime_providers": ort.get_available_providers(), "cpu_cores": os.cpu_count()}
    if not torch.cuda.is_available():
        return {**out, "gpu": None}
    props = torch.cuda.get_device_properties(0)
    out.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count, "compute_capability": f"{props.major}.{props.minor}",
                "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        out["nvidia_smi"] = smi
    except (OSError, subprocess.SubprocessError) as exc:
        out["nvidia_smi"] = f"unavailable: {exc}"
    return out


def matmul_tflops(n: int = 8192, repeats: int = 10) -> dict[str, float]:
    """Measured matrix-multiply rates on random data (median of ``repeats`` after warm-up), TFLOP/s:
    the ceilings the models' FLOPs are divided by."""
    import torch

    rates = {}
    for label, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                               ("fp16", torch.float16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        rates[label] = round(2 * n**3 / float(np.median(times)) / 1e12, 1)
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
    return rates


# --- the engines -------------------------------------------------------------------------------------

def ort_engine(model_path: Path, provider: str, work: Path, fp16: bool = False
               ) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    """A session on ``provider`` (CUDA or TensorRT, else the CPU cores); (call, what runs) or
    (None, why not). A session that silently fell back to another provider counts as not run."""
    import onnxruntime as ort

    if provider != CPU and provider not in ort.get_available_providers():
        return None, f"this onnxruntime build has no {provider} (has: {', '.join(ort.get_available_providers())})"
    if provider == TRT:
        providers: list = [(TRT, tensorrt_options(work, fp16)), CUDA, CPU]  # the engine cache in work/
    elif provider == CUDA:
        providers = [CUDA, CPU]
    else:
        providers = [CPU]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot load is a finding, not a crash
        return None, f"{provider} session failed: {str(exc).splitlines()[0][:300]}"
    active = session.get_providers()[0]
    if active != provider:
        return None, f"{provider} did not load (the session fell back to {active})"
    return (lambda batch: session.run(["logits"], {"image": batch})[0]), active


def torch_engine(run_dir: Path, half: bool) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    """PyTorch eager on the GPU, float32 or float16 weights and activations; the call includes the
    host-to-device copy of the input and the copy of the logits back."""
    import torch

    from training.engine import load_trained

    if not torch.cuda.is_available():
        return None, "PyTorch sees no CUDA device"
    model, _ = load_trained(run_dir)
    dtype = torch.float16 if half else torch.float32
    model = model.to("cuda", dtype).eval()

    def call(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to("cuda", non_blocking=False).to(dtype)
            return model(x)[0].float().cpu().numpy()

    return call, f"PyTorch {torch.__version__} eager, cuDNN {torch.backends.cudnn.version()}"


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    return {"top1_agreement": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 4),
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "relative_l2": float(np.linalg.norm(logits - reference) / max(np.linalg.norm(reference), 1e-12))}


def run_in_batches(call: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([call(x[i:i + batch]) for i in range(0, len(x), batch)])


def bench_engines(subject, work: Path, seconds: float, batches: tuple[int, ...]) -> dict:
    from export.variants import make_fp16

    tensors, preprocess_ms = model_tensors(subject, max(batches))
    fp32 = subject.package_dir / "model.onnx"
    fp16 = work / f"{subject.key}.fp16.onnx"
    make_fp16(fp32, fp16)
    engines = {
        "onnxruntime CPU fp32": lambda: ort_engine(fp32, CPU, work),
        "onnxruntime CUDA fp32": lambda: ort_engine(fp32, CUDA, work),
        "onnxruntime CUDA fp16": lambda: ort_engine(fp16, CUDA, work),
        "onnxruntime TensorRT fp32": lambda: ort_engine(fp32, TRT, work, fp16=False),
        "onnxruntime TensorRT fp16": lambda: ort_engine(fp32, TRT, work, fp16=True),
        "PyTorch eager CUDA fp32": lambda: torch_engine(subject.run_dir, half=False),
        "PyTorch eager CUDA fp16": lambda: torch_engine(subject.run_dir, half=True),
    }
    reference = None
    rows, skipped, accuracy = [], {}, {}
    for name, make in engines.items():
        call, what = make()
        if call is None:
            skipped[name] = what
            log(f"{subject.key}: {name} skipped: {what}")
            continue
        logits = run_in_batches(call, tensors)
        if reference is None:  # the first engine is the CPU fp32 reference
            reference = logits
        accuracy[name] = agreement(logits, reference)
        for b in batches:
            cell = time_calls(call, tensors[:b], seconds)
            rows.append({"model": subject.key, "engine": name, "runs_on": what, "batch": b, **cell})
            log(json.dumps(rows[-1]))
    return {"input_size": subject.input_size, "gflop_per_image": round(subject.gflop, 4),
            "decode_and_preprocess_ms_per_image_cpu": round(preprocess_ms, 3), "rows": rows,
            "skipped": skipped, "agreement_with_cpu_fp32": accuracy, "images": len(tensors)}


def bench_service(subject, work: Path, seconds: float, tiles: int = 8, workers: tuple[int, ...] = (1,),
                  concurrency: tuple[int, ...] = (1, 8, 32)) -> dict:
    """The service over HTTP with the package on the GPU: the default batch runners (one per core), then two
    (bigger batches, one on the device while the next gathers); each with every API process count in
    ``workers`` (MEDCL_WORKERS)."""
    from bench.servers import bentoml_service

    singles, tiled = classify_requests(subject.images, tiles)
    rows = []
    search = os.environ.get("MEDCL_CUDNN_CONV_ALGO_SEARCH", "HEURISTIC")
    setups = [(f"{w} API process{'es' if w > 1 else ''}, {rule}", {**env, "MEDCL_WORKERS": str(w)})
              for w in workers
              for rule, env in ((f"one batch runner per core (default), cuDNN {search}", {}),
                                (f"2 batch runners, cuDNN {search}", {"MEDCL_BATCH_WORKERS": "2"}))]
    for rule, env in setups:
        with bentoml_service(subject.package_dir, work / f"serve-{subject.key}-{len(rows)}", **env) as server:
            provider = _served_provider(server)
            for kind, requests in (("1 image", singles), (f"{tiles} tiles", tiled)):
                for c in concurrency:
                    cell = run_closed_loop(f"{server.url}/classify", requests, c, seconds, server.headers)
                    rows.append({"model": subject.key, "batch_runners": rule, "provider": provider,
                                 "request": kind, "concurrency": c, **cell})
                    log(json.dumps(rows[-1]))
    return {"rows": rows}


def _served_provider(server) -> str:
    import httpx

    models = httpx.get(f"{server.url}/models", headers=server.headers, timeout=10).json()
    entries = models.get("models", models) if isinstance(models, dict) else models
    return ", ".join(sorted({str(m.get("provider")) for m in entries if isinstance(m, dict)})) or "unknown"


def run_gpu_bench(run: Path, run_224: Path | None, out: Path, seconds: float, service_seconds: float,
                  batches: tuple[int, ...] = BATCHES, service: bool = True, engines: bool = True,
                  command: str = "medcl bench-gpu", workers: tuple[int, ...] = (1,),
                  concurrency: tuple[int, ...] = (1, 8, 32)) -> dict:
    from bench.speed import bench_224_run

    result: dict = {"device": device_description(), "command": command}
    if result["device"].get("gpu"):
        result["matmul_tflops"] = matmul_tflops()
        log(f"matmul: {result['matmul_tflops']}")
    run_224 = run_224 or bench_224_run()
    options = BenchOptions(run=run, run_224=run_224)
    result["models"] = {}
    with tempfile.TemporaryDirectory(prefix="medcl-bench-gpu-") as tmp:
        work = Path(tmp)
        for key, run_dir, read_images, parity in (("demo", run, demo_images, REPO / "demo" / "bloodmnist-demo.npz"),
                                                  ("224", run_224, tissue_images, REPO / "demo" / "he-tiles")):
            images, described = read_images()
            subject = prepare_subject(key, run_dir, images, work, options, parity)
            log(f"model {key}: {subject.gflop:.3f} GFLOP per image")
            entry = {"images_described": described, "input_size": subject.input_size,
                     "gflop_per_image": round(subject.gflop, 4)}
            if engines:
                entry.update(bench_engines(subject, work, seconds, batches))
            if service:
                try:
                    entry["service"] = bench_service(subject, work, service_seconds, workers=workers,
                                                     concurrency=concurrency)
                except Exception as exc:  # noqa: BLE001 - record why, keep the engine figures
                    entry["service"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    log(f"service on {key} failed: {exc}")
            result["models"][key] = entry
            out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    return result


def command_line(args: argparse.Namespace) -> str:
    """The `medcl bench-gpu` command that runs these options (written beside the results)."""
    flags = ["medcl bench-gpu"]
    for name, default in (("run", None), ("run_224", None), ("seconds", 2.0), ("service_seconds", 4.0), ("out", None)):
        value = getattr(args, name)
        if value is not None and value != default and not (name == "out" and str(value) == "docs/benchmarks-gpu"):
            flags.append(f"--{name.replace('_', '-')} {value}")
    flags += [flag for flag, on in (("--no-service", args.no_service), ("--no-engines", args.no_engines)) if on]
    for name, default in (("workers", [1]), ("concurrency", [1, 8, 32])):
        if list(getattr(args, name, default)) != default:
            flags.append(f"--{name} " + " ".join(map(str, getattr(args, name))))
    return " ".join(flags)


def run_from_arguments(args: argparse.Namespace) -> dict:
    """What `medcl bench-gpu` runs (its options are defined in medcl/cli.py)."""
    from bench.gpu_report import write_gpu_report
    from bench.speed import demo_run

    run = args.run or demo_run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run_gpu_bench(run, args.run_224, args.out, args.seconds, args.service_seconds,
                           service=not args.no_service, engines=not args.no_engines, command=command_line(args),
                           workers=tuple(args.workers), concurrency=tuple(args.concurrency))
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_gpu_report(result, args.out.with_suffix(".md"))
    log(f"wrote {args.out}.json and {args.out}.md in {result['seconds']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    from medcl.cli import main as cli_main

    return cli_main(["bench-gpu", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
