"""ONNX export: parity with PyTorch on real images, recomputed here, and refusal on failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import ParityError, export_onnx
from medcl.card import Card
from medcl.preprocess import decode_image, normalise, to_model_pixels
from tests.conftest import DEMO_CONFIG, shared
from training.engine import load_trained
from training.methods import METHODS
from training.models import ExportWrapper


def test_package_has_card_with_parity_and_dynamic_batch(tiny_package: Path) -> None:
    card = Card.load(tiny_package)
    assert card.onnx is not None and card.onnx.opset == 17
    parity = card.onnx.parity
    assert parity["images"] == 64 and parity["max_abs_diff_logits"] <= 1e-4
    assert parity["top1_agreement"] == 1.0
    session = ort.InferenceSession(str(tiny_package / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    assert session.get_inputs()[0].shape[0] == "batch"


def test_parity_recomputed_on_full_size_photos(tiny_run: Path, tiny_package: Path) -> None:
    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::60]
    card = Card.load(tiny_package)
    x = normalise(np.stack([to_model_pixels(decode_image(p), card.preprocess) for p in photos]), card.preprocess)
    model, _ = load_trained(tiny_run)
    with torch.no_grad():
        ref_logits, ref_emb = (t.numpy() for t in ExportWrapper(model)(torch.from_numpy(x)))
    session = ort.InferenceSession(str(tiny_package / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, emb = session.run(None, {"image": x})
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert np.abs(emb - ref_emb).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_failed_parity_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with pytest.raises(ParityError, match="no package written"):
        export_onnx(tiny_run, out, tolerance=1e-15)
    assert not out.exists() and not [p for p in tmp_path.iterdir()]


def test_export_uses_a_given_folder_of_real_images(tiny_run: Path, tmp_path: Path) -> None:
    out = export_onnx(tiny_run, tmp_path / "pkg", parity_data=shared("blood-photos", "platelet"))
    assert "platelet" in Card.load(out).onnx.parity["source"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_exports_to_a_package_the_service_loads(method: str, tiny_run: Path, tmp_path: Path) -> None:
    """Each training method's run (named by the engine's registry, so a new method is covered too) carries a
    card and exports to a package that the service's loader opens and answers from, on real blood images."""
    from service.package import ModelPackage
    from tests.test_engine import FAST
    from training.config import load_config
    from training.engine import train

    overrides = {**FAST, "name": method, "output_dir": str(tmp_path / "runs"), "schedule.steps": 2,
                 "method.name": method, "data.label_fraction": 0.1}
    if method == "swcl":  # SWCL's stage 1 is a finished run on the same classes
        overrides["method.teacher"] = str(tiny_run)
    run = train(load_config(DEMO_CONFIG, overrides), progress=False)
    assert Card.load(run).method == method
    package = ModelPackage(export_onnx(run, tmp_path / "pkg"))
    assert package.card.method == method and package.card.onnx.parity["top1_agreement"] == 1.0
    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::200]
    x = normalise(np.stack([to_model_pixels(decode_image(p), package.card.preprocess) for p in photos]),
                  package.card.preprocess)
    logits = package.run(x, "logits")
    assert logits.shape == (len(photos), len(package.card.class_names)) and np.isfinite(logits).all()
