"""Similar-case search: one interface (``CaseIndex``), an embedded backend (FAISS + SQLite) and Milvus.

Where an index lives is one URI (``MEDCL_INDEX``):

- unset or ``embedded`` -> FAISS + SQLite under ``$MEDCL_HOME/index`` (no server needed);
- ``embedded:///some/folder`` -> the same, under that folder;
- ``milvus:///path/cases.db`` -> Milvus Lite in a local file; ``http://host:19530`` -> a Milvus cluster.

Each index belongs to one model version (``<root>/<model name>/<version>/``, or one Milvus collection
per version). ``CURRENT`` names the version a model's searches use by default; re-embedding builds
the next version's index beside it and then rewrites that pointer atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medcl.index.base import CaseIndex
from medcl.index.schema import CaseIndexError

__all__ = ["CaseIndex", "CaseIndexError", "open_index", "index_root", "current_version", "set_current_version",
           "stored_dim"]


def index_uri() -> str:
    return os.environ.get("MEDCL_INDEX", "embedded")


def index_root(uri: str | None = None) -> Path:
    """Local folder of the embedded indexes, of the CURRENT pointers and of stored source images."""
    uri = uri or index_uri()
    if uri.startswith("embedded://"):
        return Path(uri[len("embedded://"):]).resolve()
    return (Path(os.environ.get("MEDCL_HOME", ".medcl")) / "index").resolve()


def _safe(part: str) -> str:
    if not part or part in (".", "..") or "/" in part or "\\" in part:
        raise CaseIndexError(f"not a usable model name or version for an index path: {part!r}")
    return part


def open_index(model_name: str, model_version: str, dim: int, uri: str | None = None,
               kind: str | None = None) -> CaseIndex:
    """The index of this model version (created empty if new) on the configured backend."""
    uri = uri or index_uri()
    if uri == "embedded" or uri.startswith("embedded://"):
        from medcl.index.embedded import EmbeddedIndex

        folder = index_root(uri) / _safe(model_name) / _safe(model_version)
        return EmbeddedIndex(folder, model_name, model_version, dim, kind=kind or os.environ.get("MEDCL_INDEX_KIND",
                                                                                                  "auto"))
    if uri.startswith("milvus://"):
        from medcl.index.milvus import MilvusIndex

        path = uri[len("milvus://"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return MilvusIndex(path, model_name, model_version, dim)
    if uri.startswith(("http://", "https://", "tcp://")):
        from medcl.index.milvus import MilvusIndex

        return MilvusIndex(uri, model_name, model_version, dim, token=os.environ.get("MEDCL_MILVUS_TOKEN"))
    raise CaseIndexError(f"MEDCL_INDEX={uri!r} is not an index URI (embedded, embedded:///DIR, milvus:///FILE.db, "
                         "http://HOST:19530)")


def stored_dim(model_name: str, model_version: str, uri: str | None = None) -> int:
    """The embedding dimension of an index that exists already (to reopen it without its package)."""
    uri = uri or index_uri()
    if uri == "embedded" or uri.startswith("embedded://"):
        import sqlite3

        db = index_root(uri) / _safe(model_name) / _safe(model_version) / "cases.sqlite"
        if not db.is_file():
            raise CaseIndexError(f"no index of {model_name} version {model_version} at {db.parent}")
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
    from pymilvus import MilvusClient

    from medcl.index.milvus import collection_name

    client = MilvusClient(uri=uri[len("milvus://"):] if uri.startswith("milvus://") else uri)
    name = collection_name(model_name, model_version)
    if not client.has_collection(name):
        raise CaseIndexError(f"no Milvus collection {name} at {uri}")
    fields = client.describe_collection(name)["fields"]
    return int(next(f["params"]["dim"] for f in fields if f["name"] == "vector"))


def _pointer(model_name: str, uri: str | None) -> Path:
    return index_root(uri) / _safe(model_name) / "CURRENT.json"


def current_version(model_name: str, uri: str | None = None) -> str | None:
    path = _pointer(model_name, uri)
    return json.loads(path.read_text())["version"] if path.is_file() else None


def set_current_version(model_name: str, version: str, uri: str | None = None) -> None:
    """Point the model's searches at another version's index; atomic (rename), so readers see old or new."""
    path = _pointer(model_name, uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": _safe(version)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
