"""The histology demo: the carried PatchCamelyon package, the command that builds it (rerun short here),
and the service answering with it over real HTTP: /classify at native resolution with pixel sizes and
the out-of-distribution flag, /search from its own index, awkward tiles answered, never a 500."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medcl.card import Card
from medcl.demo import DEMO_PCAM, DEMO_PCAM_CONFIG, PCAM_BUILD_COMMAND, build_pcam_demo
from tests.conftest import ADMIN_KEY, shared

CARRIED = DEMO_PCAM / "package"


def png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def test_carried_package_is_what_its_command_builds() -> None:
    """The carried package comes from configs/demo-pcam.yaml at full length, within the size limit."""
    from training.config import load_config

    card = Card.load(CARRIED)
    config = load_config(DEMO_PCAM_CONFIG)
    assert card.name == "demo-pcam" and card.task == "classify"
    assert card.class_names == ["normal", "tumor"]
    assert card.preprocess == config.preprocess and card.preprocess.input_size == 96
    assert card.preprocess.pixel_size_um == pytest.approx(0.972)
    assert card.architecture.backbone == config.model.backbone and card.method == config.method.name
    assert card.training["built_by"] == PCAM_BUILD_COMMAND  # not a shortened run
    assert card.training["steps_done"] == config.schedule.steps
    assert card.ood is not None and card.ood.images > 0
    assert card.ood.image_score == "knn10_statistics14"  # the image signal packages are built with
    size = sum(f.stat().st_size for f in CARRIED.iterdir())
    assert size <= 20 * 2**20, f"the carried package is {size / 2**20:.1f} MB"
    assert {p.name for p in (DEMO_PCAM / "index").iterdir()} == {"normal", "tumor"}


def test_carried_package_was_trained_on_the_patchcamelyon_training_split() -> None:
    from training.config import load_config
    from training.engine import prepare_data

    data = shared("pcam")
    config = load_config(DEMO_PCAM_CONFIG, {"data.path": str(data / "train"), "data.test_path": str(data / "valid")})
    assert prepare_data(config).fingerprint == Card.load(CARRIED).data.fingerprint


def test_build_command_short_run(tmp_path: Path) -> None:
    """`medcl demo build-pcam` rerun at 3 steps: a package with the card's contract and an index sample."""
    data = shared("pcam")
    package = build_pcam_demo(data, out=tmp_path / "pcam", runs=tmp_path / "runs", steps=3, index_per_class=4,
                              progress=False)
    card = Card.load(package)
    assert card.training["built_by"] == PCAM_BUILD_COMMAND + " --steps 3"
    assert card.data.n_test == 1000  # valid/ is the test split, whole
    assert card.data.n_labelled + card.ood.images == 6000  # the rest of train/ is validation
    assert card.onnx is not None and card.onnx.parity
    assert not (package / "model.safetensors").exists()
    for name in ("normal", "tumor"):
        assert len(list((tmp_path / "pcam" / "index" / name).glob("*.jpg"))) == 4


def test_build_command_refuses_a_folder_without_the_splits(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "medcl.cli", "demo", "build-pcam", "--data", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "train/" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def pcam_service(demo_models_service: str):
    """The demo's three models served (the blood-cell and nuclei ones tiny), with an admin key."""
    with httpx.Client(base_url=demo_models_service, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=120) as client:
        yield client


def classify(api: httpx.Client, files: list[tuple[str, bytes]], **form) -> httpx.Response:
    return api.post("/classify", files=[("images", (name, data, "application/octet-stream")) for name, data in files],
                    data={"model": "demo-pcam", **form})


def test_models_lists_the_histology_model(pcam_service: httpx.Client) -> None:
    models = {m["name"]: m for m in pcam_service.get("/models").json()["models"]}
    assert models["demo-pcam"]["task"] == "classify" and models["demo-pcam"]["input_size"] == 96
    assert models["demo-pcam"]["pixel_size_um"] == pytest.approx(0.972)
    assert models["demo-pcam"]["ood_threshold"] == Card.load(CARRIED).ood.threshold
    assert models["demo-pcam"]["image_ood_threshold"] == Card.load(CARRIED).ood.image_threshold


def test_patches_are_classified_and_in_distribution(pcam_service: httpx.Client) -> None:
    valid = shared("pcam", "valid")
    files = sorted((valid / "0").glob("*.jpg"))[:10] + sorted((valid / "1").glob("*.jpg"))[:10]
    r = classify(pcam_service, [(f.name, f.read_bytes()) for f in files])
    assert r.status_code == 200, r.text
    answers = r.json()
    assert all(a["label"] in ("normal", "tumor") and isinstance(a["ood_score"], float)
               and isinstance(a["image_ood_score"], float) for a in answers)
    # the threshold flags ~1% of validation patches: of 20 patches from the same distribution, most pass
    assert sum(a["in_distribution"] for a in answers) >= 16, [a["ood_score"] for a in answers]


def test_other_modalities_are_flagged(pcam_service: httpx.Client) -> None:
    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::150][:8]
    skin = sorted(shared("ham10000", "images").glob("*.jpg"))[:8]
    r = classify(pcam_service, [(f.name, f.read_bytes()) for f in photos + skin])
    assert r.status_code == 200, r.text
    flagged = [not a["in_distribution"] for a in r.json()]
    assert sum(flagged) >= 13, [(a["ood_score"], a["image_ood_score"]) for a in r.json()]


