"""Versioned model store: packages in BentoML's model store, plus durable champion/challenger aliases.

BentoML stores versions (``name:version``) with labels but has no aliases, so the aliases live in
``$BENTOML_HOME/medcl/aliases.json`` beside the store, rewritten atomically under a file lock, and
every change is appended to ``audit.jsonl`` (who, when, what, from, to). Rollback walks that
history back. Registering copies the package's files only: loading a model never executes code
(ONNX + JSON, no pickles).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from medcl.card import Card
from medcl.errors import MedclError

ALIASES = ("champion", "challenger")


class StoreError(MedclError, LookupError):
    """A model, version or alias that is not in the store, or an action that cannot apply."""


def _bentoml_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))


def _state_dir() -> Path:
    d = _bentoml_home() / "medcl"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _locked() -> Iterator[dict]:
    """The alias table, locked against concurrent promotions; written back atomically on exit."""
    state = _state_dir()
    with (state / "aliases.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state / "aliases.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        yield table
        fd, tmp = tempfile.mkstemp(dir=state, prefix=".aliases-")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def _audit(action: str, **fields: str | None) -> None:
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "user": os.environ.get("MEDCL_USER") or getpass.getuser(), "action": action, **fields}
    with (_state_dir() / "audit.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _store_name(name: str) -> str:
    return name.lower().replace("_", "-")


def register(package_dir: str | Path, name: str | None = None) -> str:
    """Copy an exported package into the store; returns its tag ``name:version``."""
    import bentoml

    package_dir = Path(package_dir)
    card = Card.load(package_dir)
    if card.onnx is None:
        raise StoreError(f"{package_dir} is a checkpoint, not an exported package; run `medcl export` first")
    tag = f"{_store_name(name or card.name)}:{_store_name(card.version)}"
    try:
        bentoml.models.get(tag)
        raise StoreError(f"{tag} is already registered")
    except bentoml.exceptions.NotFound:
        pass
    labels = {"method": card.method, "dataset": card.data.name, "task": card.task,
              "data_fingerprint": card.data.fingerprint or "unknown"}
    for key in ("accuracy", "macro_f1"):
        if isinstance(card.metrics.get(key), float):
            labels[key] = f"{card.metrics[key]:.4f}"
    with bentoml.models.create(tag, labels=labels, metadata={"card_version": card.version}) as model:
        for f in package_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, model.path_of(f.name))
    _audit("register", tag=tag, source=str(package_dir.resolve()))
    return tag


def _get(tag: str):
    import bentoml

    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise StoreError(f"no model {tag} in the store ({_bentoml_home()})") from None


def aliases_of(name: str) -> dict[str, str]:
    with _locked() as table:
        return dict(table.get(_store_name(name), {}).get("aliases", {}))


def resolve(ref: str) -> Path:
    """``name@champion``, ``name@challenger``, ``name:version`` or ``name`` (= champion) -> package folder."""
    if "@" in ref or ":" not in ref:
        name, _, alias = ref.partition("@")
        alias = alias or "champion"
        if alias not in ALIASES:
            raise StoreError(f"unknown alias {alias!r}; use {' or '.join(ALIASES)}")
        tag = aliases_of(name).get(alias)
        if tag is None:
            raise StoreError(f"model {name} has no {alias}; promote a version first (`medcl models promote`)")
        ref = tag
    return Path(_get(ref).path)


def promote(tag: str, alias: str = "champion") -> str | None:
    """Point ``alias`` at ``tag``; returns the tag it pointed at before (kept for rollback)."""
    if alias not in ALIASES:
        raise StoreError(f"unknown alias {alias!r}; use {' or '.join(ALIASES)}")
    model = _get(tag)
    tag = str(model.tag)
    name = model.tag.name
    with _locked() as table:
        entry = table.setdefault(name, {"aliases": {}, "history": {}})
        previous = entry["aliases"].get(alias)
        if previous == tag:
            return previous
        entry["aliases"][alias] = tag
        if previous:
            entry["history"].setdefault(alias, []).append(previous)
        if alias == "champion" and entry["aliases"].get("challenger") == tag:
            del entry["aliases"]["challenger"]  # a promoted challenger is no longer a challenger
    _audit("promote", name=name, alias=alias, to=tag, previous=previous)
    return previous


def rollback(name: str, alias: str = "champion") -> str:
    """Restore the version ``alias`` pointed at before its last promotion; returns it."""
    name = _store_name(name)
    with _locked() as table:
        entry = table.get(name)
        history = (entry or {}).get("history", {}).get(alias, [])
        if not history:
            raise StoreError(f"model {name} has no earlier {alias} to roll back to")
        current = entry["aliases"].get(alias)
        restored = history.pop()
        entry["aliases"][alias] = restored
    _audit("rollback", name=name, alias=alias, to=restored, previous=current)
    return restored


def list_models() -> list[dict]:
    import bentoml

    rows = []
    tables: dict[str, dict[str, str]] = {}
    for model in bentoml.models.list():
        name = model.tag.name
        if name not in tables:
            tables[name] = aliases_of(name)
        tag = str(model.tag)
        rows.append({"tag": tag, **model.info.labels,
                     "aliases": [a for a, t in tables[name].items() if t == tag],
                     "created": model.info.creation_time.isoformat(timespec="seconds")})
    return sorted(rows, key=lambda r: (r["tag"].split(":")[0], r["created"]))


def audit_log() -> list[dict]:
    path = _state_dir() / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
