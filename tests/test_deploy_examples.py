"""The Kubernetes examples must be valid Kubernetes and match the service they deploy: probe paths, port,
metrics, key file, and the state the service shares with the retrain CronJob."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"


def all_documents() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in sorted(KUBERNETES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_manifests_are_valid_kubernetes(version: str) -> None:
    """Every document against the Kubernetes OpenAPI schema of that version, unknown fields refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    for name, doc in all_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def _state(pod_spec: dict, container: dict) -> tuple[str, str, dict]:
    """(claim, mount path, env) of the volume a container keeps medcl's state on."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mount = next(v for v in container["volumeMounts"] if env.get("BENTOML_HOME", "").startswith(v["mountPath"]))
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    return volume["persistentVolumeClaim"]["claimName"], mount["mountPath"], env


def test_service_and_retrain_job_share_the_model_store_and_the_index() -> None:
    """Promotions reach the service: the CronJob writes the store and the index on the service's volume,
    at the same paths; the service serves the store's champion and follows it; a ReadWriteOnce volume
    means a Recreate Deployment and a job scheduled on the service's node; no HPA that cannot scale."""
    docs = all_documents()
    by_kind = {d["kind"]: d for _, d in docs}
    assert "HorizontalPodAutoscaler" not in by_kind or by_kind["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] > \
        by_kind["HorizontalPodAutoscaler"]["spec"].get("minReplicas", 1)
    deployment, job = by_kind["Deployment"], by_kind["CronJob"]
    pod = deployment["spec"]["template"]["spec"]
    service_claim, service_path, service_env = _state(pod, pod["containers"][0])
    job_pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    job_claim, job_path, job_env = _state(job_pod, job_pod["containers"][0])
    assert (service_claim, service_path) == (job_claim, job_path)
    for name in ("BENTOML_HOME", "MEDCL_INDEX"):
        assert service_env[name] == job_env[name], name
    retrain = yaml.safe_load(by_kind["ConfigMap"]["data"]["retrain.yaml"])
    assert service_env["MEDCL_MODELS"] == f"blood={retrain['model_name']}"  # the champion of what the job promotes
    assert service_env["MEDCL_MODELS_FILE"] == ""  # the Bento's own list would win over MEDCL_MODELS
    assert float(service_env["MEDCL_FOLLOW_SECONDS"]) > 0
    claim = next(d for _, d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == service_claim)
    if claim["spec"]["accessModes"] == ["ReadWriteOnce"]:
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        term = job_pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_seed_step_registers_the_bentos_model_once(tiny_package: Path, tmp_path: Path) -> None:
    """The init container's command, run through the real CLI on an empty store: it registers and
    promotes the Bento's model under the name the service serves; run again, it changes nothing."""
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    bento_models = "/home/bentoml/bento/src/bento-models/"
    script = init["args"][0].replace("python -m medcl.cli", f"{sys.executable} -m medcl.cli")
    assert bento_models + "blood" in script
    script = script.replace(bento_models + "blood", str(tiny_package))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    for run in range(2):
        r = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=300,
                           cwd=REPO_ROOT)
        assert r.returncode == 0, r.stderr
    listed = subprocess.run([sys.executable, "-m", "medcl.cli", "models", "list", "--json"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    import json

    entries = json.loads(listed.stdout)
    assert len(entries) == 1 and entries[0]["tag"].startswith("blood:") and entries[0]["aliases"] == ["champion"], entries


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
