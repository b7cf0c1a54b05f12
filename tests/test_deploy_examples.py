"""The Kubernetes example must match the service it deploys: probe paths, port, metrics, key file."""

from __future__ import annotations

import yaml

from service.middleware import OPEN_PATHS
from tests.conftest import REPO_ROOT


def manifests() -> dict[str, dict]:
    docs = yaml.safe_load_all((REPO_ROOT / "deploy" / "kubernetes" / "medcl.yaml").read_text())
    return {d["kind"]: d for d in docs}


def test_probes_port_and_metrics_are_the_services() -> None:
    m = manifests()
    pod = m["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    probes = {name: container[name]["httpGet"]["path"] for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert set(probes.values()) <= OPEN_PATHS  # probes carry no key, so they must be on open paths
    assert probes["readinessProbe"] == "/readyz" and probes["livenessProbe"] == "/livez"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in OPEN_PATHS
    port = container["ports"][0]["containerPort"]
    assert str(port) == annotations["prometheus.io/port"] == "3000"  # BentoML's default port
    assert m["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == m["Deployment"]["metadata"]["name"]


def test_the_key_file_is_the_mounted_secret() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(v for v in container["volumeMounts"] if v["name"] == "api-keys")
    assert env["MEDCL_API_KEYS_FILE"].startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert any(v["name"] == "api-keys" and "secret" in v for v in pod["volumes"])


def test_the_bento_carries_the_models_it_serves(tiny_package, tmp_path) -> None:
    """`medcl bento build` offline, then the built Bento served from its own copy of the models."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    import httpx
    import pytest

    pytest.importorskip("bentoml")
    from tests.conftest import ADMIN_KEY, free_port

    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    built = subprocess.run([sys.executable, "-m", "medcl.cli", "bento", "build", "--models", f"blood={tiny_package}"],
                           capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    import json

    tag = json.loads(built.stdout.strip().splitlines()[-1])["bento"]
    name, version = tag.split(":")
    src = tmp_path / "bentoml" / "bentos" / name / version / "src"
    carried = src / "bento-models" / "blood" / "model.onnx"
    assert carried.is_file()
    assert hashlib.sha256(carried.read_bytes()).digest() == hashlib.sha256((tiny_package / "model.onnx").read_bytes()).digest()
    bento_yaml = yaml.safe_load((src.parent / "bento.yaml").read_text())
    envs = {e["name"]: e["value"] for e in bento_yaml["envs"]}
    assert envs["MEDCL_MODELS_FILE"] == "/home/bentoml/bento/src/bento-models/models.yaml"
    assert not (src / "training").exists() and not (src / "tests").exists()

    port = free_port()
    serve_env = dict(env, MEDCL_MODELS_FILE=str(src / "bento-models" / "models.yaml"), MEDCL_API_KEYS=ADMIN_KEY,
                     MEDCL_INDEX=f"embedded://{tmp_path / 'index'}", MEDCL_HOME=str(tmp_path / "home"))
    serve_env.pop("MEDCL_PACKAGE", None)
    serve_env.pop("MEDCL_MODELS", None)
    # served by its folder: the tag "medcl:VERSION" would read as module medcl, attribute VERSION
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", str(src.parent), "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"), env=serve_env,
                            start_new_session=True, cwd=tmp_path)
    try:
        import time

        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           timeout=30).json()["models"]
        assert [(m["name"], m["version"]) for m in models] == [("blood", json.loads(
            (tiny_package / "card.json").read_text())["version"])]
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    assert Path(REPO_ROOT / "bento-models" / "models.yaml").is_file()
