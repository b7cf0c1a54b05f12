"""The .mar export served by a real TorchServe on loopback gives the BentoML service's answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, shared
from tests.test_service import post_files


@pytest.fixture(scope="module")
def torchserve_url(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    torchserve = shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))
    if not Path(torchserve).exists() or not shutil.which("java"):
        pytest.skip(reason="TorchServe not runnable: runs where torchserve and torch-model-archiver are installed "
                           "(make test does) and Java 11+ is on PATH")
    work = tmp_path_factory.mktemp("torchserve")
    out = subprocess.run([sys.executable, "-m", "medcl.cli", "export", str(tiny_run), "--format", "mar",
                          "--out", str(work / "store")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    mar = Path(json.loads(out.stdout)["mar"])
    ports = [free_port() for _ in range(3)]
    (work / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\ndisable_token_authorization=true\n"
        "install_py_dep_per_model=false\ndefault_workers_per_model=1\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = (work / "ts.log").open("w")
    proc = subprocess.Popen([torchserve, "--start", "--foreground", "--ncs", "--model-store", str(work / "store"),
                             "--models", f"{mar.stem}={mar.name}", "--ts-config", str(work / "config.properties"),
                             "--disable-token-auth"], cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if "Healthy" in httpx.get(f"{url}/ping", timeout=2).text and \
                        httpx.get(f"{url}/models/{mar.stem}", timeout=2).status_code in (200, 404):
                    probe = httpx.post(f"{url}/predictions/{mar.stem}", content=b"x", timeout=30)
                    if probe.status_code != 503:  # 503 while the worker is still starting
                        break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"TorchServe did not start:\n{(work / 'ts.log').read_text()[-3000:]}")
            time.sleep(1)
        yield f"{url}/predictions/{mar.stem}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
