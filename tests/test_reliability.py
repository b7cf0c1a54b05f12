"""Hostile and unlucky clients: the key before the body, caps on amplifiers, work that stops, bounded
metrics, one process group, one error shape, safe inputs. Real HTTP against real services; the same
attacks at larger sizes are bench/attacks.py (docs/reliability.md)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from bench.attacks import he_tile_jpeg, one_error_shape, tile_png, tree_cpu_seconds, tree_rss_mb
from tests.conftest import ADMIN_KEY, READ_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _png() -> tuple[str, bytes, str]:
    return ("a.png", tile_png(28), "image/png")


def _service_pid(url: str) -> int:
    """The launcher of the service listening at ``url`` (the parent of the process holding its port)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            proc = psutil.Process(conn.pid)
            parent = proc.parent()
            return parent.pid if parent and "service.launch" in " ".join(parent.cmdline()) else proc.pid
    pytest.skip(reason="cannot see which process listens on the service's port (no permission)")


# -- units ----------------------------------------------------------------------------------------
def test_error_message_reads_every_shape_the_layers_produce() -> None:
    from service.middleware import error_message

    assert error_message(b'[{"error": "image 0: broken"}]', 400) == "image 0: broken"  # BentoML's handlers
    assert error_message(b'{"error": "no key"}', 401) == "no key"
    validation = json.dumps({"error": "1 validation error for Input",
                             "detail": [{"loc": ["body", "top_k"], "msg": "must be >= 1"}]}).encode()
    assert error_message(validation, 400) == "1 validation error for Input: top_k: must be >= 1"
    assert error_message(b'{"detail": "Not Found"}', 404) == "Not Found"
    assert error_message(b"plain text", 400) == "plain text"
    assert error_message(b"", 502) == "Bad Gateway"


def test_filenames_are_cut_to_what_a_temporary_file_name_holds() -> None:
    from service.hardening import safe_filename

    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("tile\x00\n.png") == "tile.png"
    long = safe_filename("é" * 300 + ".png")
    assert long.endswith(".png") and len(long.encode()) <= 200


def test_client_source_uri_is_a_label_or_a_path_inside_an_allowed_folder(tmp_path: Path) -> None:
    from medcl.index.schema import CaseIndexError
    from medcl.index.sources import check_client_source, read_source

    assert check_client_source("s3://bucket/slide-1/tile-3.png", []) == "s3://bucket/slide-1/tile-3.png"
    assert check_client_source("slide-1/tile-3", []) == "slide-1/tile-3"
    assert check_client_source("medcl-source:" + "a" * 64, []) == "medcl-source:" + "a" * 64
    for hostile in ("/etc/shadow", "file:///etc/shadow", "medcl-source:../../etc/passwd", f"{tmp_path}/../x.png"):
        with pytest.raises(CaseIndexError):
            check_client_source(hostile, [tmp_path])
    inside = tmp_path / "tiles" / "a.png"
    assert check_client_source(str(inside), [tmp_path]) == str(inside.resolve())
    with pytest.raises(CaseIndexError, match="label"):  # a label is never read as a path of the server
        read_source(tmp_path, "etc/passwd")


def test_an_empty_key_file_is_broken_not_an_empty_list(tmp_path: Path) -> None:
    from medcl.auth import AuthConfigError, KeyStore, add_key_to_file, read_key_file

    path = tmp_path / "keys.yaml"
    key = add_key_to_file(path, "reader", ["read"])
    store = KeyStore(file=path)
    assert store.authenticate(key) is not None
    path.write_text("")
    with pytest.raises(AuthConfigError, match="empty"):
        read_key_file(path)
    store._checked = 0.0  # recheck now instead of within the second
    assert store.authenticate(key) is not None, "an emptied key file must keep the last good keys"
    path.write_text("keys: []\n")  # revoking every key is explicit
    store._checked = 0.0
    time.sleep(0.01)
    assert store.authenticate(key) is None


def test_exif_orientation_is_applied_before_preprocessing() -> None:
    from medcl.preprocess import decode_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    shown = np.asarray(decode_image(buf.getvalue()))
    assert shown.shape[:2] == (40, 20)  # portrait, as a viewer shows it
    assert shown[:15].mean() > 200 and shown[-15:].mean() < 50  # the white half now on top


def test_request_state_stops_work_after_disconnect_or_deadline() -> None:
    from service.request_state import CURRENT, ClientGone, RequestState, RequestTimedOut, check_alive

    check_alive()  # outside a request: nothing to stop
    state = RequestState.starting_now(60)
    token = CURRENT.set(state)
    try:
        check_alive()
        state.disconnected.set()
        with pytest.raises(ClientGone):
            check_alive()
        CURRENT.set(RequestState(deadline=time.monotonic() - 1))
        with pytest.raises(RequestTimedOut):
            check_alive()
    finally:
        CURRENT.reset(token)


