"""Where a case's image can be read again, so that a new model version can re-embed it.

Images posted to ``/cases`` are kept content-addressed (``sources/ab/<sha256>``, written with fsync
before the case is acknowledged) and referred to as ``medcl-source:<sha256>``. Bulk-indexed files keep
their own location: an absolute local path, or ``FILE.npz#split/index`` for a tile inside a MedMNIST archive.

A ``source_uri`` sent by an HTTP client is never a way to make the server read a file: it is kept
as an opaque label (``s3://bucket/key``, ``slide-12/tile-3``: stored and returned, never read), or,
when it is an absolute path, accepted only inside a folder the operator allows
(``MEDCL_SOURCE_ROOTS``, ``:``-separated; none by default) so that re-embedding may read it later.
Relative paths are labels, never resolved against the server's working folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from medcl.index.schema import CaseIndexError
from medcl.preprocess import decode_image

SCHEME = "medcl-source:"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def allowed_source_roots() -> list[Path]:
    return [Path(p).resolve() for p in os.environ.get("MEDCL_SOURCE_ROOTS", "").split(os.pathsep) if p.strip()]


def check_client_source(uri: str, roots: list[Path] | None = None) -> str:
    """A client's ``source_uri`` if acceptable (see the module's docstring), else CaseIndexError (a 400)."""
    roots = allowed_source_roots() if roots is None else roots
    if "\x00" in uri:
        raise CaseIndexError("source_uri contains a NUL character")
    if uri.startswith(SCHEME):
        if not _DIGEST.match(uri[len(SCHEME):]):
            raise CaseIndexError(f"source_uri {uri[:80]!r}: '{SCHEME}' is followed by a SHA-256 digest (64 hex "
                                 "digits) of an image this service stored")
        return uri
    if uri.startswith("/") or uri.startswith("file:"):
        path = Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
        if not any(path.is_relative_to(root) for root in roots):
            allowed = ", ".join(map(str, roots)) or "none (MEDCL_SOURCE_ROOTS is not set)"
            raise CaseIndexError(f"source_uri {uri[:80]!r} is a path outside the folders this service may read "
                                 f"(allowed: {allowed}); send a label that is not an absolute path, or no "
                                 "source_uri (the posted image is then kept)")
        return str(path)
    return uri


def readable(uri: str) -> bool:
    """Whether ``read_source`` would try to read this URI (an opaque label is not read)."""
    return uri.startswith(SCHEME) or uri.startswith("/")


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
    if not readable(uri):
        raise CaseIndexError(f"source {uri[:200]} is a label, not a path this service reads")
    try:
        if uri.startswith(SCHEME):
            digest = uri[len(SCHEME):]
            if not _DIGEST.match(digest):
                raise ValueError("not a SHA-256 digest")
            return decode_image(root / "sources" / digest[:2] / digest)
        if "#" in uri and uri.split("#", 1)[0].endswith(".npz"):
            path, where = uri.split("#", 1)
            split, index = where.split("/")
            return Image.fromarray(_npz(path)[f"{split}_images"][int(index)])
        return decode_image(uri)
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise CaseIndexError(f"source {uri} cannot be read: {e}") from None
