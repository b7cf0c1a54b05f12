"""What ``medcl serve`` runs: ``bentoml serve`` with what makes one service one unit on its host.

- **Its own Prometheus directory.** BentoML keeps its multiprocess metrics under
  ``$BENTOML_HOME/prometheus_multiproc_dir`` and wipes that folder when a service starts, so a second
  service on the same host (default ``BENTOML_HOME``) emptied the first one's ``/metrics``. Each
  service gets ``MEDCL_PROMETHEUS_DIR`` (the launcher sets one per port under ``MEDCL_HOME/run``).
- **No start over a live worker.** A worker left from an earlier start (its launcher killed) holds the
  port and answers ``/readyz``; ``port_in_use`` lets the launcher refuse to start in one line instead
  of reporting ready through the old worker.
- How many API processes: ``api_workers`` (MEDCL_WORKERS), read by the launcher to refuse a bad value
  in one line and by the service to start that many.
- Workers end with their launcher: ``exit_with_parent`` (called by every worker process).

    python -m service.launch serve service.service:Medcl --port 3000 ...   # the arguments of bentoml serve
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time

log = logging.getLogger("medcl.service")


class WorkerCountError(ValueError):
    pass


def api_workers() -> int:
    """API processes (MEDCL_WORKERS). Each holds its own inline models and its own readers of the case
    index; they share nothing but the model files and the index's SQLite file, whose writes any worker
    sees on its next read (medcl/index/embedded.py). Default: one per two cores on hosts with more than
    four, where one Python process (its event loop, its GIL) is the limit; one below that. Even on two
    cores a second process serves more (1.47x the single-image requests, docs/benchmarks.md), but each
    holds its own models and answers POST /models/reload alone (the others follow the store on their
    next check), so small hosts opt in with MEDCL_WORKERS=2."""
    explicit = os.environ.get("MEDCL_WORKERS", "").strip()
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise WorkerCountError(f"MEDCL_WORKERS={explicit!r}: a whole number of API processes, at least 1")
        return int(explicit)
    cores = os.cpu_count() or 1
    return cores // 2 if cores > 4 else 1


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (bind without SO_REUSEPORT fails then)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket in TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def exit_with_parent(poll_s: float = 0.5, grace_s: float = 10.0) -> None:
    """End this process when its parent (the ``bentoml serve`` launcher) dies, even by SIGKILL.

    Linux's parent-death signal delivers SIGTERM at once; a watcher thread notices a changed parent
    within ``poll_s`` elsewhere (or if the signal was missed) and sends it too. SIGTERM lets the
    server finish its requests and close the case index; after ``grace_s`` the process exits anyway."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("the service's launcher (pid %d) is gone; this worker (pid %d) stops too", parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="medcl-exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> None:
    directory = os.environ.get("MEDCL_PROMETHEUS_DIR")
    if directory:
        from bentoml._internal.configuration.containers import BentoMLContainer

        BentoMLContainer.prometheus_multiproc_dir.set(directory)
    from bentoml_cli.cli import cli

    cli.main(args=argv, prog_name="bentoml")


if __name__ == "__main__":
    main(sys.argv[1:])
