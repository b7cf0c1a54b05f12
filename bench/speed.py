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
from collections.abc import Callable
from contextlib import ExitStack
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
    rounds: int = Field(3, ge=0)  # paired, alternating re-measurements behind each headline ratio

    def command(self) -> str:
        """The `medcl bench` command line that runs these options (written under the results)."""
        defaults = BenchOptions()
        flags = ["medcl bench"]
        for name in ("run", "run_224", "segmenter_run", "seconds", "tiles", "search_size", "rounds", "out"):
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


def demo_run() -> Path:
    """The demo classifier's run, trained here first (as `make serve` does) if it does not exist."""
    from medcl.demo import medcl_home, prepare_demo

    run = medcl_home() / "runs" / "demo-bloodmnist"
    if not (run / "card.json").is_file():
        log("training the demo classifier first (as `make serve` does)")
        prepare_demo()
    return run


def bench_224_run() -> Path:
    """The 224 px ResNet-18 of configs/bench-resnet18-224.yaml, trained once (a few steps; speed only)."""
    from medcl.demo import medcl_home
    from training.config import load_config
    from training.engine import train

    config = load_config(BENCH_224_CONFIG, {"output_dir": str(medcl_home() / "bench" / "runs")})
    run = Path(config.output_dir) / config.name
    if not (run / "card.json").is_file():
        log(f"training {config.name} ({config.schedule.steps} steps; speed only)")
        train(config, progress=False)
    return run


def default_runs(options: BenchOptions) -> tuple[Path, Path]:
    """The demo classifier's run and the 224 px model's run, trained here if they do not exist yet."""
    return options.run or demo_run(), options.run_224 or bench_224_run()


def prepare_subject(key: str, run_dir: Path, images: list[tuple[str, bytes]], work: Path,
                    options: BenchOptions, parity_data: Path | None = None) -> Subject:
    """Export the run (parity-checked, as users do) and archive it for TorchServe; count its FLOPs."""
    from bench.servers import torchserve_available
    from export.onnx_export import DEFAULT_TOLERANCE, export_onnx
    from export.torchserve import build_mar
    from training.engine import load_trained

    # The 224 model is trained for two steps only: its logits are large and uncalibrated, so its float32
    # ONNX-vs-PyTorch difference (~2e-4) is checked at 1e-3 instead of the export's default 1e-4.
    package = export_onnx(run_dir, work / "packages" / key, parity_data=parity_data,
                          tolerance=1e-3 if key == "224" else DEFAULT_TOLERANCE)
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


RAW = "1 image, raw body"  # the lean form: the image as the whole body, as TorchServe is sent it


def classify_requests(images: list[tuple[str, bytes]], tiles: int) -> tuple[list[Request], list[Request]]:
    """/classify bodies, built once before timing: one image each, and ``tiles`` images each."""
    singles = [multipart_images([image]) for image in images]
    tiled = [multipart_images([images[(i + k) % len(images)] for k in range(tiles)])
             for i in range(0, len(images), tiles)]
    return singles, tiled


# --- the systems ----------------------------------------------------------------------------------

def row(subject: Subject, system: str, request: str, concurrency: int, cell: dict, peak: float) -> dict:
    fraction = cell["images_per_s"] * subject.gflop / peak if peak else float("nan")
    return {"model": subject.key, "system": system, "request": request, "concurrency": concurrency, **cell,
            "fraction_of_compute_limit": round(fraction, 4)}


INT8 = "int8 graph: onnxruntime"  # not "onnxruntime...": the fp32 headline never reads these rows


def int8_call(subject: Subject, tensors: np.ndarray, fp32: Callable) -> tuple[Callable, float]:
    """The subject's graph quantised to static int8 (QDQ, export/variants.py's recipe, calibrated on the
    bench's own images: for speed only, no accuracy gate) in a session set up as the service's; and
    its top-1 agreement with fp32 on those images."""
    from export.variants import make_int8
    from service.package import create_session

    path = subject.package_dir.parent / f"{subject.key}-int8" / "model.int8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_int8(subject.package_dir / "model.onnx", path, tensors[:64])
    session = create_session(path)[0]

    def call(batch: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"image": batch})[0]

    agreement = float((call(tensors).argmax(1) == np.asarray(fp32(tensors)).argmax(1)).mean())
    return call, round(agreement, 4)


