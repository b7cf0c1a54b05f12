"""Shared fixtures: where the real data lives, and a small model trained once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest

from bench.servers import free_port  # noqa: F401 - tests import it from here

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEDCL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEMO_NPZ = REPO_ROOT / "demo" / "bloodmnist-demo.npz"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo-bloodmnist.yaml"


def shared(*parts: str) -> Path:
    """A path in ../shared/data, or a skip that says what is missing (users' machines lack it)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(reason=f"real data not present: {path}; runs where ../shared/data exists (project machines, CI)")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo config shrunk to a minute's training on the carried BloodMNIST subset."""
    from training.config import load_config
    from training.engine import train

    out = tmp_path_factory.mktemp("runs")
    config = load_config(DEMO_CONFIG, {
        "name": "tiny", "output_dir": str(out), "schedule.steps": 40, "schedule.eval_every": 0,
        "schedule.checkpoint_every": 20, "schedule.unlabelled_batch": 32, "method.pseudo_warmup_steps": 20,
        "model.width": 16,
    })
    return train(config, progress=False)


@pytest.fixture(scope="session")
def tiny_package(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_run, tmp_path_factory.mktemp("packages") / "tiny")


# Keys of the test service: two from MEDCL_API_KEYS, more added to its key file by the tests (hot reload).
ADMIN_KEY = "test-admin-key-000000000000"
READ_KEY = "test-read-only-key-0000000000"


@pytest.fixture(scope="session")
def service_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key file the test service watches (hot reload), starting with one write-scoped key."""
    from medcl.auth import add_key_to_file

    path = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    add_key_to_file(path, "writer", ["write"])
    return path


@contextlib.contextmanager
def running_service(package: Path | None, folder: Path, models: str | None = None, **env_extra: str) -> Iterator[str]:
    """A real `medcl serve` (BentoML + onnxruntime) on loopback with its own index; yields its URL.
    ``models`` (NAME=DIR,...) serves several models instead of one package."""
    from bench.servers import bentoml_service

    keys = {"MEDCL_API_KEYS": f"{ADMIN_KEY}:admin,{READ_KEY}:read"}
    with bentoml_service(package, folder, models, **{**keys, **env_extra}) as server:
        yield server.url


@pytest.fixture(scope="session")
def service_url(tiny_package: Path, service_key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """The test service: the tiny package, keys from MEDCL_API_KEYS and a watched key file."""
    with running_service(tiny_package, tmp_path_factory.mktemp("service"),
                         MEDCL_API_KEYS_FILE=str(service_key_file)) as url:
        yield url


@pytest.fixture(scope="session")
def api(service_url: str):
    """An HTTP client of the test service holding an admin key."""
    import httpx

    with httpx.Client(base_url=service_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client


# --- a tiny nuclei segmenter, and a service with the demo's three models (segmentation, histology and
# README tests): the tiny blood-cell model, the tiny segmenter and the carried PatchCamelyon package ---

@pytest.fixture(scope="session")
def segmenter_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from training.nuclei import load_segmenter_config, train_segmenter

    config = load_segmenter_config(REPO_ROOT / "configs" / "demo-nuclei.yaml", {
        "output_dir": str(tmp_path_factory.mktemp("seg-runs")), "name": "tiny-nuclei",
        "schedule.steps": 30, "schedule.eval_every": 10, "schedule.batch": 4, "schedule.crop": 160,
        "schedule.min_steps": 30})
    return train_segmenter(config, progress=False)


@pytest.fixture(scope="session")
def segmenter_package(segmenter_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(segmenter_run, tmp_path_factory.mktemp("seg-packages") / "tiny-nuclei", parity_data=REPO_ROOT / "demo" / "he-tiles")


DEMO_PCAM_PACKAGE = REPO_ROOT / "demo" / "pcam" / "package"


@pytest.fixture(scope="session")
def demo_models_service(tiny_package: Path, segmenter_package: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("demo-models")
    models = f"demo-bloodmnist={tiny_package},demo-nuclei={segmenter_package},demo-pcam={DEMO_PCAM_PACKAGE}"
    with running_service(None, folder, models=models) as url:
        yield url
