"""Several API processes (MEDCL_WORKERS) over one case index: a case added through any worker is read
back through every worker at once, and every worker answers the image routes."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from medcl.card import Card
from tests.conftest import ADMIN_KEY, running_service, shared

WORKERS = 2


@pytest.fixture(scope="module")
def two_workers(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_service(tiny_package, tmp_path_factory.mktemp("workers"), MEDCL_WORKERS=str(WORKERS)) as url:
        yield url


def fresh(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection, so that the kernel hands it to any worker."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        return client.request(method, path, **kwargs)


def test_every_worker_sees_every_write_at_once(two_workers: str, tiny_package: Path) -> None:
    dim = Card.load(tiny_package).architecture.embedding_dim
    rng = np.random.default_rng(0)
    writers: Counter[str] = Counter()
    readers: dict[str, set[str]] = {}
    for n in range(40):
        case = f"worker-case-{n}"
        vector = rng.normal(size=dim)
        added = fresh(two_workers, "POST", "/cases", json={
            "vectors": [(vector / np.linalg.norm(vector)).tolist()], "metadata": [{"id": case, "label": "w"}]})
        acknowledged = time.monotonic()
        assert added.status_code == 200, added.text
        writers[added.headers["x-medcl-worker"]] += 1
        for _ in range(3):  # read back at once, through whichever workers the connections reach
            got = fresh(two_workers, "GET", f"/cases/{case}")
            assert got.status_code == 200 and got.json()["id"] == case, (got.status_code, got.text)
            assert time.monotonic() - acknowledged < 1.0 or got.status_code == 200
            readers.setdefault(got.headers["x-medcl-worker"], set()).add(added.headers["x-medcl-worker"])
        if len(writers) == WORKERS and all(len(v) == WORKERS for v in readers.values()) and len(readers) == WORKERS:
            break
    assert set(writers) == set(readers) == {str(i) for i in range(1, WORKERS + 1)}, (writers, readers)
    # every worker has read cases that every worker wrote
    assert all(written == set(writers) for written in readers.values()), readers
    found: set[str] = set()
    for _ in range(20):  # a search through each worker finds the last case
        r = fresh(two_workers, "POST", "/search", json={"vectors": [(vector / np.linalg.norm(vector)).tolist()],
                                                          "k": 1})
        assert r.status_code == 200 and r.json()[0]["hits"][0]["id"] == case, r.text
        found.add(r.headers["x-medcl-worker"])
        if len(found) == WORKERS:
            break
    assert len(found) == WORKERS


def test_every_worker_classifies(two_workers: str) -> None:
    data = sorted(shared("blood-photos", "eosinophil").glob("*.jpg"))[0].read_bytes()
    answers: dict[str, str] = {}
    for _ in range(40):
        r = fresh(two_workers, "POST", "/classify", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        answers[r.headers["x-medcl-worker"]] = r.json()[0]["label"]
        if len(answers) == WORKERS:
            break
    assert len(answers) == WORKERS and len(set(answers.values())) == 1, answers


def test_a_bad_worker_count_stops_the_start(tiny_package: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="MEDCL_WORKERS"):
        with running_service(tiny_package, tmp_path, MEDCL_WORKERS="lots"):
            pass
