"""The distributed backend: Milvus through pymilvus's MilvusClient.

The same client speaks to Milvus Lite (an embedded engine in a local ``.db`` file, used by the tests)
and to a Milvus cluster (``http://host:19530``). Milvus holds vectors and metadata together, so it is
this backend's durable record. One collection per model version: versions are never mixed.

Two things Milvus does not do that the interface promises, done here: it does not refuse a primary
key it already holds (we check before inserting, under a process-local lock), and its ``limit`` may not
exceed 16384 per query (iterators page through larger results).
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timezone

import numpy as np

from medcl.index.base import CaseIndex
from medcl.index.schema import CaseIndexError, CaseRecord, DuplicateId, SearchFilter, VersionMismatch

# pymilvus warns on every Milvus Lite iterator that it uses client-side timestamps: expected there.
logging.getLogger("pymilvus").setLevel(logging.ERROR)

_TEXT = ("case_id", "slide_id", "site", "label", "source_uri")
_FIELDS = ["id", *_TEXT, "x", "y", "date_ts", "added_ts"]


def collection_name(model_name: str, model_version: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", f"medcl_{model_name}_{model_version}")
    return name[:255]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MilvusIndex(CaseIndex):
    def __init__(self, uri: str, model_name: str, model_version: str, dim: int, index_type: str = "AUTOINDEX",
                 token: str | None = None) -> None:
        from pymilvus import DataType, MilvusClient

        self.uri, self.model_name, self.model_version, self.dim = uri, model_name, model_version, int(dim)
        self.collection = collection_name(model_name, model_version)
        self._lock = threading.RLock()
        try:
            self._client = MilvusClient(uri=uri, token=token or "")
        except Exception as e:
            raise CaseIndexError(f"cannot reach Milvus at {uri}: {e}") from None
        if self._client.has_collection(self.collection):
            fields = self._client.describe_collection(self.collection)["fields"]
            have = next((f.get("params", {}).get("dim") for f in fields if f["name"] == "vector"), None)
            if have is not None and int(have) != self.dim:
                raise VersionMismatch(f"Milvus collection {self.collection} holds {have}-d vectors, not {self.dim}-d")
        else:
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False,
                                                description=f"medcl cases of {model_name} {model_version}")
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            for name in _TEXT:
                schema.add_field(name, DataType.VARCHAR, max_length=2048 if name == "source_uri" else 256,
                                 nullable=True)
            schema.add_field("x", DataType.INT64, nullable=True)
            schema.add_field("y", DataType.INT64, nullable=True)
            schema.add_field("date_ts", DataType.DOUBLE, nullable=True)
            schema.add_field("added_ts", DataType.DOUBLE)
            params = self._client.prepare_index_params()
            params.add_index("vector", index_type=index_type, metric_type="IP")
            self._client.create_collection(self.collection, schema=schema, index_params=params,
                                           consistency_level="Strong")
        self._client.load_collection(self.collection)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _expr(where: SearchFilter) -> str:
        parts = [f"{k} == {_quote(v)}" for k, v in where.equalities().items()]
        if where.date_from is not None:
            parts.append(f"date_ts >= {where.date_from.timestamp()!r}")
        if where.date_to is not None:
            parts.append(f"date_ts <= {where.date_to.timestamp()!r}")
        return " and ".join(parts)

    @staticmethod
    def _ids_expr(ids: list[str]) -> str:
        return f"id in [{', '.join(_quote(i) for i in ids)}]"

    def _record(self, row: dict) -> CaseRecord:
        def dt(v):
            return datetime.fromtimestamp(v, timezone.utc) if v is not None else None

        return CaseRecord(id=row["id"], **{k: row.get(k) for k in _TEXT}, x=row.get("x"), y=row.get("y"),
                          date=dt(row.get("date_ts")), added_at=dt(row["added_ts"]), model_version=self.model_version)

    # ---------------------------------------------------------------- the interface
    def _add(self, vectors: np.ndarray, records: list[CaseRecord]) -> None:
        rows = [{"id": r.id, "vector": v.tolist(), **{k: getattr(r, k) for k in _TEXT}, "x": r.x, "y": r.y,
                 "date_ts": r.date.timestamp() if r.date else None, "added_ts": r.added_at.timestamp()}
                for r, v in zip(records, vectors)]
        with self._lock:
            taken = list(self.get_many([r.id for r in records]))
            if taken:
                raise DuplicateId(f"case id(s) already in the index: {', '.join(taken[:5])}")
            self._client.insert(self.collection, rows)

    def _search(self, queries: np.ndarray, k: int, where: SearchFilter) -> list[list[tuple[str, float]]]:
        found = self._client.search(self.collection, data=queries.tolist(), limit=min(k, 16384),
                                    filter=self._expr(where), search_params={"metric_type": "IP"})
        return [[(h["id"], float(h["distance"])) for h in row] for row in found]

    def get_many(self, ids: list[str]) -> dict[str, CaseRecord]:
        out: dict[str, CaseRecord] = {}
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            for row in self._client.query(self.collection, filter=self._ids_expr(chunk), output_fields=_FIELDS):
                out[row["id"]] = self._record(row)
        return out

    def delete(self, case_id: str) -> bool:
        with self._lock:
            if not self.get_many([case_id]):
                return False
            self._client.delete(self.collection, filter=self._ids_expr([case_id]))
            return True

    def count(self) -> int:
        return int(self._client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _iterate(self, fields: list[str], batch: int, expr: str = ""):
        it = self._client.query_iterator(self.collection, batch_size=batch, filter=expr, output_fields=fields)
        try:
            while rows := it.next():
                yield rows
        finally:
            it.close()

    def existing_sources(self) -> set[str]:
        return {r["source_uri"] for rows in self._iterate(["source_uri"], 4096, "source_uri is not null")
                for r in rows}

    def iter_records(self, batch: int = 1024):
        for rows in self._iterate(_FIELDS, batch):
            yield [self._record(r) for r in rows]

    def save(self) -> None:
        """Seal the growing segment so Milvus builds its index on it: searches over growing segments
        are brute force (measured on Milvus Lite at 100k: 1.1 s per query before, 0.07-0.15 s after)."""
        with self._lock:
            self._client.flush(self.collection)

    def close(self, save: bool = True) -> None:
        if save:
            self.save()
        self._client.close()
