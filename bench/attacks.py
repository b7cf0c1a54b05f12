"""Hostile and unlucky clients against a real ``medcl serve``, bounded to run in minutes on loopback.

Each attack returns one row: what was sent, what was observed, and whether that is what the service
must do (``ok``). docs/reliability.md is written from the JSON this writes.

    python -m bench.attacks --out docs/results/reliability-after.json \\
        --models demo-bloodmnist=.medcl/packages/demo-bloodmnist,demo-nuclei=.medcl/packages/demo-nuclei

Sizes are smaller than a determined attacker's (tens of sockets, not thousands) but large enough to
show each failure where it exists: every row was also run against the code before the fixes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import string
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from bench.servers import BENCH_KEY, Server, bentoml_service

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


# -- helpers ------------------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _sum_over_tree(pid: int, measure) -> float:
    total = 0.0
    for p in _tree(pid):
        try:
            total += measure(p)
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss_mb(pid: int) -> float:
    return _sum_over_tree(pid, lambda p: p.memory_info().rss) / 2**20


def tree_cpu_seconds(pid: int) -> float:
    return _sum_over_tree(pid, lambda p: sum(p.cpu_times()[:2]))


class PeakMemory:
    """The largest tree RSS seen while the block runs (sampled every 0.1 s)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        self.before = tree_rss_mb(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def tile_png(size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def he_tile_jpeg(side: int) -> tuple[bytes, str]:
    """A ``side`` x ``side`` H&E image: real MoNuSeg tiles mosaicked where ../shared has them."""
    sources = sorted((SHARED / "monuseg" / "test" / "images").glob("*")) if SHARED.exists() else []
    if sources:
        canvas = Image.new("RGB", (side, side))
        tiles = [Image.open(p).convert("RGB") for p in sources[:4]]
        w, h = tiles[0].size
        for i, y in enumerate(range(0, side, h)):
            for j, x in enumerate(range(0, side, w)):
                canvas.paste(tiles[(i + j) % len(tiles)], (x, y))
        what = "MoNuSeg test tiles mosaicked"
    else:
        rng = np.random.default_rng(0)
        canvas = Image.fromarray(rng.integers(120, 255, (side, side, 3), dtype=np.uint8))
        what = "random pixels (../shared/data/monuseg absent)"
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), what


def shape_of(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return "not JSON"
    if isinstance(body, dict):
        return "{" + ", ".join(sorted(body)) + "}"
    return type(body).__name__


def one_error_shape(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == {"error", "request_id"} and isinstance(body["error"], str)


# -- attacks ------------------------------------------------------------------------------------
def slow_unauthenticated_bodies(server: Server, sockets: int = 270, seconds: float = 15) -> dict:
    host, port = server.url.removeprefix("http://").split(":")
    conns, answered = [], Counter()
    for _ in range(sockets):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.settimeout(0.05)
        conns.append(s)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for s in conns:
                try:
                    s.sendall(b"1\r\nx\r\n")
                except OSError:
                    pass
            stop.wait(2.0)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    statuses: Counter = Counter()
    png = tile_png(28)
    end = time.time() + seconds
    with httpx.Client(timeout=30, headers=AUTH) as client:
        while time.time() < end:
            try:
                statuses[client.post(f"{server.url}/classify", files=[("images", ("a.png", png, "image/png"))]
                                     ).status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
    stop.set()
    t.join()
    for s in conns:
        try:
            head = s.recv(64)
            answered[head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "no answer"] += 1
        except OSError:
            answered["no answer"] += 1
        s.close()
    ok = set(statuses) == {200} and answered.get("401", 0) == sockets
    return {"attack": f"{sockets} unauthenticated sockets sending a chunked body at 1 byte / 2 s, for {seconds:g} s",
            "observed": f"authenticated /classify meanwhile: {dict(statuses)}; the slow sockets got: {dict(answered)}",
            "ok": ok}


def large_unauthenticated_bodies(server: Server, count: int = 3, mb: int = 200) -> dict:
    chunk = b"\0" * (1 << 20)

    def send() -> str:
        def body():
            for _ in range(mb):
                yield chunk
        try:
            r = httpx.post(f"{server.url}/classify", content=body(), timeout=60,
                           headers={"content-type": "application/octet-stream"})
            return str(r.status_code)
        except httpx.HTTPError as e:
            return type(e).__name__

    with PeakMemory(server.pid) as mem, ThreadPoolExecutor(count) as pool:
        results = Counter(pool.map(lambda _: send(), range(count)))
    grew = mem.peak - mem.before
    return {"attack": f"{count} x {mb} MB chunked bodies without a key",
            "observed": f"answers {dict(results)}; service memory {mem.before:.0f} -> peak {mem.peak:.0f} MB "
                        f"(+{grew:.0f})", "ok": grew < 100 and set(results) <= {"401", "RemoteProtocolError",
                                                                                 "WriteError", "ReadError"}}


def search_amplifier(server: Server, dim: int) -> list[dict]:
    rng = np.random.default_rng(0)
    for _ in range(4):  # 1,000 cases in the index, so that k=1000 finds 1,000 hits per query
        r = httpx.post(f"{server.url}/cases", json={"vectors": rng.normal(size=(250, dim)).round(4).tolist()},
                       headers=AUTH, timeout=120)
        r.raise_for_status()
    rows = []
    for queries, k in ((400, 1000), (200, 1000), (3000, 10)):
        vectors = rng.normal(size=(queries, dim)).round(4).tolist()
        with PeakMemory(server.pid) as mem:
            start = time.perf_counter()
            r = httpx.post(f"{server.url}/search", json={"vectors": vectors, "k": k}, headers=AUTH, timeout=120)
            seconds = time.perf_counter() - start
        rows.append({"attack": f"/search with {queries} JSON vectors x k={k} (read key)",
                     "observed": f"{r.status_code}, answer {len(r.content) / 1e6:.2f} MB in {seconds:.1f} s, service "
                                 f"memory +{mem.peak - mem.before:.0f} MB"
                                 + (f": {r.json().get('error', '')[:120]}" if r.status_code >= 400 else ""),
                     "ok": r.status_code == 413 and mem.peak - mem.before < 100})
    return rows


def abandoned_segment(server: Server, method: str, images: int = 2, side: int = 4000, leave_after: float = 5) -> dict:
    data, what = he_tile_jpeg(side)
    files = [("images", (f"big{i}.jpg", data, "image/jpeg")) for i in range(images)]
    cpu0 = tree_cpu_seconds(server.pid)
    try:
        r = httpx.post(f"{server.url}/segment", files=files, data={"method": method}, headers=AUTH,
                       timeout=leave_after)
        return {"attack": f"/segment method={method} on {images} x {side}² tiles", "observed":
                f"answered {r.status_code} within {leave_after:g} s: {r.text[:160]}", "ok": r.status_code < 500}
    except httpx.TimeoutException:
        pass
    left = time.time()
    # idle: the service's CPU use over the last 0.5 s under a tenth of a core
    idle_after = None
    last = tree_cpu_seconds(server.pid)
    while time.time() - left < 60:
        time.sleep(0.5)
        now = tree_cpu_seconds(server.pid)
        if (now - last) / 0.5 < 0.1:
            idle_after = time.time() - left - 0.5
            break
        last = now
    spent = tree_cpu_seconds(server.pid) - cpu0
    observed = (f"client left after {leave_after:g} s; service CPU idle {idle_after:.1f} s later" if idle_after is not None
                else f"client left after {leave_after:g} s; service CPU still busy 60 s later")
    return {"attack": f"/segment method={method} on {images} x {side}² tiles ({what}), client gone after "
                      f"{leave_after:g} s", "observed": f"{observed} ({spent:.0f} CPU-s spent in all)",
            "ok": idle_after is not None and idle_after <= 2.0}


def segment_pixel_cap(server: Server) -> dict:
    data, _ = he_tile_jpeg(4000)
    files = [("images", (f"big{i}.jpg", data, "image/jpeg")) for i in range(3)]
    start = time.perf_counter()
    r = httpx.post(f"{server.url}/segment", files=files, headers=AUTH, timeout=300)
    return {"attack": "/segment on 3 x 4000² tiles in one request",
            "observed": f"{r.status_code} in {time.perf_counter() - start:.1f} s"
                        + (f": {r.json().get('error', '')[:140]}" if r.status_code >= 400 else ""),
            "ok": r.status_code == 413}


def metrics_cardinality(server: Server, requests: int = 5000) -> dict:
    def size() -> tuple[int, float]:
        start = time.perf_counter()
        body = httpx.get(f"{server.url}/metrics", timeout=60).content
        return len(body), time.perf_counter() - start

    before, _ = size()
    rss0 = tree_rss_mb(server.pid)

    def hit(i: int) -> int:
        name = "".join(random.choices(string.ascii_lowercase, k=12))
        with httpx.Client(timeout=30) as c:
            return c.get(f"{server.url}/cases/{name}{i}").status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = Counter(pool.map(hit, range(requests)))
    after, scrape = size()
    return {"attack": f"{requests} unauthenticated GET /cases/<random>",
            "observed": f"answers {dict(statuses)}; /metrics {before / 1e6:.2f} -> {after / 1e6:.2f} MB (scrape "
                        f"{scrape:.2f} s); service memory {rss0:.0f} -> {tree_rss_mb(server.pid):.0f} MB",
            "ok": after < before * 1.5 + 50_000}


def bad_inputs(server: Server, dim: int) -> list[dict]:
    png = tile_png(28)
    rows = []
    r = httpx.post(f"{server.url}/classify", files=[("images", ("a" * 250 + ".png", png, "image/png"))],
                   headers=AUTH, timeout=30)
    rows.append({"attack": "a file named with 250 characters", "observed": f"{r.status_code} {shape_of(r)}",
                 "ok": r.status_code < 500})
    deep = "[" * 5000 + "]" * 5000
    r = httpx.post(f"{server.url}/cases", files=[("images", ("a.png", png, "image/png"))],
                   data={"metadata": deep}, headers=AUTH, timeout=30)
    rows.append({"attack": "a form field nested 5,000 deep", "observed": f"{r.status_code} {r.text[:120]}",
                 "ok": 400 <= r.status_code < 500})
    r = httpx.post(f"{server.url}/search", content=b'{"vectors": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                   headers={**AUTH, "content-type": "application/json"}, timeout=30)
    rows.append({"attack": "a JSON body nested 5,000 deep", "observed": f"{r.status_code} {r.text[:120]}",
                 "ok": 400 <= r.status_code < 500})
    r = httpx.post(f"{server.url}/cases", json={"vectors": [[0.1] * dim], "metadata": [{"x": 10**30}]},
                   headers=AUTH, timeout=30)
    rows.append({"attack": "case metadata x = 10**30", "observed": f"{r.status_code} {r.text[:160]}",
                 "ok": 400 <= r.status_code < 500})
    for uri in ("/etc/shadow", "medcl-source:../../etc/passwd"):
        r = httpx.post(f"{server.url}/cases", json={"vectors": [[0.1] * dim], "metadata": [{"source_uri": uri}]},
                       headers=AUTH, timeout=30)
        rows.append({"attack": f"case metadata source_uri = {uri}", "observed": f"{r.status_code} {r.text[:160]}",
                     "ok": 400 <= r.status_code < 500})
    return rows


def error_shapes(server: Server) -> dict:
    png = tile_png(28)
    cases = {
        "no key": httpx.post(f"{server.url}/classify", files=[("images", ("a.png", png, "image/png"))]),
        "undecodable image": httpx.post(f"{server.url}/classify", files=[("images", ("a.png", b"xx", "image/png"))],
                                        headers=AUTH),
        "top_k=0": httpx.post(f"{server.url}/classify", files=[("images", ("a.png", png, "image/png"))],
                              data={"top_k": "0"}, headers=AUTH),
        "bad base64": httpx.post(f"{server.url}/classify", json={"images_base64": ["!!"]}, headers=AUTH),
        "unknown case": httpx.get(f"{server.url}/cases/nope", headers=AUTH),
        "unknown model": httpx.get(f"{server.url}/cases/nope?model=nope", headers=AUTH),
    }
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # a Content-Length httpx would not send
        s.sendall(f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BENCH_KEY}\r\n"
                  f"Content-Length: {10**12}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    cases["body too large"] = httpx.Response(int(head.split(b" ")[1]), content=body)
    shapes = {name: f"{r.status_code} {shape_of(r)}" for name, r in cases.items()}
    return {"attack": "error bodies of seven kinds of refusal", "observed": "; ".join(f"{k}: {v}" for k, v in shapes.items()),
            "ok": all(one_error_shape(r) for r in cases.values())}


def quiet_4xx_log(server: Server, log: Path, count: int = 50) -> dict:
    before = log.read_text(errors="replace").count("Traceback")
    with httpx.Client(timeout=30, headers=AUTH) as c:
        for i in range(count):
            c.post(f"{server.url}/classify", files=[("images", (f"bad{i}.png", b"not an image", "image/png"))])
    time.sleep(0.5)
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback") - before
    return {"attack": f"{count} undecodable images", "observed": f"{tracebacks} tracebacks in the service log",
            "ok": tracebacks == 0}


def openapi_document(server: Server) -> dict:
    doc = httpx.get(f"{server.url}/docs.json", headers=AUTH, timeout=30).json()
    paths = set(doc.get("paths", {}))
    wanted = {"/classify", "/embed", "/search", "/cases", "/segment", "/models", "/cases/{case_id}"}
    missing = sorted(wanted - paths)
    return {"attack": "the OpenAPI document against the routes served",
            "observed": f"missing: {', '.join(missing) or 'none'}", "ok": not missing}


def second_service_and_orphans(first: Server, models: str, folder: Path, cwd: Path | None = None,
                               **env: str) -> list[dict]:
    """A second service sharing the first one's BENTOML_HOME; then its launcher killed with SIGKILL."""
    rows = []
    shared_home = str(folder / "first" / "bentoml")
    before = httpx.get(f"{first.url}/metrics", timeout=30).text.count("medcl_request_seconds")
    with bentoml_service(None, folder / "second", models, cwd=cwd, BENTOML_HOME=shared_home, **env) as second:
        httpx.get(f"{second.url}/models", headers=AUTH, timeout=30)
        after = httpx.get(f"{first.url}/metrics", timeout=30).text.count("medcl_request_seconds")
        rows.append({"attack": "a second service on the same host with the same BENTOML_HOME",
                     "observed": f"the first service's /metrics: {before} -> {after} request-latency lines",
                     "ok": after >= before > 0})
        launcher = psutil.Process(second.pid)
        workers = launcher.children(recursive=True)
        port = int(second.url.rsplit(":", 1)[1])
        os.kill(second.pid, signal.SIGKILL)
        time.sleep(3)
        alive = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        try:
            ready = httpx.get(f"{second.url}/readyz", timeout=2).status_code
        except httpx.HTTPError:
            ready = "no answer"
        rows.append({"attack": "SIGKILL of the `bentoml serve` launcher only",
                     "observed": f"3 s later: {len(alive)} of {len(workers)} workers alive; /readyz on its port: {ready}",
                     "ok": not alive})
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rows


def run(models: str, out: Path, dim: int, code: Path | None = None) -> list[dict]:
    """``code``: serve another checkout of the repository (e.g. the code before a fix) with this venv."""
    folder = Path(tempfile.mkdtemp(prefix="medcl-attacks-"))
    rows: list[dict] = []
    env = {"PYTHONPATH": str(code.resolve())} if code else {}
    with bentoml_service(None, folder / "first", models, cwd=code, **env) as server:
        log = folder / "first" / "serve.log"
        steps = [
            lambda: [slow_unauthenticated_bodies(server)],
            lambda: [large_unauthenticated_bodies(server)],
            lambda: search_amplifier(server, dim),
            lambda: [abandoned_segment(server, "auto")],
            lambda: [abandoned_segment(server, "network")],
            lambda: [segment_pixel_cap(server)],
            lambda: [metrics_cardinality(server)],
            lambda: bad_inputs(server, dim),
            lambda: [error_shapes(server)],
            lambda: [quiet_4xx_log(server, log)],
            lambda: [openapi_document(server)],
            lambda: second_service_and_orphans(server, models, folder, code, **env),
        ]
        for step in steps:
            try:
                new = step()
            except Exception as e:  # noqa: BLE001 - one attack's failure is a finding, not the end of the run
                new = [{"attack": getattr(step, "__name__", "attack"), "observed": f"the attack itself failed: "
                        f"{type(e).__name__}: {e}", "ok": False}]
            for row in new:
                print(("ok   " if row["ok"] else "FAIL ") + row["attack"] + " -> " + row["observed"], flush=True)
            rows.extend(new)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": models, "code": "checkout at " + str(code) if code else "this checkout",
                               "rows": rows}, indent=1) + "\n")
    return rows


def table(before: Path, after: Path) -> str:
    """A markdown table of two runs' rows, side by side (the attacks are the same, in the same order)."""
    rows_before = {r["attack"]: r for r in json.loads(before.read_text())["rows"]}
    lines = ["| attack | before | after |", "|---|---|---|"]
    for row in json.loads(after.read_text())["rows"]:
        old = rows_before.get(row["attack"])
        cell = lambda r: ("" if r is None else ("ok: " if r["ok"] else "**fails**: ") +  # noqa: E731
                          r["observed"].replace("|", "/")[:220])
        lines.append(f"| {row['attack']} | {cell(old)} | {cell(row)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print the markdown table of two runs' JSON and exit")
    parser.add_argument("--models", help="NAME=PACKAGE,... (a classifier first, then a segmenter)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dim", type=int, default=None, help="embedding size of the classifier (default: its card)")
    parser.add_argument("--code", type=Path, default=None,
                        help="serve another checkout (git worktree) with this environment, e.g. the code before a fix")
    args = parser.parse_args()
    if args.table:
        print(table(*args.table))
        return
    if not args.models or not args.out:
        parser.error("--models and --out are needed to run the attacks")
    dim = args.dim
    if dim is None:
        first = Path(args.models.split(",")[0].split("=", 1)[1])
        dim = json.loads((first / "card.json").read_text())["architecture"]["embedding_dim"]
    run(args.models, args.out, dim, args.code)


if __name__ == "__main__":
    main()
