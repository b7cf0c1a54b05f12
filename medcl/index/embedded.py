"""The embedded backend: SQLite is the durable record, FAISS the in-memory search structure.

Why this split: SQLite (WAL, synchronous=FULL) makes an acknowledged add survive a SIGKILL or a power
cut, and holds each case's vector, so the FAISS index can always be rebuilt from it. FAISS gives
exact search while the index is small and HNSW (or IVF) once it grows. Other processes that write the
same file (the CLI's bulk build while the service runs) are picked up on the next read through
SQLite's ``data_version``, so every reader sees every committed case.

Rows get AUTOINCREMENT rowids that are never reused; the in-memory arrays are kept in rowid order, and
deletions are recorded in a ``tombstones`` table so a reader catching up knows what went away.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medcl.index.base import CaseIndex
from medcl.index.schema import CaseIndexError, CaseRecord, DuplicateId, SearchFilter, VersionMismatch

log = logging.getLogger("medcl.index")

KINDS = ("auto", "flat", "hnsw", "ivf")
_COLUMNS = ("id", "case_id", "slide_id", "site", "label", "x", "y", "source_uri", "date_ts", "added_ts")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    vector BLOB NOT NULL,
    case_id TEXT, slide_id TEXT, site TEXT, label TEXT, x INTEGER, y INTEGER,
    source_uri TEXT, date_ts REAL, added_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_label ON cases(label);
CREATE INDEX IF NOT EXISTS cases_case ON cases(case_id);
CREATE INDEX IF NOT EXISTS cases_slide ON cases(slide_id);
CREATE INDEX IF NOT EXISTS cases_site ON cases(site);
CREATE INDEX IF NOT EXISTS cases_date ON cases(date_ts);
CREATE INDEX IF NOT EXISTS cases_source ON cases(source_uri);
CREATE TABLE IF NOT EXISTS tombstones (seq INTEGER PRIMARY KEY AUTOINCREMENT, row INTEGER NOT NULL);
"""


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value is not None else None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # an acknowledged add is on disk, not in the OS cache
    return conn


