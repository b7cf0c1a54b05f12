"""fp16/int8 variants: written beside model.onnx, figures recomputed here, and the int8 gate refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.onnx_export import export_onnx, labelled_splits
from medcl.card import Card
from medcl.preprocess import normalise


@pytest.fixture(scope="module")
def variant_package(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tiny_run, tmp_path_factory.mktemp("variants") / "pkg", variants=["fp16", "int8"])


def test_variants_are_written_with_their_figures(variant_package: Path) -> None:
    variants = Card.load(variant_package).onnx.variants
    assert (variant_package / "model.fp16.onnx").is_file() and (variant_package / "model.int8.onnx").is_file()
    assert variants["fp16"]["written"] and variants["int8"]["written"]
    assert variants["fp16"]["top1_agreement_with_fp32"] >= 0.98
    assert variants["int8"]["calibration_images"] == 256
    for name in ("fp32", "fp16", "int8"):
        assert variants[name]["images_per_second_b32"] > 0


def test_recorded_int8_accuracy_is_what_onnxruntime_gives(variant_package: Path) -> None:
    card = Card.load(variant_package)
    held_out, labels, _ = labelled_splits(card, None)
    x = normalise(held_out, card.preprocess)
    for name, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        session = ort.InferenceSession(str(variant_package / file), providers=["CPUExecutionProvider"])
        accuracy = float((session.run(["logits"], {"image": x})[0].argmax(1) == labels).mean())
        assert accuracy == pytest.approx(card.onnx.variants[name]["accuracy"], abs=1e-9)
    # fp16 keeps float32 inputs and outputs for clients.
    fp16 = ort.InferenceSession(str(variant_package / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert fp16.get_inputs()[0].type == "tensor(float)" and fp16.run(["logits"], {"image": x[:2]})[0].dtype == np.float32


def test_int8_gate_refuses_and_the_cli_says_so(tiny_run: Path, tmp_path: Path) -> None:
    # A negative allowance cannot be met by any model: the gate must refuse int8.
    out = subprocess.run([sys.executable, "-m", "medcl.cli", "export", str(tiny_run), "--out", str(tmp_path / "pkg"),
                          "--variants", "int8", "--max-int8-drop", "-1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "without int8" in out.stderr and out.stderr.count("\n") == 1
    assert (tmp_path / "pkg" / "model.onnx").is_file() and not (tmp_path / "pkg" / "model.int8.onnx").exists()
    card = json.loads((tmp_path / "pkg" / "card.json").read_text())
    assert card["onnx"]["variants"]["int8"]["written"] is False


def test_unknown_variant_is_a_clear_error(tiny_run: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "medcl.cli", "export", str(tiny_run), "--out", str(tmp_path / "p"),
                          "--variants", "int4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown variant" in out.stderr


def test_tensorrt_auto_reports_and_require_fails_without_it(tiny_run: Path, tmp_path: Path) -> None:
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip(reason="TensorRT is available here, so the no-TensorRT path cannot be shown; runs on machines without TensorRT (CI)")
    auto = subprocess.run([sys.executable, "-m", "medcl.cli", "export", str(tiny_run), "--out", str(tmp_path / "a"),
                           "--tensorrt", "auto"], capture_output=True, text=True, timeout=300)
    assert auto.returncode == 0 and "no TensorRT engine built" in auto.stderr
    assert json.loads(auto.stdout)["variants"]["tensorrt"]["built"] is False
    required = subprocess.run([sys.executable, "-m", "medcl.cli", "export", str(tiny_run), "--out",
                               str(tmp_path / "r"), "--tensorrt", "require"], capture_output=True, text=True, timeout=300)
    assert required.returncode == 2 and "TensorRT was required" in required.stderr
    assert not (tmp_path / "r").exists()


def test_the_service_serves_the_fastest_gated_graph(variant_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.package import VARIANT_MIN_GAIN, ModelPackage

    monkeypatch.delenv("MEDCL_VARIANT", raising=False)
    package = ModelPackage(variant_package, threads=1)
    speeds = package.variant_speeds
    assert set(speeds) == {"fp32", "fp16", "int8"} and all(v > 0 for v in speeds.values())
    best = max(speeds, key=speeds.get)
    expected = best if best != "fp32" and speeds[best] >= VARIANT_MIN_GAIN * speeds["fp32"] else "fp32"
    assert package.variant == expected


def test_a_forced_variant_is_the_graph_that_runs(variant_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.package import ModelPackage, PackageError

    card = Card.load(variant_package)
    held_out, _, _ = labelled_splits(card, None)
    x = normalise(held_out[:16], card.preprocess)
    monkeypatch.setenv("MEDCL_VARIANT", "int8")
    package = ModelPackage(variant_package, threads=1)
    direct = ort.InferenceSession(str(variant_package / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert package.variant == "int8" and package.variant_speeds == {}
    assert np.allclose(package.run(x, "logits"), direct.run(["logits"], {"image": x})[0], atol=1e-5)
    monkeypatch.setenv("MEDCL_VARIANT", "int4")
    with pytest.raises(PackageError, match="MEDCL_VARIANT=int4"):
        ModelPackage(variant_package, threads=1)
