"""Start the servers a benchmark compares, on loopback, each in its own process group, and stop them.

- ``bentoml_service``: ``medcl serve`` on one package (own index and keys under ``folder``);
- ``torchserve``: TorchServe on a ``.mar`` built by ``medcl export --format mar`` (the same model.onnx
  and preprocessing), one worker, token auth and the management API off.

Both yield a ``Server`` once it answers, and kill the whole process tree on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH_KEY = "bench-key-000000000000000000"


@dataclass
class Server:
    url: str
    pid: int  # the process group leader: its tree is the server's memory
    headers: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it has already ended (a refused start)
                pass
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def bentoml_service(package: Path | None, folder: Path, models: str | None = None, auth: bool = True,
                    cwd: Path | None = None, **env_extra: str) -> Iterator[Server]:
    """``medcl serve`` as a user runs it (API keys on unless ``auth=False``). ``cwd``: where it runs
    (``python -m`` imports from there first: another checkout's code is served from its folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # What to serve comes from the arguments, never from a model list left in the caller's environment.
    env = {k: v for k, v in os.environ.items() if k not in ("MEDCL_MODELS", "MEDCL_MODELS_FILE", "MEDCL_PACKAGE",
                                                             "MEDCL_MODEL")}
    # MEDCL_VARIANT=fp32: the service is compared with onnxruntime and TorchServe running the same fp32
    # graph, not with whichever variant it would pick on this host (the int8 rows are separate).
    env.update({"MEDCL_INDEX": f"embedded://{folder / 'index'}", "BENTOML_HOME": str(folder / "bentoml"),
                "MEDCL_AUTH": "on" if auth else "off", "MEDCL_API_KEYS": f"{BENCH_KEY}:admin",
                "MEDCL_VARIANT": "fp32", **env_extra})
    # The yielded headers carry the bench's key, unless the caller brought its own keys.
    own_key = auth and "MEDCL_API_KEYS" not in env_extra
    cmd = [sys.executable, "-m", "medcl.cli", "serve", "--port", str(port)]
    if models:
        cmd += ["--models", models]
    elif package is not None:  # else the environment names it (MEDCL_MODEL, MEDCL_PACKAGE in env_extra)
        cmd += ["--package", str(package)]
    log = folder / "serve.log"
    if cwd is not None:
        env.setdefault("MEDCL_HOME", str(Path(os.environ.get("MEDCL_HOME", ".medcl")).resolve()))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, log, "medcl serve")
        yield Server(url, proc.pid, {"Authorization": f"Bearer {BENCH_KEY}"} if own_key else {})
    finally:
        _stop(proc)


def torchserve_available() -> str | None:
    """Why TorchServe cannot run here, or None when it can."""
    if not Path(torchserve_executable()).exists():
        return "torchserve is not installed (pip install torchserve torch-model-archiver; `make setup` does)"
    if not shutil.which("java"):
        return "TorchServe needs Java 11+ on PATH"
    return None


def torchserve_executable() -> str:
    return shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))


@contextmanager
def torchserve(mar: Path, folder: Path) -> Iterator[Server]:
    """TorchServe serving one archive; the yielded url is its prediction endpoint for that model."""
    folder.mkdir(parents=True, exist_ok=True)
    store = mar.parent
    ports = [free_port() for _ in range(3)]
    (folder / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\ndisable_token_authorization=true\n"
        "install_py_dep_per_model=false\ndefault_workers_per_model=1\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = folder / "ts.log"
    proc = subprocess.Popen([torchserve_executable(), "--start", "--foreground", "--ncs", "--model-store", str(store),
                             "--models", f"{mar.stem}={mar.name}", "--ts-config", str(folder / "config.properties"),
                             "--disable-token-auth"], cwd=folder, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    base = f"http://127.0.0.1:{ports[0]}"
    predict = f"{base}/predictions/{mar.stem}"

    def ready() -> bool:
        if "Healthy" not in httpx.get(f"{base}/ping", timeout=2).text:
            return False
        return httpx.post(predict, content=b"x", timeout=30).status_code != 503  # 503 while the worker starts

    try:
        _wait(proc, ready, log, "TorchServe")
        yield Server(predict, proc.pid)
    finally:
        _stop(proc)
