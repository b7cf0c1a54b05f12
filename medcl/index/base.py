"""The one interface every case-index backend implements; the contract tests run against each."""

from __future__ import annotations

import abc
import uuid

import numpy as np

from medcl.index.schema import (CaseIndexError, CaseMetadata, CaseRecord, Hit, SearchFilter, SearchResult,
                                VersionMismatch, majority_vote, now_utc)


class CaseIndex(abc.ABC):
    """Embeddings of one model version with their metadata.

    ``add`` returns only once the cases are durable; ``search`` sees every acknowledged case.
    Vectors are L2-normalised on the way in, so similarity is the cosine.
    """

    model_name: str
    model_version: str
    dim: int

    # ---- what a backend implements
    @abc.abstractmethod
    def _add(self, vectors: np.ndarray, records: list[CaseRecord]) -> None: ...

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int, where: SearchFilter) -> list[list[tuple[str, float]]]: ...

    @abc.abstractmethod
    def get_many(self, ids: list[str]) -> dict[str, CaseRecord]: ...

    @abc.abstractmethod
    def delete(self, case_id: str) -> bool:
        """Remove one case; False when it was not there."""

    @abc.abstractmethod
    def count(self) -> int: ...

    @abc.abstractmethod
    def existing_sources(self) -> set[str]:
        """source_uri of every case: what a resumed bulk build skips."""

    @abc.abstractmethod
    def iter_records(self, batch: int = 1024):
        """Every case's record, in batches (lists): what re-embedding reads."""

    def save(self) -> None:  # noqa: B027 - optional for backends
        """After a bulk load: persist whatever makes later searches fast (a graph snapshot, sealed segments).
        Never needed for durability: ``add`` already returned only once its cases were durable."""

    def close(self, save: bool = True) -> None:  # noqa: B027 - optional for backends
        """Release the index; ``save`` first persists what ``save`` does (one of several processes
        sharing an index passes False, so that only one of them writes the snapshot)."""

    # ---- shared behaviour
    def check_version(self, model_version: str | None) -> None:
        if model_version is not None and model_version != self.model_version:
            raise VersionMismatch(f"vectors from model version {model_version} cannot go into (or search) the index "
                                  f"of {self.model_name} version {self.model_version}")

    def _vectors(self, vectors: np.ndarray | list) -> np.ndarray:
        try:
            v = np.asarray(vectors, dtype=np.float32)
        except (ValueError, TypeError):  # ragged rows, or not numbers
            lengths = sorted({len(row) for row in vectors if hasattr(row, "__len__")})
            raise CaseIndexError(f"vectors must be rows of {self.dim} numbers each; got rows of lengths "
                                 f"{lengths[:5]}") from None
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise CaseIndexError(f"vectors must have {self.dim} dimensions (model {self.model_name} "
                                 f"{self.model_version}); got shape {list(v.shape)}")
        if not np.isfinite(v).all():
            raise CaseIndexError("vectors contain NaN or infinite values")
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        if (norms == 0).any():
            raise CaseIndexError("a zero vector has no direction to compare")
        return np.ascontiguousarray(v / norms)

    def add(self, vectors: np.ndarray | list, metadata: list[CaseMetadata] | None = None,
            model_version: str | None = None) -> list[str]:
        """Add cases; returns their ids once durable. Client ids that exist already are refused."""
        self.check_version(model_version)
        v = self._vectors(vectors)
        metadata = metadata if metadata is not None else [CaseMetadata() for _ in range(len(v))]
        if len(metadata) != len(v):
            raise CaseIndexError(f"{len(v)} vectors but {len(metadata)} metadata entries")
        now = now_utc()
        records = [CaseRecord(**{**m.model_dump(), "id": m.id or uuid.uuid4().hex}, model_version=self.model_version,
                              added_at=now) for m in metadata]
        if len({r.id for r in records}) != len(records):
            raise CaseIndexError("the same id appears twice in one request")
        if v.shape[0]:
            self._add(v, records)
        return [r.id for r in records]

    def get(self, case_id: str) -> CaseRecord | None:
        return self.get_many([case_id]).get(case_id)

    def search(self, queries: np.ndarray | list, k: int = 10, where: SearchFilter | None = None,
               model_version: str | None = None) -> list[SearchResult]:
        self.check_version(model_version)
        if not 1 <= k <= 10_000:
            raise CaseIndexError("k must be between 1 and 10000")
        q = self._vectors(queries)
        found = self._search(q, k, where or SearchFilter())
        records = self.get_many(sorted({i for row in found for i, _ in row}))
        out = []
        for row in found:
            # A case deleted between the vector search and the metadata read is dropped, not half-returned.
            hits = [Hit(id=i, similarity=float(s), case=records[i]) for i, s in row if i in records]
            label, share = majority_vote(hits)
            out.append(SearchResult(hits=hits, majority_label=label, majority_share=share,
                                    model_version=self.model_version))
        return out
