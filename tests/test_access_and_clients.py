"""API keys, request limits, JSON/base64 input, request ids, and the Python and command-line clients,
against the real service (tests/conftest.py starts it with two keys in MEDCL_API_KEYS and a key file)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from medcl.auth import AuthConfigError, KeyStore, add_key_to_file, digest, revoke_key_in_file
from medcl.client import AsyncMedclClient, MedclAPIError, MedclClient
from tests.conftest import ADMIN_KEY, READ_KEY, free_port, shared


def photos(n: int = 3) -> list[Path]:
    # basophils: a class the search tests never index, so what these tests add cannot be their nearest case
    return sorted(shared("blood-photos", "basophil").glob("*.jpg"))[:n]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- keys, in process
def test_key_store_scopes_env_and_file(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    file.write_text(f"keys:\n  - {{name: viewer, sha256: {digest('viewer-key-0123456789')}, scopes: [read]}}\n")
    store = KeyStore("env-admin-key-0123456789,env-writer-key-012345:write", file)
    assert store.authenticate("env-admin-key-0123456789").scopes == {"read", "write", "admin"}
    assert store.authenticate("env-writer-key-012345").scopes == {"read", "write"}
    assert store.authenticate("viewer-key-0123456789").name == "viewer"
    assert store.authenticate("viewer-key-012345678") is None and store.authenticate("") is None


@pytest.mark.parametrize("env, message", [("short", "at least 16"), ("long-enough-key-123456:root", "entry 0")])
def test_bad_key_settings_are_refused_with_a_reason(env: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        KeyStore(env)


def test_a_broken_key_file_keeps_the_last_good_keys(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    key = add_key_to_file(file, "pipeline", ["read"])
    store = KeyStore(None, file)
    store.RECHECK_SECONDS = 0
    assert store.authenticate(key) is not None
    file.write_text("keys: [ {name: x, scopes: [")  # half-written by hand
    assert store.authenticate(key) is not None
    with pytest.raises(AuthConfigError, match="keys.yaml"):
        KeyStore(None, file)  # but a service does not start on it


# ---------------------------------------------------------------- keys over HTTP
@pytest.mark.parametrize("method, path", [("POST", "/classify"), ("POST", "/search"), ("GET", "/cases/abc"),
                                          ("DELETE", "/cases/abc"), ("GET", "/no-such-route"), ("GET", "/docs.json")])
def test_every_endpoint_needs_a_key(service_url: str, method: str, path: str) -> None:
    r = httpx.request(method, f"{service_url}{path}", timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.request(method, f"{service_url}{path}", headers=bearer("not-a-key-of-this-service"), timeout=30)
    assert r.status_code == 401 and "not valid" in r.json()["error"]
    r = httpx.request(method, f"{service_url}{path}", headers={"Authorization": f"Basic {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 401


def test_probes_and_metrics_need_no_key(service_url: str) -> None:
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{service_url}{path}", timeout=30).status_code == 200
    text = httpx.get(f"{service_url}/metrics", timeout=30).text
    assert 'medcl_request_errors_total{endpoint="/classify",kind="unauthenticated"}' in text
    assert 'medcl_request_seconds_count{endpoint="/classify",status_class="4xx"}' in text


def test_read_only_keys_cannot_change_the_index(service_url: str) -> None:
    reader = httpx.Client(base_url=service_url, headers=bearer(READ_KEY), timeout=60)
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos(1)]
    assert reader.post("/search", files=files, data={"k": "3"}).status_code == 200
    r = reader.post("/cases", files=files)
    assert r.status_code == 403 and "'write' scope" in r.json()["error"]
    assert reader.delete("/cases/anything").status_code == 403


def test_keys_are_hot_reloaded_from_the_file(service_url: str, service_key_file: Path) -> None:
    key = add_key_to_file(service_key_file, "added-while-running", ["write"])
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos(1)]

    def status() -> int:
        return httpx.post(f"{service_url}/cases", files=files, data={"metadata": json.dumps([{"label": "basophil"}])},
                          headers=bearer(key), timeout=60).status_code

    deadline = time.time() + 10
    while (code := status()) == 401 and time.time() < deadline:
        time.sleep(0.3)
    assert code == 200
    revoke_key_in_file(service_key_file, "added-while-running")
    deadline = time.time() + 10
    while (code := status()) != 401 and time.time() < deadline:
        time.sleep(0.3)
    assert code == 401


# ---------------------------------------------------------------- limits, JSON input, request ids
def raw_http(url: str, request: bytes) -> bytes:
    where = urlparse(url)
    answer = b""
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(request)
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):  # headers, then the JSON body
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_a_body_above_the_limit_is_refused_before_it_is_read(service_url: str) -> None:
    answer = raw_http(service_url, b"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN_KEY.encode()
                      + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 999999999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"MEDCL_MAX_BODY_BYTES" in answer
    assert answer.lower().count(b"x-request-id") == 1


def test_chunked_bodies_are_limited_too() -> None:
    """The limit also holds for bodies without a Content-Length (the middleware on a minimal app)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from service.middleware import BodyLimitMiddleware

    async def echo(request):
        return PlainTextResponse(str(len(await request.body())))

    app = BodyLimitMiddleware(Starlette(routes=[Route("/", echo, methods=["POST"])]), max_bytes=1000)
    client = TestClient(app)
    assert client.post("/", content=iter([b"x" * 600, b"y" * 300])).text == "900"
    r = client.post("/", content=iter([b"x" * 600, b"y" * 600]))
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]


