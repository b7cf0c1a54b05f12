"""The .mar export served by a real TorchServe on loopback gives the BentoML service's answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.servers import torchserve, torchserve_available
from tests.conftest import shared
from tests.test_service import post_files


@pytest.fixture(scope="module")
def torchserve_url(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    unavailable = torchserve_available()
    if unavailable:
        pytest.skip(reason=f"TorchServe not runnable: {unavailable}")
    work = tmp_path_factory.mktemp("torchserve")
    out = subprocess.run([sys.executable, "-m", "medcl.cli", "export", str(tiny_run), "--format", "mar",
                          "--out", str(work / "store")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    mar = Path(json.loads(out.stdout)["mar"])
    with torchserve(mar, work / "server") as server:
        yield server.url


def test_torchserve_answers_like_the_bentoml_service(torchserve_url: str, api: httpx.Client) -> None:
    photos = sorted(shared("blood-photos").rglob("*.jpg"))[::150]
    bento = post_files(api, "/classify", photos).json()
    for photo, expected in zip(photos, bento):
        r = httpx.post(torchserve_url, content=photo.read_bytes(), timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["label"] == expected["label"] and got["model_version"] == expected["model_version"]
        assert got["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_torchserve_refuses_a_truncated_image_with_400(torchserve_url: str) -> None:
    photo = sorted(shared("blood-photos", "basophil").glob("*.jpg"))[0].read_bytes()
    r = httpx.post(torchserve_url, content=photo[:3000], timeout=60)
    assert r.status_code == 400 and "truncated" in r.text