class Cells:
    """The ways of running one model, each a function (request kind, concurrency) -> measured cell."""

    def __init__(self, subject: Subject, options: BenchOptions) -> None:
        self.subject, self.options = subject, options
        self.tensors, self.preprocess_ms = model_tensors(subject, max(options.concurrency))
        self.ort, self.provider = onnxruntime_call(subject.package_dir)
        self.torch = torch_eager_call(subject.run_dir)
        self.singles, self.tiles = classify_requests(subject.images, options.tiles)
        self.raw_images: list[Request] = [raw_image(data) for _, data in subject.images]  # TorchServe's form
        self.raw_typed: list[Request] = [raw_image(data, name) for name, data in subject.images]  # the lean form
        self.int8, self.int8_agreement = int8_call(subject, self.tensors, self.ort)

    def onnxruntime_int8(self, c: int, seconds: float) -> dict:
        return time_calls(self.int8, self.tensors[:c], seconds)

    def onnxruntime(self, c: int, seconds: float) -> dict:
        return time_calls(self.ort, self.tensors[:c], seconds)

    def pytorch(self, c: int, seconds: float) -> dict:
        return time_calls(self.torch, self.tensors[:c], seconds)

    def service(self, server, kind: str, c: int, seconds: float) -> dict:
        requests = {"1 image": self.singles, RAW: self.raw_typed}.get(kind, self.tiles)
        return run_closed_loop(f"{server.url}/classify", requests, c, seconds, server.headers)

    def torchserve(self, server, c: int, seconds: float) -> dict:
        return run_closed_loop(server.url, self.raw_images, c, seconds)


