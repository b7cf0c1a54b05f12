"""The BentoML service over real HTTP, serving a package the project trained and exported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from medcl.card import Card
from medcl.preprocess import decode_image, normalise, to_model_pixels
from tests.conftest import shared


def post_files(api: httpx.Client, route: str, paths: list[Path], **fields) -> httpx.Response:
    """Multipart: the files in field ``images``; other arguments (top_k) are form fields beside them."""
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return api.post(route, files=files, data={k: str(v) for k, v in fields.items()}, timeout=60)


def test_classify_real_photographs(api: httpx.Client, tiny_package: Path) -> None:
    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::100]
    r = post_files(api, "/classify", photos, top_k=3)
    assert r.status_code == 200, r.text
    answers = r.json()
    card = Card.load(tiny_package)
    assert len(answers) == len(photos)
    for a in answers:
        assert a["label"] in card.class_names and 0 < a["score"] <= 1
        assert a["model_version"] == card.version
        assert len(a["top_k"]) == 3 and a["top_k"][0]["label"] == a["label"]
        assert a["top_k"][0]["probability"] >= a["top_k"][1]["probability"]
    # The service's answer is the package's answer through the card's preprocessing.
    session = ort.InferenceSession(str(tiny_package / "model.onnx"), providers=["CPUExecutionProvider"])
    x = normalise(np.stack([to_model_pixels(decode_image(p), card.preprocess) for p in photos]), card.preprocess)
    expected = [card.class_names[i] for i in session.run(["logits"], {"image": x})[0].argmax(1)]
    assert [a["label"] for a in answers] == expected


def test_classify_single_image_and_tiles(api: httpx.Client) -> None:
    photo = sorted(shared("blood-photos", "neutrophil").glob("*.jpg"))[0]
    r = post_files(api, "/classify", [photo])
    assert r.status_code == 200 and len(r.json()) == 1 and len(r.json()[0]["top_k"]) == 5


def test_embed_returns_unit_vectors(api: httpx.Client, tiny_package: Path) -> None:
    photos = sorted(shared("blood-photos", "monocyte").glob("*.jpg"))[:3]
    r = post_files(api, "/embed", photos)
    assert r.status_code == 200, r.text
    body = r.json()
    dim = Card.load(tiny_package).architecture.embedding_dim
    assert len(body) == 3
    for item in body:
        v = np.asarray(item["embedding"])
        assert item["dim"] == dim == v.shape[0]
        assert abs(np.linalg.norm(v) - 1) < 1e-5


def test_truncated_jpeg_gets_400_with_a_message(api: httpx.Client, tmp_path: Path) -> None:
    photo = sorted(shared("blood-photos", "basophil").glob("*.jpg"))[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:3000])
    good = sorted(shared("blood-photos", "basophil").glob("*.jpg"))[1]
    r = post_files(api, "/classify", [good, broken])
    assert r.status_code == 400
    assert "image 1 (broken.jpg)" in r.text and ("truncated" in r.text or "decoded" in r.text)


@pytest.mark.parametrize("payload", [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_garbage_gets_4xx_not_500(api: httpx.Client, payload: bytes) -> None:
    r = api.post("/classify", files=[("images", ("x.png", payload, "image/png"))], timeout=30)
    assert 400 <= r.status_code < 500, r.text


def test_missing_images_field_is_a_client_error(api: httpx.Client) -> None:
    r = api.post("/classify", files=[("other", ("x.png", b"abc", "image/png"))], timeout=30)
    assert 400 <= r.status_code < 500


def test_health_and_metrics(api: httpx.Client) -> None:
    assert api.get("/livez").status_code == 200
    assert api.get("/readyz").status_code == 200
    text = api.get("/metrics").text
    assert "medcl_images_total" in text and "bentoml_service_request" in text


def test_the_serving_path_never_imports_torch(tiny_package: Path) -> None:
    # The package is named explicitly: a fresh clone has no demo package until `make serve` builds it.
    code = "import sys, service.service; print('torch' in sys.modules)"
    env = {**os.environ, "MEDCL_PACKAGE": str(tiny_package)}
    env.pop("MEDCL_MODELS", None), env.pop("MEDCL_MODELS_FILE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("top_k", ["0", "1000", "many"])
def test_invalid_top_k_is_a_400(api: httpx.Client, top_k: str) -> None:
    photo = sorted(shared("blood-photos", "lymphocyte").glob("*.jpg"))[0]
    r = api.post("/classify", files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))],
                   data={"top_k": top_k}, timeout=30)
    assert r.status_code == 400, r.text


def test_too_many_pixels_is_a_413(api: httpx.Client) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx of zeros compresses to ~80 KB
    r = api.post("/classify", files=[("images", ("bomb.png", buf.getvalue(), "image/png"))], timeout=60)
    assert r.status_code == 413 and "above the limit" in r.text


def test_concurrent_requests_are_batched_and_none_is_shed(api: httpx.Client) -> None:
    """32 clients at once, twice, with an idle gap longer than uvicorn's 5 s keep-alive between the
    bursts (that gap once turned stale internal connections into 500s): every request gets 200,
    and the model saw batches larger than one."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::12][:96]

    def one(p: Path) -> int:
        return post_files(api, "/classify", [p]).status_code

    statuses = []
    for burst in range(2):
        if burst:
            time.sleep(6.5)
        with ThreadPoolExecutor(max_workers=32) as pool:
            statuses += list(pool.map(one, photos))
    assert statuses == [200] * (2 * len(photos))
    text = api.get("/metrics").text
    count = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("medcl_model_batch_size_count") and 'output="scores"' in line)
    total = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("medcl_model_batch_size_sum") and 'output="scores"' in line)
    assert count > 0 and total / count > 1.0, "adaptive batching never formed a batch"


def test_separate_model_processes_answer_like_inline(api: httpx.Client, tiny_package: Path, tmp_path: Path) -> None:
    """MEDCL_MODEL_PLACEMENT=separate (each model its own BentoML process, for GPU deployments) gives
    the inline default's answers."""
    from tests.conftest import ADMIN_KEY, running_service

    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::150]
    inline = post_files(api, "/classify", photos).json()
    with running_service(tiny_package, tmp_path / "separate", MEDCL_MODEL_PLACEMENT="separate") as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
            separate = post_files(client, "/classify", photos).json()
            models = client.get("/models").json()
    assert [a["label"] for a in separate] == [a["label"] for a in inline]
    assert [a["score"] for a in separate] == pytest.approx([a["score"] for a in inline], abs=1e-5)
    assert models["models"][0]["provider"] == "CPU"  # asked of the separate model process
    # the tiny package has no gated variants: fp32, and no timings because there was no choice
    assert models["models"][0]["variant"] == "fp32" and models["models"][0]["variant_speeds"] == {}
