"""The lean form of the image routes: one image as the raw request body, options in the query string.
Over real HTTP against the test service; every answer is compared with the multipart form's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import READ_KEY, shared


def raw(api: httpx.Client, route: str, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
    return api.post(route, content=data, params={k: str(v) for k, v in params.items()},
                    headers={"Content-Type": content_type}, timeout=60)


def photo(cell: str = "neutrophil", i: int = 0) -> Path:
    return sorted(shared("blood-photos", cell).glob("*.jpg"))[i]


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream", "image/png; charset=binary"])
def test_raw_classify_answers_like_multipart(api: httpx.Client, content_type: str) -> None:
    for cell in ("neutrophil", "basophil", "platelet"):
        data = photo(cell).read_bytes()
        lean = raw(api, "/classify", data, content_type, top_k=3)
        form = api.post("/classify", files=[("images", ("x.jpg", data, "image/jpeg"))], data={"top_k": "3"})
        assert lean.status_code == form.status_code == 200, lean.text
        assert lean.headers["content-type"] == "application/json" and lean.headers["x-request-id"]
        assert len(lean.json()[0]["top_k"]) == 3 and lean.json() == form.json()


def test_raw_embed_and_search_answer_like_multipart(api: httpx.Client) -> None:
    data = photo("monocyte").read_bytes()
    lean, form = raw(api, "/embed", data), api.post("/embed", files=[("images", ("m.jpg", data, "image/jpeg"))])
    assert lean.status_code == form.status_code == 200 and lean.json() == form.json()
    lean = raw(api, "/search", data, k=3, label="monocyte")
    form = api.post("/search", files=[("images", ("m.jpg", data, "image/jpeg"))], data={"k": "3", "label": "monocyte"})
    assert lean.status_code == form.status_code == 200 and lean.json() == form.json()


@pytest.mark.parametrize("query, expected", [
    ({"top_k": "0"}, "top_k"), ({"top_k": "many"}, "top_k"), ({"bogus": "1"}, "unknown query parameter 'bogus'"),
    ({"images_base64": "x"}, "unknown query parameter"), ({"model": "nope"}, "no model 'nope'")])
def test_raw_options_are_checked_like_the_form(api: httpx.Client, query: dict, expected: str) -> None:
    r = raw(api, "/classify", photo().read_bytes(), **query)
    assert 400 <= r.status_code < 500 and expected in r.json()["error"] and r.json()["request_id"], r.text


def test_raw_option_given_twice_is_refused(api: httpx.Client) -> None:
    r = api.post("/classify?top_k=2&top_k=3", content=photo().read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400 and "given twice" in r.json()["error"]


@pytest.mark.parametrize("body, expected", [(b"", "empty"), (b"not an image", "not a recognised image"),
                                            (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image 0")])
def test_raw_bad_bodies_get_400_with_a_message(api: httpx.Client, body: bytes, expected: str) -> None:
    r = raw(api, "/classify", body, "image/png")
    assert r.status_code == 400 and expected in r.json()["error"], r.text


def test_raw_keeps_keys_scopes_and_request_ids(service_url: str) -> None:
    data = photo().read_bytes()
    anonymous = httpx.post(f"{service_url}/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert anonymous.status_code == 401 and "API key" in anonymous.json()["error"]
    reader = httpx.post(f"{service_url}/classify", content=data,
                        headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {READ_KEY}",
                                 "X-Request-ID": "raw-test-1"})
    assert reader.status_code == 200 and reader.headers["x-request-id"] == "raw-test-1"


def test_raw_requests_are_counted_in_the_metrics(api: httpx.Client) -> None:
    def classified() -> float:
        for line in api.get("/metrics").text.splitlines():
            if line.startswith("medcl_images_total{") and 'endpoint="classify"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = classified()
    assert raw(api, "/classify", photo().read_bytes()).status_code == 200
    assert classified() == before + 1


def test_other_content_types_still_reach_the_typed_routes(api: httpx.Client) -> None:
    r = api.post("/classify", json={"images_base64": [], "top_k": 2})
    assert r.status_code == 400 and "at least one image" in r.json()["error"]


def test_raw_segment_answers_like_multipart(demo_models_service: str) -> None:
    from tests.conftest import ADMIN_KEY

    tile = sorted((Path(__file__).parents[1] / "demo" / "he-tiles").glob("*.png"))[0].read_bytes()
    options = {"pixel_size_um": "0.5", "offset_x": "1000", "offset_y": "2000", "method": "network-or-classical",
               "model": "demo-nuclei"}
    with httpx.Client(base_url=demo_models_service, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as c:
        lean = c.post("/segment", content=tile, params=options, headers={"Content-Type": "image/png"})
        form = c.post("/segment", files=[("images", ("body", tile, "image/png"))], data=options)
        assert lean.status_code == form.status_code == 200, lean.text
        assert lean.json() == form.json() and lean.json()[0]["count"] > 0
        assert min(n["centroid"][0] for n in lean.json()[0]["nuclei"]) >= 1000
        bad = c.post("/segment", content=tile, params={"pixel_size_um": "0"}, headers={"Content-Type": "image/png"})
        assert bad.status_code == 400 and "pixel_size_um" in bad.json()["error"]