def test_blood_model_flags_histology(pcam_service: httpx.Client) -> None:
    tiles = sorted(shared("pcam", "valid", "1").glob("*.jpg"))[:8]
    r = pcam_service.post("/classify", files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in tiles],
                          data={"model": "demo-bloodmnist"})
    assert r.status_code == 200, r.text
    assert not any(a["in_distribution"] for a in r.json()), r.json()


def test_pixel_size_cuts_the_models_field_of_view(pcam_service: httpx.Client) -> None:
    """A 40x tile with its pixel size: the 10x model sees the same field of view as a 96 px patch; a
    model without a pixel size in its card refuses the option in one clear line."""
    tile = shared("monuseg", "test", "images")
    tile = sorted(tile.glob("*.png"))[0].read_bytes()
    r = classify(pcam_service, [("tile.png", tile)], pixel_size_um="0.25")
    assert r.status_code == 200, r.text
    raw = pcam_service.post("/classify?model=demo-pcam&pixel_size_um=0.25", content=tile,
                            headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.json()[0]["top_k"] == r.json()[0]["top_k"]
    refused = pcam_service.post("/classify", files=[("images", ("t.png", tile, "image/png"))],
                                data={"model": "demo-bloodmnist", "pixel_size_um": "0.25"})
    assert refused.status_code == 400 and "pixel size" in refused.json()["error"]


@pytest.mark.parametrize("make", [
    lambda: png(Image.new("L", (96, 96), 128)),  # grey
    lambda: png(Image.fromarray(np.full((300, 200), 40000, np.uint16)), format="TIFF"),  # 16-bit TIFF
    lambda: png(Image.new("RGB", (17, 500), (200, 120, 180))),  # wrong size and shape
], ids=["grey", "16-bit-tiff", "odd-size"])
def test_awkward_tiles_are_answered(pcam_service: httpx.Client, make) -> None:
    r = classify(pcam_service, [("odd", make())])
    assert r.status_code == 200, r.text
    assert r.json()[0]["label"] in ("normal", "tumor")


def test_search_uses_the_histology_index(pcam_service: httpx.Client) -> None:
    train = shared("pcam", "train")
    files = sorted((train / "0").glob("*.jpg"))[:3] + sorted((train / "1").glob("*.jpg"))[:3]
    meta = [{"label": "normal" if f.parent.name == "0" else "tumor", "case_id": f.stem} for f in files]
    added = pcam_service.post("/cases", files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
                              data={"metadata": json.dumps(meta), "model": "demo-pcam"})
    assert added.status_code == 200, added.text
    query = files[0].read_bytes()
    hits = pcam_service.post("/search", files=[("images", ("q.jpg", query, "image/jpeg"))],
                             data={"model": "demo-pcam", "k": "3"}).json()[0]["hits"]
    assert hits[0]["case"]["case_id"] == files[0].stem and hits[0]["similarity"] > 0.99
    blood = pcam_service.post("/search", files=[("images", ("q.jpg", query, "image/jpeg"))],
                              data={"model": "demo-bloodmnist", "k": "3"})
    assert blood.status_code == 200
    assert all(h["case"]["case_id"] not in {m["case_id"] for m in meta} for h in blood.json()[0]["hits"])
