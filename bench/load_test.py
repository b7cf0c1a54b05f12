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
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import tree_rss_mb
from bench.report import write_results
from bench.servers import Server, bentoml_service

REPO = Path(__file__).resolve().parent.parent
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


async def run_load(server: Server, pool: list[bytes], concurrency: int, seconds: float) -> tuple[list, list]:
    import httpx

    records: list[tuple[str, int, float]] = []
    memory: list[tuple[float, float]] = []
    names, weights = zip(*MIX)
    start = time.perf_counter()
    stop = start + seconds

    async def client(worker: int) -> None:
        rng = random.Random(worker)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
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
            memory.append((round(time.perf_counter() - start, 1), round(tree_rss_mb(server.pid), 1)))
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
    with tempfile.TemporaryDirectory() as tmp:
        with bentoml_service(args.package.resolve(), Path(tmp)) as server:
            records, memory = asyncio.run(run_load(server, images(), args.concurrency, args.minutes * 60))
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