def test_json_with_base64_answers_like_multipart(api: httpx.Client) -> None:
    ps = photos(2)
    multipart = api.post("/classify", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in ps]).json()
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in ps]
    encoded[1] = "data:image/jpeg;base64," + encoded[1]
    r = api.post("/classify", json={"images_base64": encoded})
    assert r.status_code == 200, r.text
    assert [a["label"] for a in r.json()] == [a["label"] for a in multipart]
    assert r.json()[0]["score"] == pytest.approx(multipart[0]["score"], abs=1e-6)
    r = api.post("/embed", json={"images_base64": encoded[:1]})
    assert r.status_code == 200 and len(r.json()[0]["embedding"]) == r.json()[0]["dim"]


@pytest.mark.parametrize("body, message", [
    ({"images_base64": ["%%%not base64%%%"]}, "images_base64[0] is not valid base64"),
    ({"images_base64": [base64.b64encode(b"plain text, not an image").decode()]}, "images_base64[0]"),
    ({"images_base64": []}, "send at least one image"),
    ({"images": ["/etc/passwd"]}, ""),  # a path in JSON is never read from the server's disk
])
def test_bad_json_input_gets_a_400_with_a_message(api: httpx.Client, body: dict, message: str) -> None:
    r = api.post("/classify", json=body)
    assert r.status_code == 400 and message in r.text, r.text


def test_request_ids_are_returned_and_kept(api: httpx.Client) -> None:
    r = api.post("/classify", json={"images_base64": ["AAAA"]}, headers={"X-Request-ID": "viewer-42"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "viewer-42"
    r = api.get("/livez")
    assert len(r.headers["x-request-id"]) == 32


# ---------------------------------------------------------------- the Python client
def test_python_client_sync_and_async(service_url: str) -> None:
    ps = photos(3)
    with MedclClient(service_url, api_key=ADMIN_KEY) as client:
        labels = [a["label"] for a in client.classify(ps, top_k=2)]
        vectors = [e["embedding"] for e in client.embed(ps)]
        found = client.search(vectors=vectors[:1], k=1)
        added = client.add_cases(ps[:1], metadata=[{"label": "basophil", "case_id": "client-test"}])
        assert client.get_case(added["ids"][0])["case_id"] == "client-test"
        assert client.delete_case(added["ids"][0]) == {"deleted": added["ids"][0]}
    assert len(labels) == 3 and len(found[0]["hits"]) == 1

    async def run() -> list[dict]:
        async with AsyncMedclClient(service_url, api_key=ADMIN_KEY) as client:
            return list(await asyncio.gather(*(client.classify([p], top_k=2) for p in ps)))

    assert [r[0]["label"] for r in asyncio.run(run())] == labels


def test_python_client_errors_are_clear(service_url: str) -> None:
    with MedclClient(service_url, api_key="wrong-key-0000000000") as client:
        with pytest.raises(MedclAPIError, match="HTTP 401: the API key is not valid") as e:
            client.classify(photos(1))
        assert e.value.status == 401 and e.value.request_id
    with MedclClient(service_url, api_key=READ_KEY) as client:
        with pytest.raises(MedclAPIError, match="HTTP 403"):
            client.delete_case("x")
    nobody = f"http://127.0.0.1:{free_port()}"
    with MedclClient(nobody, api_key=ADMIN_KEY, retries=2, backoff=0.01) as client:
        with pytest.raises(MedclAPIError, match="no answer from"):
            client.classify(photos(1))


# ---------------------------------------------------------------- the command line
def medcl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcl.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_predict_and_embed(service_url: str) -> None:
    ps = photos(3)
    out = medcl("predict", *map(str, ps), "--url", service_url, "--api-key", READ_KEY, "--batch-size", "2")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in ps] and all("label" in line for line in lines)
    out = medcl("embed", str(ps[0]), "--url", service_url, "--api-key", READ_KEY)
    assert out.returncode == 0 and len(json.loads(out.stdout)["embedding"]) == json.loads(out.stdout)["dim"]


@pytest.mark.parametrize("args, message", [
    (["--api-key", "wrong-key-0000000000"], "HTTP 401"),
    (["--api-key", READ_KEY, "missing.png"], "no such file: missing.png"),
])
def test_cli_errors_are_one_line(service_url: str, args: list[str], message: str) -> None:
    files = [a for a in args if a.endswith(".png")] or [str(photos(1)[0])]
    out = medcl("predict", *files, "--url", service_url, *[a for a in args if not a.endswith(".png")])
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_keys_new_list_revoke(tmp_path: Path) -> None:
    file = tmp_path / "k.yaml"
    out = medcl("keys", "new", "--name", "viewer", "--scopes", "read", "--file", str(file))
    assert out.returncode == 0 and out.stdout.strip().startswith("medcl_")
    assert file.stat().st_mode & 0o077 == 0  # not readable by others
    assert out.stdout.strip() not in file.read_text()  # only the digest is stored
    assert json.loads(medcl("keys", "list", "--file", str(file)).stdout) == {"name": "viewer", "scopes": ["read"]}
    bad = medcl("keys", "new", "--name", "x", "--scopes", "root", "--file", str(file))
    assert bad.returncode == 2 and "scopes" in bad.stderr
    assert medcl("keys", "revoke", "--name", "viewer", "--file", str(file)).returncode == 0
    assert medcl("keys", "list", "--file", str(file)).stdout == ""
