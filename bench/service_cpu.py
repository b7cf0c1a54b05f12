"""Where the service's CPU goes under load: core-milliseconds per request, by process and by thread.

    python -m bench.service_cpu --package .medcl/packages/demo-bloodmnist --concurrency 32 --seconds 12 \\
        [--form raw] [--env MEDCL_MODEL_PLACEMENT=separate] [--py-spy]

Starts ``medcl serve`` on the package, loads /classify with single real images (closed loop), and
reads each process's and thread's CPU time from /proc before and after, and each process's resident
memory after the load. On a machine this small, CPU per request is the steadier figure: throughput
swings by ±15% from run to run with what the neighbours do, CPU per request much less. ``--py-spy``
also records the API process's Python stacks (py-spy must be installed) and prints where its event
loop spends its time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.http_load import multipart_images, raw_image, run_closed_loop
from bench.servers import bentoml_service
from bench.speed import demo_images

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


def service_processes(root: int) -> dict[int, str]:
    """The server's processes (pid -> short role): ``root`` and its descendants, named by their command
    lines (another service on the host, or one still shutting down, is not counted)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if "service.service:Medcl" not in cmd or not _descends_from(int(pid), root):
            continue
        if "--service-name medcl-model-" in cmd:
            out[int(pid)] = "model process " + cmd.split("--service-name ")[1].split()[0]
        elif "--service-name medcl " in cmd:
            out[int(pid)] = "API process"
        elif int(pid) == root or "bentoml serve" in cmd:
            out[int(pid)] = "supervisor"
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of one process now, in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def thread_cpu(pid: int) -> dict[int, float]:
    return {int(t): _cpu_seconds(Path(f"/proc/{pid}/task/{t}/stat")) for t in os.listdir(f"/proc/{pid}/task")}


def py_spy() -> str | None:
    """py-spy on PATH or beside this interpreter (a virtual environment's bin/)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from py-spy when it is installed."""
    spy = py_spy()
    if not spy:
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    names = {}
    for line in dump.splitlines():
        if line.startswith("Thread "):
            parts = line.split()
            try:
                names[int(parts[1], 0)] = line.split('"')[1] if '"' in line else parts[1]
            except ValueError:
                continue
    return names


def _main_thread_samples(raw: Path) -> Iterator[tuple[list[str], int]]:
    """(frames outermost first, sample count) of each main-thread stack in py-spy's raw output."""
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "MainThread" in stack:
            yield stack.split(";"), int(n)


def _shares(counts: Counter[str], total: int, top: int) -> list[tuple[str, float]]:
    return [(frame, round(n / total, 3)) for frame, n in counts.most_common(top)] if total else []


def event_loop_self_time(raw: Path, top: int = 25) -> list[tuple[str, float]]:
    """Share of the main thread's samples whose innermost frame is in each function (with its file):
    where the event loop's CPU actually goes, not what encloses it."""
    counts: Counter[str] = Counter()
    total = 0
    for frames, n in _main_thread_samples(raw):
        total += n
        name, _, where = frames[-1].partition(" (")
        counts[f"{name} ({where.split('/')[-1].split(':')[0]})"] += n
    return _shares(counts, total, top)


def event_loop_hotspots(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    """Inclusive share of the main thread's samples per frame, from py-spy's raw output."""
    counts: Counter[str] = Counter()
    total = 0
    for frames, n in _main_thread_samples(raw):
        total += n
        # the first frames are the same in every sample (thread, runpy, click, uvicorn, asyncio.run)
        for frame in set(frames[8:]):
            counts[frame.split(" (")[0]] += n
    return _shares(counts, total, top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, default=Path(".medcl/packages/demo-bloodmnist"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="service environment")
    p.add_argument("--py-spy", action="store_true", help="record the API process's stacks too")
    p.add_argument("--form", choices=("multipart", "raw"), default="multipart",
                   help="how each image is sent: a multipart form, or the image as the raw body")
    p.add_argument("--tiles", type=int, default=1, help="images per request (the multipart form only)")
    args = p.parse_args()
    if args.tiles < 1 or (args.tiles > 1 and args.form == "raw"):
        p.error("--tiles: at least 1, and more than 1 only with --form multipart (the raw body is one image)")
    env = dict(item.split("=", 1) for item in args.env)
    images, _ = demo_images()
    if args.form == "raw":
        requests = [raw_image(image[1], image[0]) for image in images]
    else:
        requests = [multipart_images([images[(i + k) % len(images)] for k in range(args.tiles)])
                    for i in range(len(images))]
    with tempfile.TemporaryDirectory() as tmp, bentoml_service(args.package.resolve(), Path(tmp), **env) as server:
        url = f"{server.url}/classify"
        run_closed_loop(url, requests, args.concurrency, 3, server.headers)  # warm-up
        processes = service_processes(server.pid)
        api = next((pid for pid, role in processes.items() if role == "API process"), None)
        before = {pid: _cpu_seconds(Path(f"/proc/{pid}/stat")) for pid in processes}
        threads_before = thread_cpu(api) if api else {}
        spy = None
        if args.py_spy and api and py_spy():
            spy = subprocess.Popen([py_spy(), "record", "-d", str(int(args.seconds)), "-r", "50", "-f", "raw",
                                    "-o", str(Path(tmp) / "api.txt"), "-p", str(api), "-t"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = run_closed_loop(url, requests, args.concurrency, args.seconds, server.headers)
        if spy:
            spy.wait()
        n = max(1, result["requests"])
        per_process = {f"{role} ({pid})": round((_cpu_seconds(Path(f"/proc/{pid}/stat")) - before[pid]) / n * 1000, 2)
                       for pid, role in processes.items()}
        report = {"env": env, "form": args.form, "tiles": args.tiles, "concurrency": args.concurrency, "load": result,
                  "cpu_ms_per_request": {"total": round(sum(per_process.values()), 2), **per_process},
                  "rss_mb_after_load": {f"{role} ({pid})": rss_mb(pid) for pid, role in processes.items()}}
        if api:
            names = thread_names(api)
            after = thread_cpu(api)
            busiest = sorted(((after[t] - threads_before.get(t, 0.0), t) for t in after), reverse=True)[:6]
            report["api_threads_cpu_ms_per_request"] = {f"{names.get(t, 'native')} ({t})": round(s / n * 1000, 2)
                                                        for s, t in busiest}
        if spy and (Path(tmp) / "api.txt").is_file():
            report["event_loop_hotspots"] = event_loop_hotspots(Path(tmp) / "api.txt")
            report["event_loop_self_time"] = event_loop_self_time(Path(tmp) / "api.txt")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
