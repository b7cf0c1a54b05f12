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
