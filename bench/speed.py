"""`medcl bench`: every way of running a model, side by side, in one run on the same models and images.

For each model (the demo classifier at its own input size, and a ResNet-18 at 224x224):
- raw onnxruntime on the exported package and PyTorch eager on the checkpoint, in process, on
  prepared tensors (batch N stands for concurrency N);
- the BentoML service end to end over HTTP (``medcl serve``, API keys on, as users run it), with
  single-image requests and batch-of-tiles requests;
- TorchServe serving the same model.onnx through the ``.mar`` export (same preprocessing code);
each at concurrency 1, 8 and 32, as images/s, requests/s, p50/p95/p99 latency, and as a fraction
of the machine's compute limit (GEMM peak / the model's FLOPs per image); server memory at the end.
Then nuclei segmentation per megapixel (bench/segment_speed.py) and the case index
(bench/search_speed.py). Results: OUT.json, OUT.png and the generated part of OUT.md.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from bench.engines import onnxruntime_call, time_calls, torch_eager_call
from bench.http_load import Request, multipart_images, raw_image, run_closed_loop
from bench.machine import gemm_peak_gflops, machine_description, model_gflops, tree_rss_mb

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDCL_SHARED_DATA", REPO.parent / "shared" / "data"))
BENCH_224_CONFIG = REPO / "configs" / "bench-resnet18-224.yaml"
SECTIONS = ("demo", "224", "segment", "search")


class BenchOptions(BaseModel):
    """What `medcl bench` runs; every field is a CLI flag."""

    run: Path | None = None  # the demo classifier's run (default: the demo's, trained if missing)
    run_224: Path | None = None  # the 224 px model's run (default: configs/bench-resnet18-224.yaml, trained once)
    segmenter_run: Path | None = None  # default: the demo segmenter's run
    seconds: float = Field(8.0, gt=0)
    concurrency: list[int] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    tiles: int = Field(8, ge=2, le=256)  # images per batch-of-tiles request
    sections: list[str] = Field(default_factory=lambda: list(SECTIONS))
    search_size: int = Field(100_000, ge=1000)
    out: Path = Path("docs/benchmarks")
    torchserve_batch: int = Field(32, ge=1)
    torchserve_delay_ms: int = Field(5, ge=0)

    def command(self) -> str:
        """The `medcl bench` command line that runs these options (written under the results)."""
        defaults = BenchOptions()
        flags = ["medcl bench"]
        for name in ("run", "run_224", "segmenter_run", "seconds", "tiles", "search_size", "out"):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                flags.append(f"--{name.replace('_', '-')} {value}")
        if self.concurrency != defaults.concurrency:
            flags.append("--concurrency " + " ".join(map(str, self.concurrency)))
        if self.sections != defaults.sections:
            flags.append("--only " + " ".join(self.sections))
        return " ".join(flags)


@dataclass
class Subject:
    """One model under test, in every form the systems need."""

    key: str
    run_dir: Path
    package_dir: Path
    mar: Path | None
    images: list[tuple[str, bytes]]  # real images, as files a client would send
    input_size: int
    gflop: float


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the models and images ----------------------------------------------------------------------

def demo_images(limit: int = 64) -> tuple[list[tuple[str, bytes]], str]:
    photos = sorted((SHARED / "blood-photos").rglob("*.jpg"))
    if photos:
        return [(p.name, p.read_bytes()) for p in photos[::max(1, len(photos) // limit)][:limit]], \
            "real blood-cell photographs (../shared/data/blood-photos, ~360x363 JPEG)"
    from PIL import Image

    with np.load(REPO / "demo" / "bloodmnist-demo.npz") as archive:
        tiles = archive["test_images"][:limit]
    out = []
    for i, t in enumerate(tiles):
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, format="PNG")
        out.append((f"tile{i}.png", buf.getvalue()))
    return out, "BloodMNIST demo tiles (28x28 PNG; ../shared/data/blood-photos absent)"


def tissue_images() -> tuple[list[tuple[str, bytes]], str]:
    tiles = sorted((REPO / "demo" / "he-tiles").glob("*.png"))
    return [(p.name, p.read_bytes()) for p in tiles], "the 32 H&E tiles in demo/he-tiles (224x224 PNG, CC BY)"


def default_runs(options: BenchOptions) -> tuple[Path, Path]:
    """The demo classifier's run and the 224 px model's run, trained here if they do not exist yet."""
    from medcl.demo import medcl_home, prepare_demo

    run = options.run
    if run is None:
        run = medcl_home() / "runs" / "demo-bloodmnist"
        if not (run / "card.json").is_file():
            log("training the demo classifier first (as `make serve` does)")
            prepare_demo()
    run_224 = options.run_224
    if run_224 is None:
        from training.config import load_config
        from training.engine import train

        config = load_config(BENCH_224_CONFIG, {"output_dir": str(medcl_home() / "bench" / "runs")})
        run_224 = Path(config.output_dir) / config.name
        if not (run_224 / "card.json").is_file():
            log(f"training {config.name} ({config.schedule.steps} steps; speed only)")
            train(config, progress=False)
    return run, run_224


def prepare_subject(key: str, run_dir: Path, images: list[tuple[str, bytes]], work: Path,
                    options: BenchOptions) -> Subject:
    """Export the run (parity-checked, as users do) and archive it for TorchServe; count its FLOPs."""
    from bench.servers import torchserve_available
    from export.onnx_export import export_onnx
    from export.torchserve import build_mar
    from training.engine import load_trained

    package = export_onnx(run_dir, work / "packages" / key)
    mar = None
    if torchserve_available() is None:
        mar = build_mar(package, work / "mar" / key, batch_size=options.torchserve_batch,
                        max_batch_delay_ms=options.torchserve_delay_ms)
    model, card = load_trained(run_dir)
    size = card.preprocess.input_size
    return Subject(key, run_dir, package, mar, images, size, model_gflops(model, (3, size, size)))


def model_tensors(subject: Subject, count: int) -> tuple[np.ndarray, float]:
    """The images decoded and preprocessed by the card (what every server does first), as the
    float32 batch the model takes, and the time that took per image in ms."""
    from medcl.card import Card
    from medcl.preprocess import decode_image, normalise, to_model_pixels

    spec = Card.load(subject.package_dir).preprocess
    start = time.perf_counter()
    pixels = [to_model_pixels(decode_image(data), spec) for _, data in subject.images]
    per_image_ms = (time.perf_counter() - start) / len(pixels) * 1000
    batch = normalise(np.stack(pixels), spec)
    reps = -(-count // len(batch))
    return np.ascontiguousarray(np.concatenate([batch] * reps)[:count]), per_image_ms


# --- the systems ----------------------------------------------------------------------------------

def row(subject: Subject, system: str, request: str, concurrency: int, cell: dict, peak: float) -> dict:
    fraction = cell["images_per_s"] * subject.gflop / peak if peak else float("nan")
    return {"model": subject.key, "system": system, "request": request, "concurrency": concurrency, **cell,
            "fraction_of_compute_limit": round(fraction, 4)}


def in_process_rows(subject: Subject, options: BenchOptions, peak: float) -> list[dict]:
    rows = []
    tensors, _ = model_tensors(subject, max(options.concurrency))
    ort_call, provider = onnxruntime_call(subject.package_dir)
    torch_call = torch_eager_call(subject.run_dir)
    for c in options.concurrency:
        rows.append(row(subject, f"onnxruntime ({provider}, in process)", f"batch {c}", c,
                        time_calls(ort_call, tensors[:c], options.seconds), peak))
        log(json.dumps(rows[-1]))
        rows.append(row(subject, "PyTorch eager (in process)", f"batch {c}", c,
                        time_calls(torch_call, tensors[:c], options.seconds), peak))
        log(json.dumps(rows[-1]))
    return rows


def service_rows(subject: Subject, options: BenchOptions, peak: float, work: Path) -> tuple[list[dict], float]:
    from bench.servers import bentoml_service

    singles = [multipart_images([image]) for image in subject.images]
    tiles = [multipart_images([subject.images[(i + k) % len(subject.images)] for k in range(options.tiles)])
             for i in range(0, len(subject.images), options.tiles)]
    rows = []
    with bentoml_service(subject.package_dir, work / f"bentoml-{subject.key}") as server:
        for kind, requests in (("1 image", singles), (f"{options.tiles} tiles", tiles)):
            for c in options.concurrency:
                cell = run_closed_loop(f"{server.url}/classify", requests, c, options.seconds, server.headers)
                rows.append(row(subject, "BentoML service (HTTP)", kind, c, cell, peak))
                log(json.dumps(rows[-1]))
        rss = tree_rss_mb(server.pid)
    return rows, rss


def torchserve_rows(subject: Subject, options: BenchOptions, peak: float, work: Path) -> tuple[list[dict], float]:
    from bench.servers import torchserve

    requests: list[Request] = [raw_image(data) for _, data in subject.images]
    rows = []
    with torchserve(subject.mar, work / f"torchserve-{subject.key}") as server:
        for c in options.concurrency:
            cell = run_closed_loop(server.url, requests, c, options.seconds)
            rows.append(row(subject, "TorchServe (.mar, HTTP)", "1 image", c, cell, peak))
            log(json.dumps(rows[-1]))
        rss = tree_rss_mb(server.pid)
    return rows, rss


def bench_model(subject: Subject, options: BenchOptions, peak: float, work: Path) -> dict:
    from bench.servers import torchserve_available

    _, preprocess_ms = model_tensors(subject, 1)
    rows = in_process_rows(subject, options, peak)
    memory = {"bench process, after in-process engines": round(tree_rss_mb(os.getpid()), 1)}
    service, memory["BentoML service (all processes)"] = service_rows(subject, options, peak, work)
    rows += service
    skipped = torchserve_available()
    if skipped is None:
        served, memory["TorchServe (frontend + worker)"] = torchserve_rows(subject, options, peak, work)
        rows += served
    return {"model": subject.key, "input_size": subject.input_size, "gflop_per_image": round(subject.gflop, 4),
            "compute_limit_images_per_s": round(peak / subject.gflop, 1),
            "decode_and_preprocess_ms_per_image": round(preprocess_ms, 3), "rows": rows,
            "memory_rss_mb_at_end": {k: round(v, 1) for k, v in memory.items()},
            "torchserve_skipped": skipped}


def headline_ratios(models: dict[str, dict]) -> dict:
    """The two figures the issue asks for, read from the rows (None where a side was not measured)."""
    def best(rows, system_prefix):
        values = [r["images_per_s"] for r in rows if r["system"].startswith(system_prefix)]
        return max(values) if values else None

    ratios: dict = {}
    if "224" in models:
        rows = models["224"]["rows"]
        service, raw = best(rows, "BentoML"), best(rows, "onnxruntime")
        ratios["service_over_onnxruntime_224"] = round(service / raw, 3) if service and raw else None
    if "demo" in models:
        rows = models["demo"]["rows"]
        c = max(r["concurrency"] for r in rows)

        def at(system_prefix):
            return next((r for r in rows if r["system"].startswith(system_prefix) and r["request"] == "1 image"
                         and r["concurrency"] == c), None)

        service, served = at("BentoML"), at("TorchServe")
        ratios[f"service_over_torchserve_demo_c{c}"] = (round(service["requests_per_s"] / served["requests_per_s"], 3)
                                                       if service and served else None)
        if service and served:
            ratios[f"p99_ms_demo_c{c}"] = {"service": service["p99_ms"], "torchserve": served["p99_ms"]}
    return ratios


# --- segmentation and search ------------------------------------------------------------------------

def bench_segmentation(options: BenchOptions, peak: float, work: Path) -> dict:
    from bench.segment_speed import flop_floor, http_timings, stage_timings
    from bench.servers import bentoml_service
    from export.onnx_export import export_onnx
    from medcl.demo import medcl_home, prepare_demo_segmenter

    tiles = sorted((SHARED / "monuseg" / "test" / "images").glob("*.png"))
    if not tiles:
        return {"skipped": f"no MoNuSeg tiles at {SHARED / 'monuseg' / 'test' / 'images'} (real data absent)"}
    run = options.segmenter_run
    if run is None:
        run = medcl_home() / "runs" / "demo-nuclei"
        if not (run / "card.json").is_file():
            prepare_demo_segmenter()
    package = export_onnx(run, work / "packages" / "segmenter", parity_data=REPO / "demo" / "he-tiles")
    from PIL import Image

    with Image.open(tiles[0]) as im:
        width, height = im.size
    result = {"tiles": f"{len(tiles)} MoNuSeg test tiles ({width}x{height}, 40x)", "run": str(run),
              "in_process": stage_timings(package, tiles), **flop_floor(run, height, width, peak)}
    with bentoml_service(package, work / "bentoml-segmenter") as server:
        result["http_one_at_a_time"] = http_timings(server.url, server.headers, tiles)
    return result


def bench_search(run: Path, size: int) -> dict:
    from bench.search_speed import embedding_sample, mixture, run_size

    emb, labels, queries = embedding_sample(run, 1000)
    return {"vectors": f"{size:,} from a per-class Gaussian mixture fitted to {run.name}'s embeddings",
            "queries": len(queries), "rows": run_size(mixture(emb, labels, size), queries, milvus=True)}


# --- the whole run ------------------------------------------------------------------------------------

def run_bench(options: BenchOptions) -> dict:
    import onnxruntime

    log("measuring the machine's float32 GEMM peak")
    peak = gemm_peak_gflops()
    result: dict = {"machine": machine_description(), "gemm_gflops": peak,
                    "onnxruntime": onnxruntime.__version__, "options": json.loads(options.model_dump_json()),
                    "models": {}}
    run, run_224 = default_runs(options)
    with tempfile.TemporaryDirectory(prefix="medcl-bench-") as tmp:
        work = Path(tmp)
        for key, run_dir, (images, described) in (("demo", run, demo_images()), ("224", run_224, tissue_images())):
            if key not in options.sections:
                continue
            log(f"model {key}: {run_dir}")
            subject = prepare_subject(key, run_dir, images, work, options)
            result["models"][key] = {"run": str(run_dir), "images": described,
                                     **bench_model(subject, options, peak["peak"], work)}
        if "segment" in options.sections:
            log("segmentation")
            result["segmentation"] = bench_segmentation(options, peak["peak"], work)
        if "search" in options.sections:
            log("search")
            result["search"] = bench_search(run, options.search_size)
    result["headline"] = headline_ratios(result["models"])
    return result
