"""`medcl bento build`: a Bento that carries the models it serves.

BentoML's own model store is made for framework models it loads itself; a medcl package is a plain
folder (model.onnx + card.json), so the Bento carries packages as files: they are copied into
``bento-models/<name>/`` beside ``bento-models/models.yaml`` (the service's MEDCL_MODELS_FILE,
relative paths), and the bentofile includes that folder. The copy is checked against the source
(SHA-256 of every file) before `bentoml build` runs, offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from medcl.errors import MedclError

REPO_ROOT = Path(__file__).resolve().parent.parent
BENTO_MODELS = "bento-models"


class BentoError(MedclError, RuntimeError):
    """The Bento could not be assembled; the message says why."""


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_models(models: dict[str, Path], root: Path = REPO_ROOT, default: str | None = None) -> Path:
    """Copy each package (model.onnx, card.json and variants) into root/bento-models; returns models.yaml."""
    target = root / BENTO_MODELS
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    entries = []
    for name, package in models.items():
        if not (package / "card.json").is_file():
            raise BentoError(f"no model package at {package}")
        dest = target / name
        # Serving needs no training weights (model.safetensors is for warm-start retraining).
        shutil.copytree(package, dest, ignore=shutil.ignore_patterns("trt_cache", ".*", "model.safetensors"))
        source_files = {k: v for k, v in _digest(package).items()
                        if not k.startswith(("trt_cache", ".")) and k != "model.safetensors"}
        if _digest(dest) != source_files:
            raise BentoError(f"the copy of {package} differs from its source")
        entries.append({"name": name, "package": name})
    listing = target / "models.yaml"
    listing.write_text(yaml.safe_dump({"default": default or next(iter(models)), "models": entries}, sort_keys=False))
    return listing


def build_bento(models: dict[str, Path], default: str | None = None) -> str:
    """Stage the models and run `bentoml build` (offline); returns the Bento tag."""
    listing = stage_models(models, default=default)
    # BentoML records the service graph at build time, and each model is its own service, named after
    # it: build with the same model list the Bento will serve.
    env = {k: v for k, v in os.environ.items() if k not in ("MEDCL_MODELS", "MEDCL_PACKAGE", "MEDCL_MODEL")}
    env["MEDCL_MODELS_FILE"] = str(listing)
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", str(REPO_ROOT), "--output", "tag"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise BentoError(f"bentoml build failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
    tag = result.stdout.strip().splitlines()[-1].strip()
    return tag.removeprefix("__tag__:")
