"""One contract for every case-index backend (embedded FAISS+SQLite, and Milvus through Milvus Lite),
on embeddings of real BloodMNIST tiles, plus what only the embedded backend promises (HNSW, several
processes on one file, a SIGKILL during bulk adds)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from medcl.index import current_version, open_index, set_current_version
from medcl.index.schema import CaseIndexError, CaseMetadata, DuplicateId, SearchFilter, VersionMismatch
from tests.conftest import DEMO_NPZ

SITES = ("leeds", "basel", "utrecht")


@pytest.fixture(scope="module")
def tiles(tiny_package: Path) -> dict:
    """600 real BloodMNIST test tiles embedded by a small trained model, with metadata to filter on."""
    from medcl.index.build import Embedder, items_from
    from medcl.index.sources import read_source

    embedder = Embedder(tiny_package)
    items = items_from(f"{DEMO_NPZ}:test", embedder.card.class_names)[:600]
    vectors = embedder.embed([read_source(Path("/nonexistent"), it.source_uri) for it in items])
    meta = [it.metadata.model_copy(update={"site": SITES[i % 3], "slide_id": f"slide-{i % 20}",
                                           "date": datetime(2024, 1 + i % 12, 1 + i % 28, tzinfo=timezone.utc),
                                           "source_uri": it.source_uri})
            for i, it in enumerate(items)]
    return {"vectors": vectors / np.linalg.norm(vectors, axis=1, keepdims=True), "meta": meta, "dim": embedder.dim}


@pytest.fixture(params=["embedded", "milvus"])
def backend(request, tmp_path: Path) -> str:
    if request.param == "milvus":
        pytest.importorskip("pymilvus",
                            reason="pymilvus missing; runs once `pip install medcl[milvus]` is done (make test does)")
        return f"milvus://{tmp_path / 'milvus.db'}"
    return f"embedded://{tmp_path / 'index'}"


@pytest.fixture
def filled(backend: str, tiles: dict):
    index = open_index("blood", "v1", tiles["dim"], backend)
    ids = index.add(tiles["vectors"], tiles["meta"])
    yield index, ids
    index.close()


def brute_force(tiles: dict, query: np.ndarray, allowed: list[int], k: int) -> list[int]:
    sims = tiles["vectors"][allowed] @ query
    return [allowed[i] for i in np.argsort(-sims)[:k]]


def test_added_cases_come_back_with_their_metadata(filled, tiles: dict) -> None:
    index, ids = filled
    assert index.count() == len(tiles["meta"]) == len(set(ids))
    got = index.get(ids[7])
    want = tiles["meta"][7]
    assert (got.label, got.site, got.slide_id, got.date, got.source_uri) == \
           (want.label, want.site, want.slide_id, want.date, want.source_uri)
    assert got.model_version == "v1" and index.get("no-such-case") is None


def test_search_finds_the_exact_neighbours(filled, tiles: dict) -> None:
    index, ids = filled
    queries = tiles["vectors"][:20]
    for q, result in zip(queries, index.search(queries, k=10)):
        want = brute_force(tiles, q, list(range(len(ids))), 10)
        got = [h.id for h in result.hits]
        assert got[0] == ids[want[0]] and result.hits[0].similarity == pytest.approx(1.0, abs=1e-4)
        assert len(set(got) & {ids[i] for i in want}) >= 9  # exact while small; ties may reorder
        sims = [h.similarity for h in result.hits]
        assert sims == sorted(sims, reverse=True)


def test_majority_vote_is_the_most_common_label_of_the_hits(filled, tiles: dict) -> None:
    index, _ = filled
    for result in index.search(tiles["vectors"][:10], k=15):
        labels = [h.case.label for h in result.hits]
        top = max(set(labels), key=labels.count)
        assert labels.count(result.majority_label) == labels.count(top)
        assert result.majority_share == pytest.approx(labels.count(top) / len(labels))


@pytest.mark.parametrize("where", [
    SearchFilter(label="neutrophil"), SearchFilter(site="basel"), SearchFilter(slide_id="slide-3"),
    SearchFilter(site="leeds", date_from=datetime(2024, 3, 1), date_to=datetime(2024, 6, 30, 23, 59)),
    SearchFilter(label="no-such-label")])
def test_filters_hold_and_keep_the_exact_neighbours(filled, tiles: dict, where: SearchFilter) -> None:
    index, ids = filled

    def allowed(m: CaseMetadata) -> bool:
        return all(getattr(m, k) == v for k, v in where.equalities().items()) and \
            (where.date_from is None or m.date >= where.date_from) and (where.date_to is None or m.date <= where.date_to)

    keep = [i for i, m in enumerate(tiles["meta"]) if allowed(m)]
    result = index.search(tiles["vectors"][5], k=8, where=where)[0]
    assert [h.id for h in result.hits][:1] == [ids[i] for i in brute_force(tiles, tiles["vectors"][5], keep, 1)]
    assert len(result.hits) == min(8, len(keep))
    assert all(allowed(h.case) for h in result.hits)


def test_deleted_cases_are_gone_everywhere(filled, tiles: dict) -> None:
    index, ids = filled
    assert index.delete(ids[0]) is True and index.delete(ids[0]) is False
    assert index.get(ids[0]) is None and index.count() == len(ids) - 1
    hits = index.search(tiles["vectors"][0], k=5)[0].hits
    assert ids[0] not in [h.id for h in hits]
    filtered = index.search(tiles["vectors"][0], k=5, where=SearchFilter(label=tiles["meta"][0].label))[0].hits
    assert ids[0] not in [h.id for h in filtered]


def test_k_beyond_the_index_returns_everything(backend: str, tiles: dict) -> None:
    index = open_index("blood", "v1", tiles["dim"], backend)
    index.add(tiles["vectors"][:3], tiles["meta"][:3])
    assert len(index.search(tiles["vectors"][0], k=50)[0].hits) == 3
    index.close()


def test_bad_additions_are_refused_and_change_nothing(filled, tiles: dict) -> None:
    index, ids = filled
    with pytest.raises(DuplicateId, match=ids[1]):
        index.add(tiles["vectors"][:2], [CaseMetadata(id="fresh-one"), CaseMetadata(id=ids[1])])
    with pytest.raises(CaseIndexError, match="dimensions"):
        index.add(np.ones((1, index.dim + 1), np.float32))
    with pytest.raises(CaseIndexError, match="NaN"):
        index.add(np.full((1, index.dim), np.nan, np.float32))
    with pytest.raises(CaseIndexError, match="rows of"):
        index.add([[0.1] * index.dim, [0.1, 0.2]])
    with pytest.raises(VersionMismatch):
        index.add(tiles["vectors"][:1], model_version="v2")
    with pytest.raises(VersionMismatch):
        index.search(tiles["vectors"][0], model_version="v2")
    assert index.count() == len(ids) and index.get("fresh-one") is None


def test_cases_survive_reopening(backend: str, tiles: dict) -> None:
    index = open_index("blood", "v1", tiles["dim"], backend)
    ids = index.add(tiles["vectors"][:50], tiles["meta"][:50])
    index.delete(ids[3])
    index.close()
    again = open_index("blood", "v1", tiles["dim"], backend)
    assert again.count() == 49 and again.get(ids[4]).label == tiles["meta"][4].label
    assert again.search(tiles["vectors"][10], k=1)[0].hits[0].id == ids[10]
    again.close()


def test_each_model_version_has_its_own_index(backend: str, tiles: dict) -> None:
    v1 = open_index("blood", "v1", tiles["dim"], backend)
    v1.add(tiles["vectors"][:10])
    v2 = open_index("blood", "v2", tiles["dim"], backend)
    assert v2.count() == 0 and v1.count() == 10
    v1.close()
    v2.close()


# ---------------------------------------------------------------- embedded backend only
def test_large_indexes_switch_to_hnsw_and_keep_recall(tmp_path: Path, tiles: dict) -> None:
    """Past the threshold the embedded index becomes an HNSW graph; recall@10 against exact stays high,
    and the graph is saved so a restart need not rebuild it. Vectors: the real embeddings plus noisy
    copies of them (augmentation-like), never uniform noise."""
    rng = np.random.default_rng(0)
    base = tiles["vectors"]
    vectors = np.concatenate([base + 0.05 * rng.normal(size=base.shape).astype(np.float32) for _ in range(8)])
    index = open_index("blood", "v1", tiles["dim"], f"embedded://{tmp_path}", kind="auto")
    index.hnsw_threshold = 3000
    index.add(vectors)
    assert index.active_kind == "hnsw"
    exact = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = base[:50]
    truth = np.argsort(-(q @ exact.T), axis=1)[:, :10]
    ids = [r.id for batch in index.iter_records() for r in batch]
    got = index.search(q, k=10)
    recall = np.mean([len({h.id for h in res.hits} & {ids[j] for j in row}) / 10 for res, row in zip(got, truth)])
    assert recall >= 0.95
    index.close()
    assert (tmp_path / "blood" / "v1" / "vectors.faiss").exists()
    again = open_index("blood", "v1", tiles["dim"], f"embedded://{tmp_path}", kind="auto")
    assert again.active_kind == "hnsw" and again.count() == len(vectors)
    again.close()


def test_another_process_sees_every_committed_case(tmp_path: Path, tiles: dict) -> None:
    uri = f"embedded://{tmp_path}"
    reader = open_index("blood", "v1", tiles["dim"], uri)
    writer = open_index("blood", "v1", tiles["dim"], uri)  # a second connection, as another process has
    ids = writer.add(tiles["vectors"][:30], tiles["meta"][:30])
    assert reader.count() == 30 and reader.search(tiles["vectors"][12], k=1)[0].hits[0].id == ids[12]
    writer.delete(ids[12])
    assert ids[12] not in [h.id for h in reader.search(tiles["vectors"][12], k=3)[0].hits]
    reader.close()
    writer.close()


def test_readers_during_writes_get_consistent_answers(tmp_path: Path, tiles: dict) -> None:
    index = open_index("blood", "v1", tiles["dim"], f"embedded://{tmp_path}")
    problems: list[str] = []
    done = threading.Event()

    def read() -> None:
        last = 0
        while not done.is_set():
            n = index.count()
            result = index.search(tiles["vectors"][0], k=5)[0]
            if n < last:
                problems.append(f"count went back from {last} to {n}")
            if any(h.case is None or h.case.model_version != "v1" for h in result.hits):
                problems.append("a hit without its record")
            last = n

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(0, 600, 20):
        index.add(tiles["vectors"][i:i + 20], tiles["meta"][i:i + 20])
    done.set()
    for t in readers:
        t.join()
    assert not problems and index.count() == 600
    index.close()


def case_vector(vectors: np.ndarray, j: int) -> np.ndarray:
    """The vector the writer adds as case c<j>: a real embedding, nudged so that each case is unique."""
    return vectors[j % len(vectors)] + 0.01 * np.random.default_rng(j).normal(size=vectors.shape[1]).astype(np.float32)


WRITER = """
import sys, json, numpy as np
from medcl.index import open_index
from medcl.index.schema import CaseMetadata
from tests.test_search_index import case_vector
vectors = np.load(sys.argv[2])
index = open_index("blood", "v1", vectors.shape[1], sys.argv[1])
start = int(sys.argv[3])
for i in range(start, start + 10**6, 8):  # runs until killed
    batch = np.stack([case_vector(vectors, j) for j in range(i, i + 8)])
    ids = index.add(batch, [CaseMetadata(id=f"c{j}") for j in range(i, i + 8)])
    print(json.dumps(ids), flush=True)  # acknowledged: add() returned
