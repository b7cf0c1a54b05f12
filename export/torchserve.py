"""Package -> TorchServe archive (.mar), for teams that already run TorchServe.

The archive holds the package's ``model.onnx`` and ``card.json``, the handler
(``export/torchserve_handler.py``) and a ``model-config.yaml`` with server-side batching (TorchServe's
management API is off by default, so batching is configured inside the archive).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from medcl.card import Card
from medcl.errors import MedclError

HANDLER = Path(__file__).with_name("torchserve_handler.py")
MODEL_CONFIG = """\
minWorkers: 1
maxWorkers: 1
batchSize: {batch_size}
maxBatchDelay: {max_batch_delay_ms}
responseTimeout: 60
"""


class ArchiveError(MedclError, RuntimeError):
    """torch-model-archiver is missing or failed; the message says which."""


def archive_name(card: Card) -> str:
    return card.name.replace("_", "-")


def build_mar(package_dir: str | Path, out_dir: str | Path, batch_size: int = 8, max_batch_delay_ms: int = 20) -> Path:
    """Write ``out_dir/<name>.mar`` from an exported package; returns its path."""
    package_dir, out_dir = Path(package_dir), Path(out_dir)
    card = Card.load(package_dir)
    if card.onnx is None:
        raise ArchiveError(f"{package_dir} is not an exported package")
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    if not Path(archiver).exists():
        raise ArchiveError("torch-model-archiver is not installed (pip install torch-model-archiver)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(MODEL_CONFIG.format(batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms))
        name = archive_name(card)
        cmd = [archiver, "--model-name", name, "--version", "1.0",
               "--serialized-file", str(package_dir / card.onnx.file), "--handler", str(HANDLER),
               "--extra-files", str(package_dir / "card.json"), "--config-file", str(config),
               "--export-path", str(out_dir), "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    return out_dir / f"{name}.mar"