class EmbeddedIndex(CaseIndex):
    """FAISS + SQLite in one folder. ``kind``: auto (flat below ``hnsw_threshold`` cases, HNSW above),
    flat (exact), hnsw or ivf. Filtered searches whose filter leaves at most ``exact_filter_limit``
    cases are answered exactly, since graph search under a tight filter loses recall."""

    def __init__(self, directory: str | os.PathLike[str], model_name: str, model_version: str, dim: int,
                 kind: str = "auto", hnsw_threshold: int = 100_000, exact_filter_limit: int = 50_000,
                 ef_search: int = 128) -> None:
        import faiss  # noqa: F401 - fail early with the import error, not on the first search

        if kind not in KINDS:
            raise CaseIndexError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model_name, self.model_version, self.dim = model_name, model_version, int(dim)
        self.kind, self.hnsw_threshold, self.exact_filter_limit = kind, hnsw_threshold, exact_filter_limit
        self.ef_search = ef_search
        self._lock = threading.RLock()
        self._writer = _connect(self.directory / "cases.sqlite")
        self._writer.executescript(_SCHEMA)
        self._check_meta()
        self._reader = _connect(self.directory / "cases.sqlite")
        self._vecs = np.empty((0, self.dim), np.float32)
        self._n = 0  # used rows of _vecs
        self._rows = np.empty(0, np.int64)
        self._alive = np.empty(0, bool)
        self._last_row = self._last_tomb = 0
        self._data_version: int | None = None
        self._faiss = None
        self._active_kind = "flat"
        with self._lock:
            self._load()

    # ------------------------------------------------------------------ set-up
    def _check_meta(self) -> None:
        want = {"model_name": self.model_name, "model_version": self.model_version, "dim": str(self.dim)}
        with self._writer:
            self._writer.execute("BEGIN IMMEDIATE")
            have = dict(self._writer.execute("SELECT key, value FROM meta").fetchall())
            if not have:
                self._writer.executemany("INSERT INTO meta VALUES (?, ?)", want.items())
        if have and any(have.get(k) != v for k, v in want.items()):
            raise VersionMismatch(f"{self.directory} holds embeddings of {have.get('model_name')} version "
                                  f"{have.get('model_version')} (dim {have.get('dim')}), not of {self.model_name} "
                                  f"version {self.model_version} (dim {self.dim})")

    def _snapshot_paths(self) -> tuple[Path, Path, Path]:
        return self.directory / "vectors.faiss", self.directory / "vectors.rows.npy", self.directory / "vectors.json"

    def _load(self) -> None:
        """Read every case from SQLite; reuse a saved FAISS graph when one matches, else build one."""
        import faiss

        index_path, rows_path, meta_path = self._snapshot_paths()
        snapshot = None
        if meta_path.exists() and index_path.exists() and rows_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("dim") == self.dim and meta.get("kind") in ("hnsw", "ivf") and \
                        self.kind in ("auto", meta["kind"]):
                    index, rows = faiss.read_index(str(index_path)), np.load(rows_path)
                    if index.ntotal == len(rows) and index.d == self.dim:  # both files from the same save
                        snapshot = (index, rows, meta["kind"])
            except Exception as e:  # a damaged snapshot is only a cache: rebuild from SQLite
                log.warning("ignoring the FAISS snapshot in %s (%s); rebuilding from SQLite", self.directory, e)
        self._reader.execute("BEGIN")
        try:
            stored = self._reader.execute("SELECT rowid, vector FROM cases ORDER BY rowid").fetchall()
            tomb = self._reader.execute("SELECT COALESCE(MAX(seq), 0) FROM tombstones").fetchone()[0]
            self._data_version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        finally:
            self._reader.execute("COMMIT")
        vectors = {row: blob for row, blob in stored}
        self._last_tomb = tomb
        self._last_row = stored[-1][0] if stored else 0
        if snapshot is not None:
            index, rows, kind = snapshot
            vecs = np.zeros((len(rows), self.dim), np.float32)
            alive = np.zeros(len(rows), bool)
            for i, row in enumerate(rows.tolist()):
                blob = vectors.get(row)
                if blob is not None:
                    vecs[i] = np.frombuffer(blob, np.float32)
                    alive[i] = True
            newer = [(r, b) for r, b in stored if r > (int(rows[-1]) if len(rows) else 0)]
            self._set_arrays(vecs, rows.astype(np.int64), alive)
            self._set_search_depth(index)
            self._faiss, self._active_kind = index, kind
            if newer:
                self._append(np.array([r for r, _ in newer], np.int64),
                             np.stack([np.frombuffer(b, np.float32) for _, b in newer]))
            log.info("index %s: %d cases, FAISS %s graph from snapshot", self.directory, self.count_alive(), kind)
        else:
            rows = np.array([r for r, _ in stored], np.int64)
            vecs = (np.stack([np.frombuffer(b, np.float32) for _, b in stored]) if stored
                    else np.empty((0, self.dim), np.float32))
            self._set_arrays(vecs, rows, np.ones(len(rows), bool))
            self._rebuild()

    def _set_arrays(self, vecs: np.ndarray, rows: np.ndarray, alive: np.ndarray) -> None:
        self._vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        self._n = len(rows)
        self._rows, self._alive = rows, alive

    def _wanted_kind(self) -> str:
        n = self.count_alive()
        if self.kind == "ivf":
            return "ivf" if n >= 1000 else "flat"  # IVF needs vectors to train its centroids on
        if self.kind != "auto":
            return self.kind
        # Hysteresis: deleting a few cases just under the threshold must not rebuild back and forth.
        threshold = self.hnsw_threshold // 2 if self._active_kind == "hnsw" else self.hnsw_threshold
        return "hnsw" if n >= threshold else "flat"

    def _rebuild(self) -> None:
        """Compact away deleted cases and build the FAISS structure of the wanted kind."""
        import faiss

        keep = self._alive[:self._n]
        self._set_arrays(self._vecs[:self._n][keep], self._rows[:self._n][keep], np.ones(int(keep.sum()), bool))
        kind = self._wanted_kind()
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        elif kind == "ivf":
            nlist = int(min(4 * np.sqrt(self._n), self._n // 39))  # FAISS wants >= 39 points per centroid
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = self._vecs[np.random.default_rng(0).permutation(self._n)[:nlist * 256]]
            index.train(sample)
            index.nprobe = min(32, nlist)
        else:
            index = faiss.IndexFlatIP(self.dim)
        if self._n:
            index.add(self._vecs[:self._n])
        self._set_search_depth(index)
        self._faiss, self._active_kind = index, kind
        if kind != "flat":
            self.save()

    def _set_search_depth(self, index) -> None:
        """Searches without a selector use the index's own setting (FAISS's default efSearch is 16)."""
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = self.ef_search

    def _append(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        need = self._n + len(rows)
        if need > len(self._vecs):  # grow by doubling: bulk builds append thousands of small batches
            cap = max(need, 2 * len(self._vecs), 1024)
            self._vecs = self._grown(self._vecs, cap)
            self._rows = self._grown(self._rows, cap)
            self._alive = self._grown(self._alive, cap)
        self._vecs[self._n:need] = vecs
        self._rows[self._n:need] = rows
        self._alive[self._n:need] = True
        self._n = need
        self._faiss.add(np.ascontiguousarray(vecs))

    def _grown(self, array: np.ndarray, capacity: int) -> np.ndarray:
        out = np.zeros((capacity, *array.shape[1:]), array.dtype)
        out[:self._n] = array[:self._n]
        return out

    def _positions_of(self, rows: np.ndarray) -> np.ndarray:
        """Positions in the arrays of the given rowids that are present and alive."""
        if not self._n or not len(rows):
            return np.empty(0, np.int64)
        pos = np.searchsorted(self._rows[:self._n], rows)
        valid = pos < self._n
        pos, rows = pos[valid], rows[valid]
        pos = pos[self._rows[pos] == rows]
        return pos[self._alive[pos]]

    def count_alive(self) -> int:
        return int(self._alive[:self._n].sum())

    # ------------------------------------------------------------------ catching up with SQLite
    def _sync(self) -> None:
        """Take in what any connection committed since the last look (cheap when nothing changed)."""
        version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._reader.execute("BEGIN")  # one snapshot for both reads
        try:
            new = self._reader.execute("SELECT rowid, vector FROM cases WHERE rowid > ? ORDER BY rowid",
                                       (self._last_row,)).fetchall()
            gone = self._reader.execute("SELECT seq, row FROM tombstones WHERE seq > ? ORDER BY seq",
                                        (self._last_tomb,)).fetchall()
        finally:
            self._reader.execute("COMMIT")
        self._data_version = version
        if new:
            self._append(np.array([r for r, _ in new], np.int64),
                         np.stack([np.frombuffer(b, np.float32) for _, b in new]))
            self._last_row = new[-1][0]
        if gone:
            self._last_tomb = gone[-1][0]
            self._alive[self._positions_of(np.array([r for _, r in gone], np.int64))] = False
        dead = self._n - self.count_alive()
        if dead > max(1000, self._n // 4) or self._wanted_kind() != self._active_kind:
            self._rebuild()

    # ------------------------------------------------------------------ the interface
    def _add(self, vectors: np.ndarray, records: list[CaseRecord]) -> None:
        values = [(r.id, v.tobytes(), r.case_id, r.slide_id, r.site, r.label, r.x, r.y, r.source_uri,
                   _ts(r.date), _ts(r.added_at)) for r, v in zip(records, vectors)]
        with self._lock:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                self._writer.executemany(
                    "INSERT INTO cases (id, vector, case_id, slide_id, site, label, x, y, source_uri, date_ts, "
                    "added_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
                self._writer.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._writer.execute("ROLLBACK")
                taken = self._existing_ids([r.id for r in records])
                raise DuplicateId(f"case id(s) already in the index: {', '.join(taken[:5])}") from None
            except BaseException:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                raise
            self._sync()

    def _existing_ids(self, ids: list[str]) -> list[str]:
        out = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out += [r[0] for r in self._reader.execute(
                f"SELECT id FROM cases WHERE id IN ({','.join('?' * len(chunk))})", chunk)]
        return out

    def _allowed_positions(self, where: SearchFilter) -> np.ndarray:
        clauses, params = [], []
        for column, value in where.equalities().items():
            clauses.append(f"{column} = ?")
            params.append(value)
        if where.date_from is not None:
            clauses.append("date_ts >= ?")
            params.append(_ts(where.date_from))
        if where.date_to is not None:
            clauses.append("date_ts <= ?")
            params.append(_ts(where.date_to))
        rows = np.array([r[0] for r in self._reader.execute(
            f"SELECT rowid FROM cases WHERE {' AND '.join(clauses)} AND rowid <= ?", (*params, self._last_row))],
            np.int64)
        return self._positions_of(rows)

    def _search(self, queries: np.ndarray, k: int, where: SearchFilter) -> list[list[tuple[str, float]]]:
        import faiss

        with self._lock:
            self._sync()
            if where.is_empty():
                dead = np.flatnonzero(~self._alive[:self._n])
                params = None
                if len(dead):
                    params = self._params(faiss.IDSelectorNot(faiss.IDSelectorBatch(dead.astype(np.int64))))
                sims, pos = self._faiss.search(queries, k, params=params)
            else:
                allowed = self._allowed_positions(where)
                if len(allowed) <= self.exact_filter_limit or self._active_kind == "flat":
                    sims, pos = self._exact(queries, allowed, k)
                else:
                    sel = faiss.IDSelectorBatch(allowed.astype(np.int64))
                    sims, pos = self._faiss.search(queries, k, params=self._params(sel))
            rows = [[int(self._rows[p]) for p in row if p >= 0] for row in pos]
            ids = self._ids_of_rows(sorted({r for row in rows for r in row}))
        return [[(ids[r], float(s)) for r, s in zip(row, srow) if r in ids] for row, srow in zip(rows, sims)]

    def _params(self, selector):
        import faiss

        if self._active_kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, 1))
        if self._active_kind == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self._faiss.nprobe)
        return faiss.SearchParameters(sel=selector)

    def _exact(self, queries: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(allowed))
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        sims = queries @ self._vecs[allowed].T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, 1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, 1)
        return np.take_along_axis(sims, top, 1), allowed[top]

    def _ids_of_rows(self, rows: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for i in range(0, len(rows), 500):
            chunk = rows[i:i + 500]
            out.update(self._reader.execute(
                f"SELECT rowid, id FROM cases WHERE rowid IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    @staticmethod
    def _record(row: tuple, model_version: str) -> CaseRecord:
        d = dict(zip(_COLUMNS, row))
        return CaseRecord(id=d["id"], case_id=d["case_id"], slide_id=d["slide_id"], site=d["site"],
                          label=d["label"], x=d["x"], y=d["y"], source_uri=d["source_uri"], date=_dt(d["date_ts"]),
                          added_at=_dt(d["added_ts"]), model_version=model_version)

    def get_many(self, ids: list[str]) -> dict[str, CaseRecord]:
        out: dict[str, CaseRecord] = {}
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for row in self._reader.execute(
                        f"SELECT {', '.join(_COLUMNS)} FROM cases WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                    out[row[0]] = self._record(row, self.model_version)
        return out

    def delete(self, case_id: str) -> bool:
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                found = self._writer.execute("SELECT rowid FROM cases WHERE id = ?", (case_id,)).fetchone()
                if found is not None:
                    self._writer.execute("DELETE FROM cases WHERE rowid = ?", found)
                    self._writer.execute("INSERT INTO tombstones (row) VALUES (?)", found)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._sync()
        return found is not None

    def count(self) -> int:
        with self._lock:
            self._sync()
            return self.count_alive()

    def existing_sources(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._reader.execute("SELECT source_uri FROM cases WHERE source_uri IS NOT NULL")}

    def iter_records(self, batch: int = 1024):
        last = 0
        while True:
            with self._lock:
                rows = self._reader.execute(f"SELECT rowid, {', '.join(_COLUMNS)} FROM cases WHERE rowid > ? "
                                            "ORDER BY rowid LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [self._record(r[1:], self.model_version) for r in rows]

    @property
    def active_kind(self) -> str:
        return self._active_kind

    def save(self) -> None:
        """Write the FAISS graph beside the database so a restart need not rebuild it (a cache only)."""
        import faiss

        if self._active_kind == "flat":
            return
        index_path, rows_path, meta_path = self._snapshot_paths()
        with self._lock:  # temporary names per process: two processes saving at once never share one
            tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
            faiss.write_index(self._faiss, str(tmp))
            os.replace(tmp, index_path)
            with open(rows_path.with_suffix(f".{os.getpid()}.tmp.npy"), "wb") as f:
                np.save(f, self._rows[:self._n])
            os.replace(rows_path.with_suffix(f".{os.getpid()}.tmp.npy"), rows_path)
            meta_tmp = meta_path.with_suffix(f".{os.getpid()}.tmp")
            meta_tmp.write_text(json.dumps({"dim": self.dim, "kind": self._active_kind, "n": self._n}))
            os.replace(meta_tmp, meta_path)

    def close(self, save: bool = True) -> None:
        with self._lock:
            if save:
                self.save()
            self._writer.close()
            self._reader.close()
