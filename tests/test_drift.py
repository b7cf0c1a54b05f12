"""Drift signals: a service fed blood cells like its training data reports no shift; fed H&E tissue
tiles it reports both signals shifted and `medcl drift` exits 3 (retrain)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medcl.drift import BUCKETS, bucket_fractions, compare, load_reference, psi
from tests.conftest import ADMIN_KEY, REPO_ROOT, running_service, shared


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.beta(8, 1, 5000), rng.beta(8, 1, 5000)
    shifted = rng.beta(2, 2, 5000)
    bounds = BUCKETS["confidence"]
    assert psi(bucket_fractions(a, bounds), bucket_fractions(a, bounds)) == pytest.approx(0.0, abs=1e-12)
    assert psi(bucket_fractions(a, bounds), bucket_fractions(b, bounds)) < 0.05
    assert psi(bucket_fractions(a, bounds), bucket_fractions(shifted, bounds)) > 1.0
    cumulative = np.cumsum(bucket_fractions(a, bounds))
    verdict = compare(list(cumulative), list(np.cumsum(np.bincount(
        np.searchsorted(bounds, shifted), minlength=len(bounds) + 1))))
    assert verdict["images"] == 5000 and verdict["shifted"]


def test_the_package_carries_a_reference_from_training(tiny_package: Path) -> None:
    reference = load_reference(tiny_package)
    assert reference is not None
    assert reference.train_embeddings.shape[1] == 64
    assert np.allclose(np.linalg.norm(reference.train_embeddings, axis=1), 1.0, atol=1e-2)
    assert len(reference.confidence) == len(reference.distance) > 100  # the held-out split
    assert 0.0 < float(np.median(reference.distance)) < 1.0


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _send(client: httpx.Client, images: list[bytes], per_request: int = 32) -> None:
    for i in range(0, len(images), per_request):
        files = [("images", (f"{i + j}.png", data, "image/png")) for j, data in enumerate(images[i:i + per_request])]
        answer = client.post("/classify", files=files)
        assert answer.status_code == 200, answer.text


def _tissue_tiles(n: int) -> list[bytes]:
    """Crops of real H&E tissue tiles: not what a blood-cell classifier was trained on."""
    tiles = sorted(shared("histology-tiles", "crc-val-he-7k").glob("*.png"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        tile = np.asarray(Image.open(tiles[i % len(tiles)]).convert("RGB"))
        y, x = rng.integers(0, tile.shape[0] - 64, 2)
        out.append(_png(tile[y:y + 64, x:x + 64]))
    return out


def test_in_distribution_traffic_is_stable_and_tissue_tiles_are_a_shift(tiny_package: Path, tmp_path: Path) -> None:
    from medcl.drift_check import check, scrape

    with np.load(shared("bloodmnist", "bloodmnist.npz")) as z:
        blood = [_png(im) for im in z["test_images"][-320:]]  # cells the tiny model never saw, same kind
    with running_service(tiny_package, tmp_path / "svc") as url:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        _send(client, blood)
        calm = check(url)
        assert calm["signals"]["confidence"]["images"] == 320 and calm["signals"]["distance"]["images"] == 320
        assert not calm["retrain"], calm
        assert all(s["psi"] < 0.25 for s in calm["signals"].values()), calm

        baseline = scrape(url)
        _send(client, _tissue_tiles(320))
        shifted = check(url, baseline=baseline)
        assert shifted["signals"]["distance"]["images"] == 320  # the window holds the new traffic only
        assert shifted["retrain"] and shifted["signals"]["distance"]["shifted"], shifted

        # The command a scheduler runs: a 4-second window while tissue keeps arriving -> exit 3.
        stop = threading.Event()

        def keep_sending() -> None:
            tiles = _tissue_tiles(64)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
                while not stop.is_set():
                    _send(c, tiles)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        try:
            done = subprocess.run([sys.executable, "-m", "medcl.cli", "drift", "--url", url, "--window", "4",
                                   "--min-images", "50"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        finally:
            stop.set()
            sender.join(timeout=60)
        assert done.returncode == 3, (done.stdout, done.stderr)
        assert json.loads(done.stdout)["retrain"] is True

        bad = subprocess.run([sys.executable, "-m", "medcl.cli", "drift", "--url", url, "--model", "nope"],
                             capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no drift signals for model 'nope'" in bad.stderr


def test_the_ood_threshold_is_set_on_the_validation_split(tiny_run: Path) -> None:
    """The card's out-of-distribution threshold: the 99th percentile of the validation images' distance
    to the training sample (the carried subset's 401 validation images), never the test split's."""
    from medcl.card import Card
    from medcl.drift import nearest_distance, ood_threshold
    from training.config import load_config
    from training.engine import load_trained, prepare_data
    from training.metrics import predict

    card = Card.load(tiny_run)
    assert card.ood is not None and card.ood.images == 401 and card.ood.quantile == 0.99
    model, _ = load_trained(tiny_run)
    data = prepare_data(load_config(REPO_ROOT / "configs" / "demo-bloodmnist.yaml"))
    _, val_emb = predict(model, data.val.images, card.preprocess.mean, card.preprocess.std)
    distance = nearest_distance(val_emb, load_reference(tiny_run).train_embeddings)
    assert card.ood.threshold == pytest.approx(ood_threshold(distance), abs=1e-5)
    assert np.mean(distance > card.ood.threshold) == pytest.approx(0.01, abs=0.006)
    image_distance = load_reference(tiny_run).image_distance(data.val.images)
    assert card.ood.image_threshold == pytest.approx(ood_threshold(image_distance), abs=1e-3)


def test_image_statistics_tell_histology_from_blood_cells(tiny_run: Path) -> None:
    """The second signal, on real images: the blood-cell model's test images sit inside the statistics
    threshold, H&E tiles cropped and resized as the card says fall outside it."""
    from medcl.card import Card
    from medcl.preprocess import decode_image, to_model_pixels

    card = Card.load(tiny_run)
    reference = load_reference(tiny_run)
    with np.load(REPO_ROOT / "demo" / "bloodmnist-demo.npz") as z:
        own = reference.image_distance(z["test_images"])
    tiles = sorted(shared("histology-tiles", "crc-val-he-7k").glob("*.png"))
    he = reference.image_distance(np.stack([to_model_pixels(decode_image(t), card.preprocess) for t in tiles]))
    assert np.mean(own > card.ood.image_threshold) < 0.05
    assert np.mean(he > card.ood.image_threshold) > 0.9


@pytest.mark.parametrize("kind", ["gaussian", "knn"])
def test_statistics_reference_round_trips_and_scores_its_own_kind_low(tmp_path: Path, kind: str) -> None:
    """Both kinds of image-statistics reference, saved and loaded as the package carries them, score
    the same images the same; images unlike the training ones (smooth, one colour) score far higher."""
    from medcl.drift import Reference, StatisticsReference, save_reference

    with np.load(REPO_ROOT / "demo" / "bloodmnist-demo.npz") as z:
        train, test = z["train_images"][:600], z["test_images"][:200]
    stats = StatisticsReference.fit(train, kind=kind, statistics=26)
    unit = np.eye(4, dtype=np.float32)
    save_reference(Reference(unit, np.ones(3, np.float32), np.zeros(3, np.float32), stats), tmp_path)
    loaded = load_reference(tmp_path).statistics
    assert loaded.kind == kind and loaded.statistics == 26
    assert np.allclose(loaded.score(test), stats.score(test), rtol=1e-2, atol=1e-2)
    flat = np.broadcast_to(np.array([200, 120, 90], np.uint8), (20, 28, 28, 3))
    assert np.median(stats.score(flat)) > 3 * np.quantile(stats.score(test), 0.99)


def test_references_written_before_the_statistics_kind_still_load(tmp_path: Path) -> None:
    """A package built by an earlier version carries an unscaled Gaussian of 14 statistics; it loads as one."""
    from medcl.drift import image_statistics

    with np.load(REPO_ROOT / "demo" / "bloodmnist-demo.npz") as z:
        train, test = z["train_images"][:600].astype(np.float32), z["test_images"][:50]
    s = image_statistics(train, 14).astype(np.float64)
    mean, precision = s.mean(0), np.linalg.inv(np.cov(s, rowvar=False) + 1e-6 * np.eye(14))
    np.savez_compressed(tmp_path / "drift_reference.npz", train_embeddings=np.eye(4, dtype=np.float16),
                        confidence=np.ones(3), distance=np.zeros(3), statistics_mean=mean.astype(np.float32),
                        statistics_precision=precision.astype(np.float32))
    loaded = load_reference(tmp_path).statistics
    assert loaded.kind == "gaussian" and loaded.statistics == 14
    z = image_statistics(test, 14) - mean
    expected = np.sqrt(np.einsum("ij,jk,ik->i", z, precision, z))
    assert np.allclose(loaded.score(test), expected, rtol=1e-3)
