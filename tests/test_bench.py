"""`medcl bench` end to end on a tiny model: every system measured, the headline ratios computed from
the rows, the page's hand-written part kept. Figures are never asserted (speed belongs in docs/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.http_load import multipart_images
from bench.servers import torchserve_available
from bench.speed import RAW, headline_ratios
from tests.conftest import shared


def test_bench_measures_every_system_and_keeps_the_handwritten_page(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks"
    out.parent.mkdir()
    out.with_suffix(".md").write_text("# Benchmarks\n\nHand-written: what was changed and why.\n")
    done = subprocess.run([sys.executable, "-m", "medcl.cli", "bench", "--run", str(tiny_run), "--only", "demo",
                           "--seconds", "0.5", "--concurrency", "1", "2", "--tiles", "2", "--rounds", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["models"]["demo"]["rows"]
    systems = {r["system"].split(" (")[0] for r in rows}
    expected = {"onnxruntime", "PyTorch eager", "BentoML service"}
    if torchserve_available() is None:
        expected.add("TorchServe")
    assert expected <= systems, systems
    for r in rows:
        assert r["images_per_s"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], r
        if "statuses" in r:
            assert set(r["statuses"]) == {"200"}, r  # every request of the load answered
    assert {(r["request"], r["concurrency"]) for r in rows if r["system"].startswith("BentoML")} == \
        {("1 image", 1), ("1 image", 2), (RAW, 1), (RAW, 2), ("2 tiles", 1), ("2 tiles", 2)}
    assert result["headline"] == headline_ratios(result["models"])
    if "TorchServe" in systems:
        paired = result["models"]["demo"]["paired"]
        assert len(paired["rounds"]) == 1 and paired["metric"] == "requests_per_s"
        assert result["headline"]["service_over_torchserve_demo_c2"] == paired["median_ratio"] > 0
    assert result["gemm_gflops"]["peak"] > 0 and result["models"]["demo"]["gflop_per_image"] > 0
    page = out.with_suffix(".md").read_text()
    assert page.startswith("# Benchmarks\n\nHand-written: what was changed and why.")
    assert "| BentoML service (HTTP) | 2 tiles | 2 |" in page and out.with_suffix(".png").stat().st_size > 10_000
    assert "medcl bench --run" in page  # the command that produced it


def test_headline_ratios_are_read_from_the_rows() -> None:
    def r(system: str, request: str, c: int, ips: float, rps: float, p99: float) -> dict:
        return {"system": system, "request": request, "concurrency": c, "images_per_s": ips,
                "requests_per_s": rps, "p99_ms": p99}

    models = {"224": {"rows": [r("onnxruntime (CPU, in process)", "batch 8", 8, 20.0, 2.5, 1),
                               r("onnxruntime (CPU, in process)", "batch 32", 32, 22.0, 0.7, 1),
                               r("BentoML service (HTTP)", "8 tiles", 32, 21.0, 2.6, 1)]},
              "demo": {"rows": [r("BentoML service (HTTP)", "1 image", 32, 250.0, 250.0, 180.0),
                                r("BentoML service (HTTP)", RAW, 32, 300.0, 300.0, 150.0),
                                r("BentoML service (HTTP)", "8 tiles", 32, 500.0, 60.0, 900.0),
                                r("TorchServe (.mar, HTTP)", "1 image", 32, 100.0, 100.0, 400.0)]}}
    assert headline_ratios(models) == {"service_over_onnxruntime_224": pytest.approx(21 / 22, abs=1e-3),
                                       "service_over_torchserve_demo_c32": 3.0,
                                       "p99_ms_demo_c32": {"service": 150.0, "torchserve": 400.0}}


def test_multipart_bodies_parse_back_to_their_fields_and_files() -> None:
    from email.parser import BytesParser
    from email.policy import HTTP

    body = multipart_images([("a.png", b"\x89PNG1"), ("b.jpg", b"\xff\xd8JPEG")], {"top_k": "3"})
    assert body.images == 2
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {body.content_type}\r\n\r\n".encode() + body.body)
    parts = [(p.get_param("name", header="content-disposition"), p.get_filename(), p.get_payload(decode=True))
             for p in message.iter_parts()]
    assert parts == [("top_k", None, b"3"), ("images", "a.png", b"\x89PNG1"), ("images", "b.jpg", b"\xff\xd8JPEG")]


def test_gpu_bench_says_why_an_engine_cannot_run_here_and_reports_what_ran(tiny_package: Path, tmp_path: Path) -> None:
    """`medcl bench-gpu`'s engines on this CPU-only machine: the CPU session runs and agrees with itself;
    CUDA and TensorRT are reported as not run, with the reason, never timed on another provider."""
    import numpy as np
    import onnxruntime as ort

    from bench.gpu import CPU, CUDA, TRT, agreement, ort_engine

    call, what = ort_engine(tiny_package / "model.onnx", CPU, tmp_path)
    assert call is not None and what == CPU
    size = json.loads((tiny_package / "card.json").read_text())["preprocess"]["input_size"]
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    same = agreement(call(x), call(x))
    assert same["top1_agreement"] == 1.0 and same["max_abs_logit_diff"] == 0.0
    for provider in (CUDA, TRT):
        call, why = ort_engine(tiny_package / "model.onnx", provider, tmp_path)
        if provider not in ort.get_available_providers():
            assert call is None and provider in why


def test_gpu_report_renders_the_recorded_run_and_keeps_the_handwritten_part(tmp_path: Path) -> None:
    from bench.gpu_report import BEGIN, END, write_gpu_report

    recorded = json.loads((Path(__file__).parent.parent / "docs" / "benchmarks-gpu.json").read_text())
    page = tmp_path / "gpu.md"
    page.write_text(f"# title\n\n{BEGIN}\nold\n{END}\n\nwritten by hand\n")
    write_gpu_report(recorded, page)
    text = page.read_text()
    assert "written by hand" in text and "\nold\n" not in text
    assert recorded["device"]["gpu"] in text
    for key in ("demo", "224"):
        assert f"### Model `{key}`" in text
        best = max(r["images_per_s"] for r in recorded["models"][key]["rows"] if r["engine"] == "onnxruntime CUDA fp32")
        assert f"| {best:.0f} |" in text


def test_segmentation_timing_runs_the_network_only_where_the_service_would(segmenter_package: Path) -> None:
    """The classical rule answers without the network (as /segment does), the checked rule runs it; the
    report shows both rules side by side. Real 1000x1000 MoNuSeg tiles."""
    from bench.segment_speed import stage_timings
    from bench.speed_report import markdown

    tiles = sorted(shared("monuseg", "test", "images").glob("*.png"))[:2]
    classical = stage_timings(segmenter_package, tiles, "classical")
    checked = stage_timings(segmenter_package, tiles, "network-or-classical")
    assert classical["seconds_per_megapixel"]["inference"] == 0.0
    assert checked["seconds_per_megapixel"]["inference"] > 0.0
    assert classical["produced_by"] == {"classical": 1} and sum(checked["produced_by"].values()) == 1
    http = {"seconds_per_megapixel": 1.0, "p50_ms": 1000.0}
    seg = {"tiles": "2 tiles", "run": "r", "in_process": classical, "in_process_network": checked,
           "http_one_at_a_time": http, "http_one_at_a_time_network": http, "gflop_per_megapixel": 1.0,
           "floor_seconds_per_megapixel": 0.01}
    result = {"machine": {"cpu": "x", "cores": 2}, "gemm_gflops": {"peak": 1.0}, "onnxruntime": "1",
              "models": {}, "segmentation": seg}
    text = "\n".join(markdown(result, None))
    assert "| classical (answers: classical 1;" in text and "| network-or-classical (answers: " in text
    assert "| inference (in process) | 0.0 | " in text


def test_gpu_bench_serves_with_each_api_process_count(tiny_package: Path, tmp_path: Path) -> None:
    """`medcl bench-gpu --workers 1 2`'s service part (here on the CPU): each count is served and every
    request answered; the rows say which count they measured."""
    from bench.gpu import bench_service
    from bench.speed import Subject, demo_images

    images, _ = demo_images(8)
    subject = Subject("demo", tiny_package, tiny_package, None, images, 28, 0.0)
    rows = bench_service(subject, tmp_path, seconds=0.5, tiles=2, workers=(1, 2), concurrency=(4,))["rows"]
    assert len(rows) == 2 * 2 * 2  # API process counts x batch-runner rules x request kinds
    assert {r["batch_runners"].split(",")[0] for r in rows} == {"1 API process", "2 API processes"}
    for r in rows:
        assert r["requests"] > 0 and set(r["statuses"]) == {"200"}, r


def test_service_cpu_counts_only_the_servers_own_process_tree() -> None:
    import os

    from bench.service_cpu import _descends_from

    assert _descends_from(os.getpid(), os.getppid())  # this test's process descends from its parent
    assert not _descends_from(os.getppid(), os.getpid())  # and not the other way round