"""


def test_sigkill_during_bulk_adds_loses_nothing_acknowledged(tmp_path: Path, tiles: dict) -> None:
    uri = f"embedded://{tmp_path / 'index'}"
    np.save(tmp_path / "v.npy", tiles["vectors"][:592])
    rng = np.random.default_rng(1)
    acked: list[str] = []
    killed_mid_way = False
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, uri, str(tmp_path / "v.npy"), str(round_ * 10**6)],
                                stdout=subprocess.PIPE, text=True, env=env)
        deadline = None
        while deadline is None or time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked += json.loads(line)
            deadline = deadline or time.time() + float(rng.uniform(0.05, 1.0))  # kill at a random moment
        killed_mid_way = killed_mid_way or proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        acked += [i for line in proc.stdout.read().splitlines() for i in json.loads(line)]
        proc.wait()
    assert acked, "the writer acknowledged nothing before being killed"
    conn = sqlite3.connect(tmp_path / "index" / "blood" / "v1" / "cases.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    index = open_index("blood", "v1", tiles["dim"], uri)
    present = set(index.get_many(acked))
    assert present == set(acked)
    assert index.count() % 8 == 0  # whole batches or nothing: no half-written add
    assert killed_mid_way, "the writer finished before every kill: the test did not test anything"
    vectors = np.load(tmp_path / "v.npy")
    for case in rng.choice(acked, size=20, replace=False):
        assert index.search(case_vector(vectors, int(case[1:])), k=1)[0].hits[0].id == case
    index.close()


def test_current_pointer_switches_atomically(tmp_path: Path) -> None:
    uri = f"embedded://{tmp_path}"
    assert current_version("blood", uri) is None
    set_current_version("blood", "v1", uri)
    set_current_version("blood", "v2", uri)
    assert current_version("blood", uri) == "v2"
    with pytest.raises(CaseIndexError):
        set_current_version("blood", "../evil", uri)


def test_the_same_image_stored_by_many_threads_at_once(tmp_path) -> None:
    """Concurrent requests posting one image race on its content-addressed file; every one must
    succeed (a shared temporary name once made the loser's rename fail: a 500 under load)."""
    from concurrent.futures import ThreadPoolExecutor

    from medcl.index.sources import store_source

    data = bytes(range(256)) * 4096
    for _ in range(5):
        root = tmp_path / f"r{_}"
        with ThreadPoolExecutor(max_workers=16) as pool:
            uris = list(pool.map(lambda _: store_source(root, data), range(64)))
        assert len(set(uris)) == 1
        stored = list((root / "sources").rglob("*"))
        assert [p.read_bytes() == data for p in stored if p.is_file()] == [True]  # no leftover temporaries