def paired_rounds(name: str, first: tuple[str, Callable[[], dict]], second: tuple[str, Callable[[], dict]],
                  key: str, rounds: int) -> dict:
    """The two sides of a headline ratio measured alternately, ``rounds`` times: drift in what the
    machine's neighbours do hits both sides alike, and the median of the round ratios is reported."""
    out = []
    for i in range(rounds):
        a, b = first[1](), second[1]()
        out.append({first[0]: a[key], second[0]: b[key], "ratio": round(a[key] / b[key], 3),
                    f"{first[0]}_p99_ms": a["p99_ms"], f"{second[0]}_p99_ms": b["p99_ms"]})
        log(f"{name} round {i + 1}: {json.dumps(out[-1])}")
    ratios = sorted(r["ratio"] for r in out)
    return {"what": name, "metric": key, "rounds": out, "median_ratio": ratios[len(ratios) // 2],
            "p99_ms_median": {side: sorted(r[f"{side}_p99_ms"] for r in out)[len(out) // 2]
                              for side in (first[0], second[0])}}


def bench_model(subject: Subject, options: BenchOptions, peak: float, work: Path) -> dict:
    from bench.servers import bentoml_service, torchserve, torchserve_available

    cells = Cells(subject, options)  # decodes the images once: tensors and the decode time both come from it
    rows: list[dict] = []

    def record(system: str, request: str, c: int, cell: dict) -> None:
        rows.append(row(subject, system, request, c, cell, peak))
        log(json.dumps(rows[-1]))

    for c in options.concurrency:
        record(f"onnxruntime ({cells.provider}, in process)", f"batch {c}", c, cells.onnxruntime(c, options.seconds))
        record("PyTorch eager (in process)", f"batch {c}", c, cells.pytorch(c, options.seconds))
        record(f"{INT8} ({cells.provider}, in process)", f"batch {c}", c, cells.onnxruntime_int8(c, options.seconds))
    memory = {"bench process, after in-process engines": round(tree_rss_mb(os.getpid()), 1)}
    skipped = torchserve_available() if subject.mar is not None else "no .mar was built"
    paired = None
    with ExitStack() as servers:
        service = servers.enter_context(bentoml_service(subject.package_dir, work / f"bentoml-{subject.key}"))
        for kind in ("1 image", RAW, f"{options.tiles} tiles"):
            for c in options.concurrency:
                record("BentoML service (HTTP)", kind, c, cells.service(service, kind, c, options.seconds))
        memory["BentoML service (all processes)"] = round(tree_rss_mb(service.pid), 1)
        served = None
        if skipped is None:
            served = servers.enter_context(torchserve(subject.mar, work / f"torchserve-{subject.key}"))
            for c in options.concurrency:
                record("TorchServe (.mar, HTTP)", "1 image", c, cells.torchserve(served, c, options.seconds))
            memory["TorchServe (frontend + worker)"] = round(tree_rss_mb(served.pid), 1)
        if options.rounds:
            paired = headline_pair(subject.key, rows, cells, service, served, options)
    return {"model": subject.key, "input_size": subject.input_size, "gflop_per_image": round(subject.gflop, 4),
            "compute_limit_images_per_s": round(peak / subject.gflop, 1),
            "decode_and_preprocess_ms_per_image": round(cells.preprocess_ms, 3), "rows": rows,
            "memory_rss_mb_at_end": memory, "torchserve_skipped": skipped, "paired": paired,
            "int8_top1_agreement_with_fp32": cells.int8_agreement}


def headline_pair(key: str, rows: list[dict], cells: Cells, service, served, options: BenchOptions) -> dict | None:
    """224: the service's best cell against raw onnxruntime's best batch. Demo: the service against
    TorchServe, single images at the highest concurrency. Both re-measured in alternating rounds."""
    seconds = max(options.seconds, 10.0)
    if key == "224":
        best_service = max((r for r in rows if r["system"].startswith("BentoML")), key=lambda r: r["images_per_s"])
        best_raw = max((r for r in rows if r["system"].startswith("onnxruntime")), key=lambda r: r["images_per_s"])
        kind, c, b = best_service["request"], best_service["concurrency"], best_raw["concurrency"]
        return paired_rounds(f"service ({kind}, concurrency {c}) / onnxruntime (batch {b})",
                             ("service", lambda: cells.service(service, kind, c, seconds)),
                             ("onnxruntime", lambda: cells.onnxruntime(b, seconds)), "images_per_s", options.rounds)
    if served is None:
        return None
    c = max(options.concurrency)
    return paired_rounds(f"service / TorchServe (1 image as the raw body, concurrency {c})",
                         ("service", lambda: cells.service(service, RAW, c, seconds)),
                         ("torchserve", lambda: cells.torchserve(served, c, seconds)), "requests_per_s", options.rounds)


def headline_ratios(models: dict[str, dict]) -> dict:
    """The two figures the issue asks for: the median ratio of the paired rounds where they ran,
    else read from the grid's rows (None where a side was not measured)."""
    def best(rows, system_prefix):
        values = [r["images_per_s"] for r in rows if r["system"].startswith(system_prefix)]
        return max(values) if values else None

    ratios: dict = {}
    if "224" in models:
        model = models["224"]
        if model.get("paired"):
            ratios["service_over_onnxruntime_224"] = model["paired"]["median_ratio"]
        else:
            service, raw = best(model["rows"], "BentoML"), best(model["rows"], "onnxruntime")
            ratios["service_over_onnxruntime_224"] = round(service / raw, 3) if service and raw else None
    if "demo" in models:
        model = models["demo"]
        rows = model["rows"]
        c = max(r["concurrency"] for r in rows)
        if model.get("paired"):
            ratios[f"service_over_torchserve_demo_c{c}"] = model["paired"]["median_ratio"]
            ratios[f"p99_ms_demo_c{c}"] = model["paired"]["p99_ms_median"]
            return ratios

        def at(system_prefix, request):
            return next((r for r in rows if r["system"].startswith(system_prefix) and r["request"] == request
                         and r["concurrency"] == c), None)

        # like for like: both sent the image as the raw body (older result files have only multipart rows)
        service, served = at("BentoML", RAW) or at("BentoML", "1 image"), at("TorchServe", "1 image")
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
    # the card's own rule (what a plain /segment answers with) and the network checked against the stain
    result = {"tiles": f"{len(tiles)} MoNuSeg test tiles ({width}x{height}, 40x)", "run": str(run),
              "in_process": stage_timings(package, tiles),
              "in_process_network": stage_timings(package, tiles, "network-or-classical"),
              **flop_floor(run, height, width, peak)}
    with bentoml_service(package, work / "bentoml-segmenter") as server:
        result["http_one_at_a_time"] = http_timings(server.url, server.headers, tiles)
        result["http_one_at_a_time_network"] = http_timings(server.url, server.headers, tiles,
                                                            "network-or-classical")
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
        subjects = (("demo", run, demo_images, None), ("224", run_224, tissue_images, REPO / "demo" / "he-tiles"))
        for key, run_dir, read_images, parity_data in subjects:
            if key not in options.sections:
                continue
            log(f"model {key}: {run_dir}")
            images, described = read_images()
            subject = prepare_subject(key, run_dir, images, work, options, parity_data)
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
