"""Bounded load test of the service on loopback: mixed endpoints at a fixed concurrency for a fixed time.

    python -m bench.load_test --package .medcl/packages/demo-bloodmnist --minutes 5 --concurrency 16 \\
        --out docs/results/load-test

Starts its own `medcl serve` (own index, own keys) so nothing else is touched, then runs
``--concurrency`` clients for ``--minutes``: classify 45%, embed 20%, search 25%, add a case 10%,
each with one real blood-cell photograph (../shared/data/blood-photos, else the demo's tiles).
Records every request's status and latency, and the resident memory of the service's processes
every 5 s. Pass/fail is for the reader, not for CI: zero 5xx, and memory that stops growing
(the last third of the samples within a few percent of each other).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import write_results

REPO = Path(__file__).resolve().parent.parent
KEY = "load-test-key-0000000000000"
MIX = (("classify", 0.45), ("embed", 0.20), ("search", 0.25), ("cases", 0.10))


def images() -> list[bytes]:
    photos = sorted((REPO.parent / "shared" / "data" / "blood-photos").rglob("*.jpg"))
    if photos:
        return [p.read_bytes() for p in photos[::4]]
    from PIL import Image

    with np.load(REPO / "demo" / "bloodmnist-demo.npz") as archive:
        tiles = archive["test_images"][:300]
    out = []
    for t in tiles:
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def tree_rss_mb(root: int) -> float:
    """RSS of a process and all its descendants (BentoML's workers are children, not one group)."""
    parents: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def start_service(package: Path, port: int, folder: Path) -> subprocess.Popen:
    env = dict(os.environ, MEDCL_API_KEYS=f"{KEY}:admin", MEDCL_INDEX=f"embedded://{folder / 'index'}",
               BENTOML_HOME=str(folder / "bentoml"), MEDCL_AUTH="on")
    log = (folder / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "medcl.cli", "serve", "--package", str(package), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"service exited: {(folder / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("service not ready after 180 s")


async def run_load(url: str, pool: list[bytes], concurrency: int, seconds: float, pgid: int) -> tuple[list, list]:
    """``pgid``: the service's root process id (its session leader)."""
    import httpx

    records: list[tuple[str, int, float]] = []
    memory: list[tuple[float, float]] = []
    names, weights = zip(*MIX)
    start = time.perf_counter()
    stop = start + seconds

    async def client(worker: int) -> None:
        rng = random.Random(worker)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            n = 0
            while time.perf_counter() < stop:
                kind = rng.choices(names, weights)[0]
                files = [("images", (f"w{worker}-{n}.jpg", rng.choice(pool), "image/jpeg"))]
                data = {"k": "10"} if kind == "search" else {}
                t0 = time.perf_counter()
                try:
                    r = await http.post(f"/{kind}", files=files, data=data)
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all: counted apart from HTTP errors
                records.append((kind, status, time.perf_counter() - t0))
                n += 1

    async def sample_memory() -> None:
        while time.perf_counter() < stop:
            memory.append((round(time.perf_counter() - start, 1), round(tree_rss_mb(pgid), 1)))
            await asyncio.sleep(5)

    await asyncio.gather(sample_memory(), *(client(w) for w in range(concurrency)))
    return records, memory


def summarise(records: list, memory: list, seconds: float, concurrency: int, package: Path) -> tuple[dict, list[str]]:
    rows = []
    for kind in [*dict(MIX), "all"]:
        picked = [r for r in records if kind == "all" or r[0] == kind]
        lat = np.array([r[2] for r in picked]) * 1000
        statuses: dict[str, int] = {}
        for r in picked:
            statuses[str(r[1])] = statuses.get(str(r[1]), 0) + 1
        rows.append({"endpoint": kind, "requests": len(picked), "per_second": round(len(picked) / seconds, 1),
                     "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
                     "p99_ms": round(float(np.percentile(lat, 99)), 1), "statuses": statuses})
    server_errors = sum(1 for r in records if r[1] >= 500 or r[1] == 0)
    third = memory[len(memory) * 2 // 3:]
    tail_growth = (third[-1][1] - third[0][1]) / third[0][1] if len(third) > 1 else float("nan")
    result = {"package": str(package), "concurrency": concurrency, "seconds": seconds, "cores": os.cpu_count(),
              "server_errors": server_errors, "memory_mb": memory, "memory_growth_last_third": round(tail_growth, 4),
              "rows": rows}
    lines = [f"# Load test: {concurrency} concurrent clients for {seconds / 60:.0f} min (loopback, {os.cpu_count()} cores)",
             "", f"Package `{package.name}`; mixed endpoints (classify 45%, embed 20%, search 25%, add case 10%), one",
             "real photograph per request. Latency is measured by the client, end to end.", "",
             "| endpoint | requests | req/s | p50 ms | p95 ms | p99 ms | statuses |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['endpoint']} | {r['requests']} | {r['per_second']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['p99_ms']} | {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} |")
    lines += ["", f"5xx or no answer: **{server_errors}**. Service memory (all processes, RSS): "
              f"{memory[0][1]:.0f} MB at start, {memory[-1][1]:.0f} MB at the end; over the last third of the run it "
              f"changed by {tail_growth:+.1%}."]
    return result, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, default=Path(".medcl/packages/demo-bloodmnist"))
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from tests.conftest import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_service(args.package.resolve(), port, Path(tmp))
        try:
            records, memory = asyncio.run(run_load(f"http://127.0.0.1:{port}", images(), args.concurrency,
                                                   args.minutes * 60, proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        # What the server said about its failures, kept beside the figures.
        server_log = [line for line in (Path(tmp) / "serve.log").read_text().splitlines()
                      if "Error" in line or "status=5" in line][-40:]
    result, lines = summarise(records, memory, args.minutes * 60, args.concurrency, args.package)
    result["server_log_errors"] = server_log
    write_results(args.out, result, lines, f"python -m bench.load_test --package {args.package} --minutes "
                  f"{args.minutes:g} --concurrency {args.concurrency} --out {args.out}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
