"""The model store: register, aliases, promote/rollback with an audit log, and serving the champion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medcl.card import Card


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.setenv("MEDCL_USER", "tester")
    return home


def second_version(package: Path, tmp_path: Path, version: str) -> Path:
    """The same weights under another version, as a later training run would produce."""
    copy = tmp_path / version
    shutil.copytree(package, copy)
    card = Card.load(copy)
    card.version = version
    card.save(copy)
    return copy


def models(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcl.cli", "models", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_register_promote_rollback_and_audit(tiny_package: Path, tmp_path: Path, store: Path) -> None:
    env = dict(os.environ)
    first = json.loads(models("register", str(tiny_package), "--promote", env=env).stdout)["registered"]
    v2 = second_version(tiny_package, tmp_path, "tiny-v2")
    out = models("register", str(v2), env=env)
    second = json.loads(out.stdout)["registered"]
    assert first.startswith("tiny:") and second == "tiny:tiny-v2"

    listing = json.loads(models("list", "--json", env=env).stdout)
    by_tag = {r["tag"]: r for r in listing}
    assert by_tag[first]["aliases"] == ["champion"] and by_tag[second]["aliases"] == []
    assert by_tag[first]["method"] == "s5cl" and len(by_tag[first]["data_fingerprint"]) == 16

    assert models("promote", second, env=env).returncode == 0
    shown = json.loads(models("show", "tiny@champion", env=env).stdout)
    assert shown["version"] == "tiny-v2"

    rolled = json.loads(models("rollback", "tiny", env=env).stdout)
    assert rolled["now"] == first
    assert json.loads(models("show", "tiny", env=env).stdout)["version"] == Card.load(tiny_package).version

    audit = [json.loads(line) for line in models("audit", env=env).stdout.splitlines()]
    assert [a["action"] for a in audit] == ["register", "promote", "register", "promote", "rollback"]
    assert all(a["user"] == "tester" and a["time"] for a in audit)
    assert audit[3]["previous"] == first and audit[3]["to"] == second


def test_store_errors_are_one_line(tiny_package: Path, store: Path) -> None:
    env = dict(os.environ)
    missing = models("show", "nothing", env=env)
    assert missing.returncode == 2 and "no champion" in missing.stderr
    models("register", str(tiny_package), env=env)
    again = models("register", str(tiny_package), env=env)
    assert again.returncode == 2 and "already registered" in again.stderr
    no_history = models("rollback", "tiny", env=env)
    assert no_history.returncode == 2 and "no earlier champion" in no_history.stderr


def test_the_service_resolves_the_champion(tiny_package: Path, tmp_path: Path, store: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from medcl import model_store
    from service.package import ModelPackage, default_package_dir

    tag = model_store.register(tiny_package)
    model_store.promote(tag)
    monkeypatch.delenv("MEDCL_PACKAGE", raising=False)
    monkeypatch.setenv("MEDCL_MODEL", "tiny")
    package = ModelPackage(default_package_dir())
    assert package.card.version == Card.load(tiny_package).version and package.provider == "CPU"
    monkeypatch.setenv("MEDCL_MODEL", "tiny@challenger")
    with pytest.raises(model_store.StoreError, match="no challenger"):
        default_package_dir()
