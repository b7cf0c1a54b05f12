"""Where a case's image can be read again, so that a new model version can re-embed it.

Images posted to ``/cases`` are kept content-addressed (``sources/ab/<sha256>``, written with fsync
before the case is acknowledged) and referred to as ``medcl-source:<sha256>``. Bulk-indexed files keep
their own location: a local path, or ``FILE.npz#split/index`` for a tile inside a MedMNIST archive.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from medcl.index.schema import CaseIndexError
from medcl.preprocess import decode_image

SCHEME = "medcl-source:"


def store_source(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = root / "sources" / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer: two requests (threads of one process) may store the same image at once;
        # sharing one temporary name, the second's rename found it gone (a 500 in the load test).
        tmp = path.with_name(f".{digest}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return SCHEME + digest


def npz_uri(path: Path, split: str, index: int) -> str:
    return f"{Path(path).resolve()}#{split}/{index}"


@lru_cache(maxsize=4)
def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def read_source(root: Path, uri: str) -> Image.Image:
    """The image behind a source URI; CaseIndexError when it cannot be read."""
    try:
        if uri.startswith(SCHEME):
            digest = uri[len(SCHEME):]
            return decode_image(root / "sources" / digest[:2] / digest)
        if "#" in uri and uri.split("#", 1)[0].endswith(".npz"):
            path, where = uri.split("#", 1)
            split, index = where.split("/")
            return Image.fromarray(_npz(path)[f"{split}_images"][int(index)])
        return decode_image(uri)
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise CaseIndexError(f"source {uri} cannot be read: {e}") from None
