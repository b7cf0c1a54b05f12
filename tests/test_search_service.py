"""Similar-case search over real HTTP (/search, /cases) and the `medcl index` commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from medcl.card import Card
from tests.conftest import DEMO_NPZ, REPO_ROOT, shared
from tests.test_service import post_files

CLASSES = ("eosinophil", "neutrophil", "platelet", "erythroblast")


def add_photos(api: httpx.Client, photos: list[Path], labels: list[str], **extra) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    meta = [{"label": label, "case_id": f"case-{i % 5}", "site": "leeds" if i % 2 else "basel", **extra}
            for i, label in enumerate(labels)]
    return api.post("/cases", files=files, data={"metadata": json.dumps(meta)}, timeout=60)


@pytest.fixture(scope="module")
def indexed(api: httpx.Client) -> dict:
    """Real blood-cell photographs added through POST /cases, 6 per class."""
    photos, labels = [], []
    for name in CLASSES:
        found = sorted(shared("blood-photos", name).glob("*.jpg"))
        photos += found[:6]
        labels += [name] * 6
        queries = found[6:8]
    r = add_photos(api, photos, labels)
    assert r.status_code == 200, r.text
    return {"ids": r.json()["ids"], "photos": photos, "labels": labels, "query": queries}


def test_added_photos_can_be_read_back_and_found(api: httpx.Client, indexed: dict) -> None:
    first = api.get(f"/cases/{indexed['ids'][0]}", timeout=30).json()
    assert first["label"] == indexed["labels"][0] and first["source_uri"].startswith("medcl-source:")
    # a photograph that was indexed is its own nearest case
    r = post_files(api, "/search", [indexed["photos"][9]], k=3)
    assert r.status_code == 200, r.text
    hits = r.json()[0]["hits"]
    assert hits[0]["id"] == indexed["ids"][9] and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_search_answers_a_majority_label_and_respects_filters(api: httpx.Client, indexed: dict) -> None:
    r = post_files(api, "/search", indexed["query"], k=5, site="leeds")
    assert r.status_code == 200, r.text
    for result in r.json():
        assert all(h["case"]["site"] == "leeds" for h in result["hits"]) and len(result["hits"]) == 5
        labels = [h["case"]["label"] for h in result["hits"]]
        assert result["majority_share"] == pytest.approx(labels.count(result["majority_label"]) / 5)
    r = post_files(api, "/search", indexed["query"][:1], k=50, label="platelet", case_id="case-2")
    assert {(h["case"]["label"], h["case"]["case_id"]) for h in r.json()[0]["hits"]} == {("platelet", "case-2")}


def test_vectors_from_embed_search_like_images(api: httpx.Client, tiny_package: Path, indexed: dict) -> None:
    vector = post_files(api, "/embed", indexed["photos"][:1]).json()[0]["embedding"]
    version = Card.load(tiny_package).version
    r = api.post("/search", json={"vectors": [vector], "k": 1, "model_version": version}, timeout=30)
    assert r.status_code == 200 and r.json()[0]["hits"][0]["id"] == indexed["ids"][0]
    r = api.post("/search", json={"vectors": [vector], "model_version": "another-version"}, timeout=30)
    assert r.status_code == 409 and "another-version" in r.text


@pytest.mark.parametrize("body, status, message", [
    ({"vectors": [[1.0, 2.0]]}, 400, "dimensions"),
    ({}, 400, "send images"),
    ({"vectors": [[0.1] * 4], "k": 0}, 400, "k"),
    ({"vectors": [[0.1] * 4], "date_from": "yesterday"}, 400, "date_from"),
])
def test_bad_searches_get_a_4xx_with_a_message(api: httpx.Client, body: dict, status: int, message: str) -> None:
    r = api.post("/search", json=body, timeout=30)
    assert r.status_code == status and message in r.text


def test_bad_additions_get_a_4xx_and_add_nothing(api: httpx.Client, indexed: dict) -> None:
    photo = indexed["photos"][:1]
    before = api.get("/metrics", timeout=30).text
    r = add_photos(api, photo * 2, ["basophil"])  # 2 images, 1 metadata entry
    assert r.status_code == 400 and "metadata" in r.text
    r = add_photos(api, photo, ["basophil"], id=indexed["ids"][1])
    assert r.status_code == 409 and indexed["ids"][1] in r.text
    r = add_photos(api, [Path(__file__)], ["basophil"])
    assert r.status_code == 400 and "test_search_service.py" in r.text
    after = api.get("/metrics", timeout=30).text
    gauge = [line for line in after.splitlines() if line.startswith("medcl_index_cases")]
    assert gauge and gauge == [line for line in before.splitlines() if line.startswith("medcl_index_cases")]


def test_delete_removes_a_case(api: httpx.Client, indexed: dict) -> None:
    victim = indexed["ids"][-1]
    assert api.delete(f"/cases/{victim}", timeout=30).status_code == 200
    assert api.get(f"/cases/{victim}", timeout=30).status_code == 404
    assert api.delete(f"/cases/{victim}", timeout=30).status_code == 404
    assert api.get("/cases/bad%20id", timeout=30).status_code == 400
    hits = post_files(api, "/search", [indexed["photos"][-1]], k=3).json()[0]["hits"]
    assert victim not in [h["id"] for h in hits]


# ---------------------------------------------------------------- the CLI
def medcl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_bulk_build_resumes_after_a_kill_and_reembed_switches_versions(tiny_package: Path, tmp_path: Path) -> None:
    env = dict(os.environ, MEDCL_INDEX=f"embedded://{tmp_path / 'index'}")
    data = f"{DEMO_NPZ}:train"
    proc = subprocess.Popen([sys.executable, "-m", "medcl.cli", "index", "build", "--model", str(tiny_package),
                             "--data", data, "--batch-size", "16"], stderr=subprocess.PIPE, text=True, env=env)
    seen, committed = "", 0
    while not committed:  # killed as soon as the progress bar shows committed batches, mid-build
        chunk = proc.stderr.read(16)
        if not chunk:
            break
        seen += chunk
        counts = [int(n) for n in re.findall(r"(\d+)/3000", seen)]
        committed = max([n for n in counts if 0 < n < 3000], default=0)
    assert proc.poll() is None, f"the build ended before it could be interrupted: {seen[-300:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = medcl("index", "build", "--model", str(tiny_package), "--data", data, "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["cases"] == 3000 and result["skipped_already_indexed"] >= committed  # resumed, nothing twice

    # A "new version" of the model: the same weights under another version tag, so the vectors must match.
    new_package = tmp_path / "v2"
    shutil.copytree(tiny_package, new_package)
    card = json.loads((new_package / "card.json").read_text())
    old_version, card["version"] = card["version"], card["version"] + "-v2"
    (new_package / "card.json").write_text(json.dumps(card))
    r = medcl("index", "reembed", "--to", str(new_package), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["cases"] == 3000 and report["from"] == old_version and report["not_reembedded"] == []
    stats = json.loads(medcl("index", "stats", "--model", str(new_package), env=env).stdout)
    assert stats["current_version"] == card["version"] and stats["cases"] == 3000
    assert (tmp_path / "index" / card["name"] / old_version / "cases.sqlite").exists()  # kept for rollback
    photo = next(shared("blood-photos", "platelet").glob("*.jpg"))
    old = json.loads(medcl("index", "search", str(photo), "--model", str(tiny_package), "-k", "3", env=env).stdout)
    new = json.loads(medcl("index", "search", str(photo), "--model", str(new_package), "-k", "3", env=env).stdout)
    assert [h["id"] for h in old["hits"]] == [h["id"] for h in new["hits"]]
    assert new["model_version"] == card["version"]


def test_cli_refuses_bad_input_in_one_line(tiny_package: Path, tmp_path: Path) -> None:
    env = dict(os.environ, MEDCL_INDEX=f"embedded://{tmp_path}")
    for args in (["index", "build", "--model", str(tiny_package), "--data", str(tmp_path / "missing")],
                 ["index", "search", str(REPO_ROOT / "README.md"), "--model", str(tiny_package)],
                 ["index", "reembed", "--to", str(tiny_package)]):
        r = medcl(*args, env=env)
        assert r.returncode == 2 and r.stderr.startswith("medcl: error:") and len(r.stderr.splitlines()) == 1, r.stderr
