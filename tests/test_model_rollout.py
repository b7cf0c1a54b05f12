"""A running service follows the model store: promote and rollback reach it without a restart and
without a failed request, and the answers really come from the new weights."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ADMIN_KEY, DEMO_CONFIG, READ_KEY, REPO_ROOT, running_service, shared


@pytest.fixture(scope="module")
def retrained_package(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real version of the tiny model: same config, another seed (a scheduled retrain)."""
    from export.onnx_export import export_onnx
    from training.config import load_config
    from training.engine import train

    time.sleep(1.1)  # versions carry the training time to the second
    out = tmp_path_factory.mktemp("retrain")
    config = load_config(DEMO_CONFIG, {
        "name": "tiny", "seed": 1, "output_dir": str(out), "schedule.steps": 20, "schedule.eval_every": 0,
        "schedule.checkpoint_every": 20, "schedule.unlabelled_batch": 32, "method.pseudo_warmup_steps": 10,
        "model.width": 16})
    return export_onnx(train(config, progress=False), out / "package")


def _store_cli(*args: str, env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "medcl.cli", "models", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr


def test_promote_and_rollback_reach_the_running_service(tiny_package: Path, retrained_package: Path,
                                                        tmp_path: Path) -> None:
    from medcl.card import Card

    photo = sorted(shared("blood-photos").rglob("*.jpg"))[0]
    files = [("images", (photo.name, photo.read_bytes(), "image/jpeg"))]
    v1, v2 = Card.load(tiny_package).version, Card.load(retrained_package).version
    assert v1 != v2
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "store"), MEDCL_USER="tester")
    _store_cli("register", str(tiny_package), env=env)
    _store_cli("promote", f"tiny:{v1}", env=env)

    with running_service(None, tmp_path / "svc", models="blood=tiny", BENTOML_HOME=env["BENTOML_HOME"],
                         MEDCL_FOLLOW_SECONDS="1") as url:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

        def classify() -> tuple[str, list[float]]:
            answer = client.post("/classify", files=files, data={"top_k": "8"})
            assert answer.status_code == 200, answer.text
            row = answer.json()[0]
            probs = {c["label"]: c["probability"] for c in row["top_k"]}
            return row["model_version"], [probs[k] for k in sorted(probs)]

        def wait_for(version: str) -> list[float]:
            deadline = time.time() + 30
            while time.time() < deadline:
                got, probs = classify()
                if got == version:
                    return probs
                time.sleep(0.3)
            raise AssertionError(f"the service did not switch to {version}")

        first_version, p1 = classify()
        assert first_version == v1

        # Requests keep flowing from 4 clients while the store changes under the service.
        failures: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/classify", files=files)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")

        workers = [threading.Thread(target=hammer) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            _store_cli("register", str(retrained_package), env=env)
            _store_cli("promote", f"tiny:{v2}", env=env)
            p2 = wait_for(v2)
            _store_cli("rollback", "tiny", env=env)
            p1_again = wait_for(v1)
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert not failures, failures[:3]
        assert np.abs(np.array(p2) - np.array(p1)).max() > 1e-3, "v2 answered with v1's weights"
        assert np.allclose(p1_again, p1, atol=1e-6), "after rollback the answers must be v1's again"

        models = client.get("/models").json()["models"]
        assert [(m["name"], m["version"]) for m in models] == [("blood", v1)]
        read_only = httpx.post(f"{url}/models/reload", headers={"Authorization": f"Bearer {READ_KEY}"}, timeout=30)
        assert read_only.status_code == 403
        assert client.post("/models/reload").json() == {"changes": []}
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'medcl_model_switches_total{model="blood"} 2.0' in metrics