# -- against the running test service ------------------------------------------------------------
def test_slow_unauthenticated_bodies_do_not_block_authenticated_clients(service_url: str) -> None:
    host, port = service_url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(60):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n1\r\nx\r\n")
        sockets.append(s)
    try:
        statuses = []
        with httpx.Client(base_url=service_url, headers=AUTH, timeout=30) as client:
            for _ in range(10):
                statuses.append(client.post("/classify", files=[("images", _png())]).status_code)
                for s in sockets:  # keep trickling
                    try:
                        s.sendall(b"1\r\nx\r\n")
                    except OSError:
                        pass
        assert statuses == [200] * 10
        for s in sockets:  # every slow client got its 401 without the service waiting for its body
            s.settimeout(5)
            assert s.recv(12).startswith(b"HTTP/1.1 401")
    finally:
        for s in sockets:
            s.close()


def test_large_unauthenticated_bodies_are_refused_before_they_are_read(service_url: str) -> None:
    pid = _service_pid(service_url)
    before = tree_rss_mb(pid)

    def body():
        for _ in range(100):
            yield b"\0" * (1 << 20)

    try:
        r = httpx.post(f"{service_url}/classify", content=body(), timeout=60,
                       headers={"content-type": "application/octet-stream"})
        assert r.status_code == 401
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the service answered 401 and closed while the client was still sending: also right
    assert tree_rss_mb(pid) - before < 60, "an unauthenticated 100 MB body must not be buffered"


def test_amplifiers_are_capped(api: httpx.Client) -> None:
    dim = len(api.post("/embed", files=[("images", _png())]).json()[0]["embedding"])
    r = api.post("/search", json={"vectors": [[0.1] * dim] * 257})
    assert r.status_code == 413 and "vectors" in r.json()["error"]
    r = api.post("/search", json={"vectors": [[0.1] * dim] * 20, "k": 1000})
    assert r.status_code == 413 and "MEDCL_MAX_SEARCH_HITS" in r.json()["error"]
    assert api.post("/search", json={"vectors": [[0.1] * dim] * 2, "k": 5}).status_code == 200


