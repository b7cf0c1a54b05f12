"""Bad input never gets a 500: a corpus of odd and broken files, and schemathesis against the OpenAPI
schema. Both run against real services; the fuzzer gets a service of its own, since it adds cases."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ADMIN_KEY, SHARED_DATA


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size in a valid header and carries almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def real_tile() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def corpus() -> list[tuple[str, bytes, int]]:
    """(name, bytes, expected status). Accepted: PNG, JPEG, TIFF; 8/16-bit; RGB, RGBA, grey, palette, CMYK."""
    tile = real_tile()
    grey16 = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # mode I;16
    frames = io.BytesIO()
    tile.save(frames, format="TIFF", save_all=True, append_images=[tile.rotate(90)])
    cases = [
        ("rgb.png", encode(tile, "PNG"), 200),
        ("rgba.png", encode(tile.convert("RGBA"), "PNG"), 200),
        ("grey.jpg", encode(tile.convert("L"), "JPEG"), 200),
        ("palette.png", encode(tile.convert("P"), "PNG"), 200),
        ("cmyk.jpg", encode(tile.convert("CMYK"), "JPEG"), 200),
        ("grey16.tif", encode(grey16, "TIFF"), 200),
        ("grey16.png", encode(grey16, "PNG"), 200),
        ("bilevel.tif", encode(tile.convert("1"), "TIFF"), 200),
        ("lzw.tif", encode(tile, "TIFF", compression="tiff_lzw"), 200),
        ("two-pages.tif", frames.getvalue(), 200),
        ("truncated.png", encode(tile, "PNG")[:200], 400),
        ("truncated.tif", encode(tile, "TIFF")[:300], 400),
        ("truncated.jpg", encode(tile, "JPEG")[:300], 400),
        ("empty.png", b"", 400),
        ("html.png", b"<html><body>not an image</body></html>", 400),
        ("gif.gif", encode(tile, "GIF"), 400),  # a real image, but not a format the service accepts
        ("bmp.bmp", encode(tile, "BMP"), 400),
        ("png-magic-only.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, 400),
        ("bomb.png", png_header_only(50_000, 50_000), 413),
    ]
    for name in ("misc/ihc.png", "misc/retina.jpg", "misc/he_example.jpg", "histology-tiles/nct-crc-he-100k"):
        path = SHARED_DATA / name
        if path.is_dir():
            path = sorted(path.glob("*.tif*"))[0]
        if path.is_file():
            cases.append((path.name, path.read_bytes(), 200))
    return cases


@pytest.mark.parametrize("name, data, status", corpus(), ids=[c[0] for c in corpus()])
def test_corpus_file(api: httpx.Client, name: str, data: bytes, status: int) -> None:
    r = api.post("/classify", files=[("images", (name, data, "application/octet-stream"))])
    assert r.status_code == status, r.text
    if status != 200:
        assert name in r.text  # the message names the file


@pytest.mark.parametrize("body, content_type", [
    (b"--x\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\nhttp://example.com/a.png\r\n--x--\r\n",
     "multipart/form-data; boundary=x"),  # a URL where a file belongs: never fetched
    (b"anything", "multipart/form-data"),  # no boundary
    (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
    (b"{not json", "application/json"),
    (b'{"images_base64": [1, 2]}', "application/json"),
    (b'{"vectors": [[0.1, 0.2], [0.3]]}', "application/json"),
])
def test_malformed_requests_get_a_4xx(api: httpx.Client, body: bytes, content_type: str) -> None:
    for route in ("/classify", "/search", "/cases"):
        r = api.post(route, content=body, headers={"content-type": content_type})
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text)


def test_schemathesis_finds_no_server_errors(demo_models_service: str) -> None:
    """Every operation of the schema, /segment included, against a service with a classifier and a segmenter."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip(reason="schemathesis is not installed; runs wherever the dev extra is (make test, CI)")
    out = subprocess.run([st, "run", f"{demo_models_service}/docs.json", "-H", f"Authorization: Bearer {ADMIN_KEY}",
                          "--checks", "not_a_server_error", "--max-examples", "15", "--seed", "1",
                          "--max-time", "75", "--request-timeout", "30"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" in out.stdout