def test_inputs_that_were_500s_are_400s(api: httpx.Client) -> None:
    r = api.post("/classify", files=[("images", ("a" * 250 + ".png", tile_png(28), "image/png"))])
    assert r.status_code == 200 and r.json()[0]["label"]
    r = api.post("/cases", files=[("images", _png())], data={"metadata": "[" * 5000 + "]" * 5000})
    assert r.status_code == 400, r.text
    r = api.post("/search", content=b'{"vectors": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                 headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    dim = api.get("/models").json()["models"][0]["embedding_dim"]
    r = api.post("/cases", files=[("images", _png())], data={"metadata": json.dumps([{"x": 10**30}])})
    assert r.status_code == 400 and "x" in r.json()["error"]
    for uri in ("/etc/shadow", "medcl-source:../../etc/passwd"):
        r = api.post("/cases", json={"vectors": [[0.1] * dim], "metadata": [{"source_uri": uri}]})
        assert r.status_code == 400 and "source_uri" in r.json()["error"], r.text


def test_every_error_has_one_shape(service_url: str, api: httpx.Client) -> None:
    answers = [
        httpx.post(f"{service_url}/classify", files=[("images", _png())]),  # no key: middleware
        api.post("/classify", files=[("images", ("x.png", b"not an image", "image/png"))]),  # handler
        api.post("/classify", files=[("images", _png())], data={"top_k": "0"}),  # validation
        api.post("/classify", json={"images_base64": ["!!"]}),
        api.get("/cases/no-such-case"),  # the Starlette routes
        api.get("/cases/x", params={"model": "nope"}),
        httpx.post(f"{service_url}/cases", headers={"Authorization": f"Bearer {READ_KEY}"}, json={}),  # 403
    ]
    for r in answers:
        assert r.status_code >= 400 and one_error_shape(r), (r.status_code, r.text)
        assert r.json()["request_id"] == r.headers["x-request-id"]


def test_openapi_document_lists_every_route_and_the_error_shape(api: httpx.Client) -> None:
    doc = api.get("/docs.json").json()
    for path in ("/classify", "/embed", "/search", "/cases", "/models", "/models/reload", "/cases/{case_id}"):
        assert path in doc["paths"], path
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "request_id"]
    classify = doc["paths"]["/classify"]["post"]
    assert classify["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert "application/json" in classify["requestBody"]["content"]


def test_client_errors_are_logged_in_one_line(service_url: str, api: httpx.Client, tmp_path: Path) -> None:
    log = _serve_log(service_url)
    before = log.read_text(errors="replace").count("Traceback")
    for i in range(10):
        assert api.post("/classify", files=[("images", (f"b{i}.png", b"junk", "image/png"))]).status_code == 400
    time.sleep(0.5)
    assert log.read_text(errors="replace").count("Traceback") == before


def _serve_log(url: str) -> Path:
    pid = _service_pid(url)
    cmd = psutil.Process(pid).environ().get("MEDCL_INDEX", "")
    folder = Path(cmd.removeprefix("embedded://")).parent
    log = folder / "serve.log"
    if not log.is_file():
        pytest.skip(reason=f"no serve.log beside the service's index ({folder})")
    return log


def test_metrics_stay_bounded_under_random_paths(service_url: str) -> None:
    size = lambda: len(httpx.get(f"{service_url}/metrics", timeout=30).content)  # noqa: E731
    with httpx.Client(base_url=service_url, timeout=30) as warm:
        for i in range(50):
            warm.get(f"/cases/warm{i}")
    before = size()

    def hit(start: int) -> None:
        with httpx.Client(base_url=service_url, timeout=30) as client:
            for i in range(start, 5000, 8):
                client.get(f"/cases/random-{i}-{os.urandom(4).hex()}")

    threads = [threading.Thread(target=hit, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = size()
    assert after < before * 1.05 + 2000, (before, after)


def test_abandoned_segmentation_stops(demo_models_service: str) -> None:
    """A client that leaves a large /segment: the service's CPU falls idle soon after (windows and
    images check the request's state); bench/attacks.py measures how soon at full size."""
    pid = _service_pid(demo_models_service)
    data, _ = he_tile_jpeg(3000)
    files = [("images", (f"big{i}.jpg", data, "image/jpeg")) for i in range(3)]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{demo_models_service}/segment", files=files, data={"method": "network"}, headers=AUTH,
                   timeout=3)
    left = time.monotonic()
    last = tree_cpu_seconds(pid)
    while time.monotonic() - left < 20:
        time.sleep(0.5)
        now = tree_cpu_seconds(pid)
        if now - last < 0.05:
            break
        last = now
    assert time.monotonic() - left < 10, "the service kept computing for an abandoned request"


def test_launcher_killed_takes_its_workers_and_metrics_are_per_service(tiny_package: Path, tmp_path: Path,
                                                                       service_url: str) -> None:
    """A second service sharing BENTOML_HOME leaves the first one's /metrics alone; SIGKILL of its
    launcher ends its workers; a start on a port still in use fails in one line."""
    import subprocess
    import sys

    from bench.servers import bentoml_service

    first = lambda: httpx.get(f"{service_url}/metrics", timeout=30).text.count("medcl_request_seconds")  # noqa: E731
    httpx.get(f"{service_url}/models", headers=AUTH, timeout=30)
    before = first()
    assert before > 0
    home = psutil.Process(_service_pid(service_url)).environ()["BENTOML_HOME"]  # the first service's
    with bentoml_service(tiny_package, tmp_path / "second", BENTOML_HOME=home) as second:
        assert first() >= before, "starting a second service emptied the first one's metrics"
        workers = psutil.Process(second.pid).children(recursive=True)
        assert workers
        port = int(second.url.rsplit(":", 1)[1])
        again = subprocess.run([sys.executable, "-m", "medcl.cli", "serve", "--package", str(tiny_package),
                                "--port", str(port)], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "MEDCL_API_KEYS": f"{ADMIN_KEY}:admin"})
        assert again.returncode != 0 and "already in use" in again.stderr and "Traceback" not in again.stderr
        os.kill(second.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                                  for w in workers):
            time.sleep(0.25)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), \
            "workers outlived their launcher"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{second.url}/readyz", timeout=2)


def test_the_bento_carries_every_serving_dependency() -> None:
    """A containerised Bento installs bentofile.yaml's list: a package the service imports but the list
    lacks fails there at the first request that needs it (shapely, on /segment)."""
    import re
    import tomllib

    import yaml

    root = Path(__file__).resolve().parent.parent
    serve = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    bento = yaml.safe_load((root / "bentofile.yaml").read_text())["python"]["packages"]
    name = lambda spec: re.split(r"[<>=!\[ ]", spec, maxsplit=1)[0].lower()  # noqa: E731
    missing = {name(s) for s in serve} - {name(s) for s in bento} - {"bentoml"}  # the image brings bentoml
    assert not missing, f"bentofile.yaml lacks {sorted(missing)} of pyproject's serve extra"
