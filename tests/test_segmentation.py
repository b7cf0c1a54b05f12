"""Nuclei segmentation: metrics, exact tiling, instances and GeoJSON, the self-supervised network,
its ONNX export, and /segment + GET /models over real HTTP with two models served at once."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcl.segmentation import (InstanceRules, aji, as_brightfield, classical_instances, describe_instances, dice,
                                geojson, instances_from_mask, label_png, panoptic_quality, segmentation_scores,
                                sliding_window)
from tests.conftest import ADMIN_KEY, REPO_ROOT, shared

HE_TILES = REPO_ROOT / "demo" / "he-tiles"


def _squares() -> np.ndarray:
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:15] = 1  # 100 px
    labels[20:30, 30:50] = 2  # 200 px
    return labels


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_are_one_for_a_perfect_answer_and_zero_for_a_disjoint_one() -> None:
    truth = _squares()
    assert dice(truth, truth) == aji(truth, truth) == panoptic_quality(truth, truth)["pq"] == 1.0
    shifted = np.zeros_like(truth)
    shifted[32:38, 0:6] = 1
    assert dice(shifted, truth) == 0.0 and aji(truth, shifted) == 0.0 and panoptic_quality(truth, shifted)["pq"] == 0.0


def test_aji_and_pq_on_a_hand_computed_case() -> None:
    truth = _squares()
    pred = np.zeros_like(truth)
    pred[5:15, 5:10] = 1  # half of nucleus 1: IoU 0.5 exactly (not a PQ match)
    pred[20:30, 30:50] = 2  # nucleus 2 exactly
    pred[0:2, 55:60] = 3  # a false positive of 10 px
    # AJI: intersections 50 + 200; unions 100 + 200, plus the unpaired prediction's 10 px
    assert aji(truth, pred) == pytest.approx(250 / 310)
    pq = panoptic_quality(truth, pred)
    # one match (IoU 1), one false negative, two false positives -> DQ = 1 / (1 + 0.5 * 1 + 0.5 * 2)
    assert pq["dq"] == pytest.approx(1 / 2.5) and pq["sq"] == pytest.approx(1.0)
    assert dice(pred, truth) == pytest.approx(2 * 250 / (260 + 300))


# --- instances ------------------------------------------------------------------------------------

def test_touching_nuclei_are_split_by_the_watershed() -> None:
    yy, xx = np.mgrid[0:60, 0:90]
    two_discs = ((yy - 30) ** 2 + (xx - 30) ** 2 < 15 ** 2) | ((yy - 30) ** 2 + (xx - 56) ** 2 < 15 ** 2)
    assert instances_from_mask(two_discs).max() == 2
    assert instances_from_mask(two_discs, InstanceRules(min_distance=0)).max() == 1


def test_instances_are_described_with_closed_contours_and_um2_areas() -> None:
    nuclei = describe_instances(_squares(), pixel_size_um=0.25)
    assert [n["area_px"] for n in nuclei] == [100, 200]
    first = nuclei[0]
    assert first["bbox"] == [5, 5, 15, 15]
    assert first["centroid"] == [9.5, 9.5]
    assert first["area_um2"] == pytest.approx(100 * 0.0625)
    assert first["contour"][0] == first["contour"][-1]
    xs, ys = zip(*first["contour"])
    assert min(xs) >= 4.5 and max(xs) <= 15.5 and min(ys) >= 4.5 and max(ys) <= 15.5
    collection = geojson(nuclei, "v1")
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 2
    feature = collection["features"][1]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["measurements"]["area_px"] == 200


def test_label_png_round_trips_16_bit_ids() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[2:5, 2:5] = 300
    back = np.asarray(Image.open(io.BytesIO(label_png(labels))))
    assert back.dtype == np.uint16 and back.max() == 300 and (back > 0).sum() == 9


# --- the network and exact tiling -----------------------------------------------------------------

def _he_image(scale: float = 2.0) -> np.ndarray:
    from training.nuclei import read_rgb

    return read_rgb(sorted(HE_TILES.glob("TUM*.png"))[0], scale)


def test_confidence_network_size_and_exact_sliding_window() -> None:
    torch = pytest.importorskip("torch")
    from training.nuclei import ConfidenceNetwork, PatchFeatures, parameter_count

    network, features = ConfidenceNetwork(2).eval(), PatchFeatures()
    assert parameter_count(network) == 7354 and parameter_count(network, features) == 11106
    rgb = _he_image()[:400, :330]  # not a multiple of anything
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(batch)).numpy()

    whole = run(chw[None])[0]
    tiled = sliding_window(chw, run, window=200, margin=network.receptive_radius // 2 + 1)
    exact = sliding_window(chw, run, window=200, margin=network.receptive_radius)
    assert np.abs(exact - whole).max() < 1e-5, "tiles overlapping by the receptive field must stitch exactly"
    assert np.abs(tiled - whole).max() > 1e-4, "a margin below the receptive field should show seams (test is live)"


def test_a_1000_px_tile_is_one_inference_window() -> None:
    from medcl.segmentation import inference_window

    window = inference_window(512, 83)  # the demo segmenter's export window and receptive-field radius
    calls: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return batch[:, :1]

    image = np.random.default_rng(0).random((4, 1000, 1000), dtype=np.float32)
    assert np.array_equal(sliding_window(image, run, window, 83)[0], image[0]) and calls == [(1, 4, 1000, 1000)]
    calls.clear()
    wide = np.random.default_rng(1).random((4, 1000, 1800), dtype=np.float32)
    assert np.array_equal(sliding_window(wide, run, window, 83)[0], wide[0]) and len(calls) >= 1
    assert sum(shape[0] for shape in calls) == 2  # two windows side by side, not 512 px ones (6)


def test_classical_baseline_finds_nuclei_on_a_real_monuseg_tile() -> None:
    folder = shared("monuseg", "test")
    name = sorted((folder / "images").glob("*.png"))[0].name
    rgb = np.asarray(Image.open(folder / "images" / name).convert("RGB"))
    truth = np.asarray(Image.open(folder / "instances" / name)).astype(np.int64)
    scores = segmentation_scores(truth, classical_instances(rgb))
    assert scores["dice"] > 0.5 and scores["aji"] > 0.2, scores


# --- training, export, and the service -------------------------------------------------------------

class _StainMaps:
    """Stands in for a trained network with two known maps built from the input's own haematoxylin:
    ``good`` follows the stain's Otsu region; ``bad`` is one of the two failure modes seen in training
    (only the darkest 1% of pixels, MoNuSeg seed 2; or all tissue)."""

    def __init__(self, bad: str, good_first: bool) -> None:
        self.bad, self.good_first = bad, good_first
        self.head = type("Head", (), {"out_channels": 2})()

    def eval(self) -> "_StainMaps":
        return self

    def __call__(self, x):
        import torch
        from skimage.filters import threshold_otsu

        from medcl.segmentation import haematoxylin

        rgb = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        h = haematoxylin(rgb)
        good = 1 / (1 + np.exp(-(h - threshold_otsu(h)) * 60))
        if self.bad == "darkest":
            bad = (h > np.quantile(h, 0.99)).astype(np.float32)
        else:
            bad = (rgb.mean(-1) < 220).astype(np.float32)
        maps = [good, bad] if self.good_first else [bad, good]
        return torch.from_numpy(np.stack(maps).astype(np.float32))[None]


@pytest.mark.parametrize("bad", ["darkest", "all_tissue"])
@pytest.mark.parametrize("good_first", [True, False])
def test_nuclei_channel_is_the_map_agreeing_with_the_stain(bad: str, good_first: bool) -> None:
    pytest.importorskip("torch")
    from training.nuclei import choose_nuclei_channel, image_files, read_rgb

    images = [read_rgb(f) for f in image_files(shared("monuseg", "train", "images"))[:6]]
    channel, agreement = choose_nuclei_channel(_StainMaps(bad, good_first), images,
                                               InstanceRules(threshold_rule="otsu"))
    assert channel == (0 if good_first else 1), agreement
    assert agreement[channel] > 0.8 and agreement[1 - channel] < 0.6, agreement


def test_training_writes_a_card_with_a_label_free_channel_choice(segmenter_run: Path) -> None:
    from medcl.card import Card

    card = Card.load(segmenter_run)
    assert card.task == "segment" and card.segmentation is not None
    assert card.segmentation.channel_rule.startswith("best Dice agreement with the haematoxylin")
    # the stain input channel adds 72 weights (8 filters x 3x3) to the first convolution
    assert card.training["parameters"] == (11106 if card.segmentation.inputs == "rgb" else 11178)
    assert {"self_check_pass_share", "self_check_passed"} <= card.training.keys()
    history = json.loads((segmenter_run / "history.json").read_text())
    assert any("probe_loss" in h for h in history)


def test_export_is_dynamic_in_size_and_equal_to_torch(segmenter_run: Path, segmenter_package: Path) -> None:
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from medcl.card import Card
    from training.nuclei import load_segmenter

    card = Card.load(segmenter_package)
    assert card.onnx.output_names == ["nuclei"]
    assert max(v for k, v in card.onnx.parity.items() if k.startswith("max_abs_diff")) <= 1e-4
    # recomputed here, independently, at a size the export never saw
    network, _ = load_segmenter(segmenter_run)
    from medcl.segmentation import network_input

    rgb = _he_image()[:333, :281]
    x = network_input(rgb, card.segmentation.inputs)[None]
    with torch.no_grad():
        ref = network(torch.from_numpy(x)).numpy()[:, card.segmentation.nuclei_channel:card.segmentation.nuclei_channel + 1]
    got = ort.InferenceSession(str(segmenter_package / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    assert got.shape == (1, 1, 333, 281) and np.abs(got - ref).max() <= 1e-4


def test_export_refuses_classifier_only_options(segmenter_run: Path, tmp_path: Path) -> None:
    from export.onnx_export import export_onnx
    from export.segmenter_export import SegmenterExportError

    with pytest.raises(SegmenterExportError, match="classifiers only"):
        export_onnx(segmenter_run, tmp_path / "x", parity_data=HE_TILES, variants=["int8"])
    assert not (tmp_path / "x").exists()


def _post(url: str, path: str, files: list[tuple[str, bytes]] | None = None, **data):
    import httpx

    return httpx.post(url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120,
                      files=[("images", f) for f in files or []], data=data)


def test_models_lists_both_models_with_what_runs_them(demo_models_service: str) -> None:
    import httpx

    models = httpx.get(f"{demo_models_service}/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=30).json()["models"]
    by_name = {m["name"]: m for m in models}
    assert set(by_name) == {"demo-bloodmnist", "demo-nuclei", "demo-pcam"}
    assert by_name["demo-bloodmnist"]["default"] and by_name["demo-bloodmnist"]["task"] == "classify"
    assert len(by_name["demo-bloodmnist"]["classes"]) == 8 and by_name["demo-bloodmnist"]["input_size"] == 28
    assert by_name["demo-nuclei"]["task"] == "segment" and by_name["demo-nuclei"]["classes"] == []
    assert {m["provider"] for m in models} == {"CPU"}
    assert httpx.get(f"{demo_models_service}/models", timeout=30).status_code == 401


def test_segment_a_real_1000_px_tile(demo_models_service: str) -> None:
    folder = shared("monuseg", "test", "images")
    path = sorted(folder.glob("*.png"))[1]
    answer = _post(demo_models_service, "/segment", [(path.name, path.read_bytes(), "image/png")],
                   pixel_size_um="0.25", return_mask="true", return_geojson="true")
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()
    assert result["model"] == "demo-nuclei" and (result["width"], result["height"]) == (1000, 1000)
    assert result["count"] == len(result["nuclei"]) > 20
    first = result["nuclei"][0]
    assert first["area_um2"] == pytest.approx(first["area_px"] * 0.0625, rel=1e-3)
    x0, y0, x1, y1 = first["bbox"]
    assert x0 <= first["centroid"][0] <= x1 and y0 <= first["centroid"][1] <= y1
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["label_png_base64"]))))
    assert mask.shape == (1000, 1000) and len(np.unique(mask)) - 1 == result["count"]
    assert len(result["geojson"]["features"]) == result["count"]
    assert result["produced_by"] in ("network", "classical") and result["offset"] == [0, 0]
    assert result["assumed_pixel_size_um"] == 0.25 and not result["resampled"]
    if result["check"] is not None:  # the network's map was checked against the stain
        assert result["check"]["passed"] == (result["produced_by"] == "network")
    assert all(0.0 <= n["probability"] <= 1.0 and len(n["uid"]) == 16 for n in result["nuclei"])
    assert len({n["uid"] for n in result["nuclei"]}) == result["count"]
    assert (mask > 0).mean() < 0.5  # never a map covering most of the tile


def test_offsets_move_nuclei_into_slide_coordinates(demo_models_service: str) -> None:
    tile = sorted(HE_TILES.glob("TUM*.png"))[0]
    files = [(tile.name, tile.read_bytes(), "image/png")]
    (plain,) = _post(demo_models_service, "/segment", files).json()
    answer = _post(demo_models_service, "/segment", files, offset_x="40000", offset_y="12000", return_geojson="true")
    assert answer.status_code == 200, answer.text
    (moved,) = answer.json()
    assert moved["offset"] == [40000, 12000] and moved["count"] == plain["count"] > 0
    for a, b in zip(plain["nuclei"], moved["nuclei"]):
        assert b["centroid"] == pytest.approx([a["centroid"][0] + 40000, a["centroid"][1] + 12000])
        assert b["bbox"] == [a["bbox"][0] + 40000, a["bbox"][1] + 12000, a["bbox"][2] + 40000, a["bbox"][3] + 12000]
        assert b["probability"] == a["probability"] and b["uid"] != a["uid"]
    feature = moved["geojson"]["features"][0]
    assert feature["properties"]["medcl_uid"] == moved["nuclei"][0]["uid"]
    assert feature["properties"]["measurements"]["probability"] == moved["nuclei"][0]["probability"]
    assert min(x for x, _ in feature["geometry"]["coordinates"][0]) >= 40000
    # the same request again: the same ids
    assert [n["uid"] for n in _post(demo_models_service, "/segment", files, offset_x="40000",
                                    offset_y="12000").json()[0]["nuclei"]] == [n["uid"] for n in moved["nuclei"]]
    for bad in ({"offset_x": "-5"}, {"offset_y": "ten"}):
        refused = _post(demo_models_service, "/segment", files, **bad)
        assert refused.status_code == 400 and "offset" in refused.text, refused.text


def test_the_request_chooses_which_method_answers(demo_models_service: str) -> None:
    path = sorted(shared("monuseg", "test", "images").glob("*.png"))[0]
    files = [(path.name, path.read_bytes(), "image/png")]
    answers = {}
    for method in ("network", "network-or-classical", "classical", "auto"):
        r = _post(demo_models_service, "/segment", files, method=method, return_mask="true")
        assert r.status_code == 200, r.text
        answers[method] = r.json()[0]
    assert answers["network"]["produced_by"] == "network" and answers["network"]["check"] is None
    assert answers["classical"]["produced_by"] == "classical" and answers["classical"]["check"] is None
    checked = answers["network-or-classical"]
    assert checked["check"] is not None and checked["produced_by"] == ("network" if checked["check"]["passed"]
                                                                        else "classical")
    same = "network" if checked["produced_by"] == "network" else "classical"
    assert checked["label_png_base64"] == answers[same]["label_png_base64"]
    # the demo config's default (serve: classical), unless the card says otherwise
    assert answers["auto"]["label_png_base64"] == answers["classical"]["label_png_base64"]
    refused = _post(demo_models_service, "/segment", files, method="best")
    assert refused.status_code == 400 and "method" in refused.text


def test_requests_name_a_model_and_wrong_ones_are_refused(demo_models_service: str) -> None:
    blood = shared("blood-photos")
    photo = sorted(blood.rglob("*.jpg"))[0]
    files = [(photo.name, photo.read_bytes(), "image/jpeg")]
    default = _post(demo_models_service, "/classify", files)
    assert default.status_code == 200 and default.json()[0]["model"] == "demo-bloodmnist"
    assert _post(demo_models_service, "/classify", files, model="demo-bloodmnist").json()[0]["model"] == "demo-bloodmnist"
    wrong_task = _post(demo_models_service, "/classify", files, model="demo-nuclei")
    assert wrong_task.status_code == 400 and "segment model" in wrong_task.text
    unknown = _post(demo_models_service, "/embed", files, model="retina")
    assert unknown.status_code == 404 and "demo-bloodmnist" in unknown.text
    # /segment without a model name goes to the segmenter, not the (classifier) default
    tile = sorted(HE_TILES.glob("LYM*.png"))[0]
    seg = _post(demo_models_service, "/segment", [(tile.name, tile.read_bytes(), "image/png")])
    assert seg.status_code == 200 and seg.json()[0]["model"] == "demo-nuclei"
    broken = _post(demo_models_service, "/segment", [("x.png", b"\x89PNG not really", "image/png")])
    assert broken.status_code == 400 and "x.png" in broken.text


def test_a_tile_at_another_resolution_is_answered_in_its_own_pixels(demo_models_service: str) -> None:
    tile = sorted(HE_TILES.glob("TUM*.png"))[0]  # 224 px at 0.5 µm/px; the model's card says 0.25
    answer = _post(demo_models_service, "/segment", [(tile.name, tile.read_bytes(), "image/png")],
                   pixel_size_um="0.5", return_mask="true", method="network-or-classical")
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["label_png_base64"]))))
    assert (result["width"], result["height"]) == mask.shape[::-1] == (224, 224)
    assert result["assumed_pixel_size_um"] == 0.5 and result["resampled"]  # the network ran at 0.25 µm/px
    for nucleus in result["nuclei"]:
        assert nucleus["area_um2"] == pytest.approx(nucleus["area_px"] * 0.25, rel=1e-3)
        assert nucleus["bbox"][2] <= 224 and nucleus["bbox"][3] <= 224
    too_big = _post(demo_models_service, "/segment", [(tile.name, tile.read_bytes(), "image/png")],
                    pixel_size_um="100", method="network")
    assert too_big.status_code == 413 and "limit" in too_big.text
    # the classical method needs no resampling: it cuts the tile in its own pixels, with rules scaled to them
    classical = _post(demo_models_service, "/segment", [(tile.name, tile.read_bytes(), "image/png")],
                      pixel_size_um="100", method="classical")
    assert classical.status_code == 200 and not classical.json()[0]["resampled"]


def test_python_client_and_cli_segment(demo_models_service: str) -> None:
    import subprocess
    import sys

    from medcl.client import MedclClient

    tiles = sorted(HE_TILES.glob("TUM*.png"))[:2]
    with MedclClient(demo_models_service, api_key=ADMIN_KEY) as client:
        assert {m["name"] for m in client.models()} == {"demo-bloodmnist", "demo-nuclei", "demo-pcam"}
        (answer,) = client.segment(tiles[:1], return_geojson=True)
        assert answer["model"] == "demo-nuclei" and answer["geojson"]["type"] == "FeatureCollection"
    cli = [sys.executable, "-m", "medcl.cli", "segment", "--url", demo_models_service, "--api-key", ADMIN_KEY]
    out = subprocess.run([*cli, *map(str, tiles)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(t) for t in tiles]
    assert all(line["count"] == len(line["nuclei"]) for line in lines)
    missing = subprocess.run([*cli, "no-such-tile.png"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "no-such-tile.png" in missing.stderr


def _dsb(kind: str, n: int) -> list[Path]:
    """DSB 2018 images of one modality (CC0; mostly fluorescence), by their own brightness."""
    folder = shared("nuclei-dsb2018", "images")
    found = [p for p in sorted(folder.glob("*.png"))
             if (np.median(np.asarray(Image.open(p).convert("RGB")).max(axis=2)) < 30) == (kind == "fluorescence")]
    return found[:n]


def test_fluorescence_is_recognised_and_made_brightfield_like() -> None:
    from training.nuclei import read_rgb

    dark, bright = _dsb("fluorescence", 100), _dsb("brightfield", 100)
    assert len(dark) > 40 and len(bright) > 5
    assert all(as_brightfield(read_rgb(p))[1] == "fluorescence" for p in dark)
    assert all(as_brightfield(read_rgb(p))[1] == "brightfield" for p in bright)
    he = [*sorted(shared("monuseg", "test", "images").glob("*.png")),
          shared("histology-tiles", "kather2016", "04_LYMPHO")]  # the darkest H&E here: packed lymphocytes
    for path in [*he[:-1], *sorted(he[-1].glob("*.tif"))]:
        rgb = read_rgb(path)
        image, used = as_brightfield(rgb)
        assert used == "brightfield" and image is rgb, path
    helped = []
    for path in dark[:6]:
        truth = np.asarray(Image.open(path.parent.parent / "instances" / path.name)).astype(np.int64)
        rgb = read_rgb(path)
        image, _ = as_brightfield(rgb)
        assert image[truth > 0].mean() < image[truth == 0].mean() - 30  # nuclei now dark on bright
        helped.append(dice(classical_instances(image) > 0, truth > 0) - dice(classical_instances(rgb) > 0, truth > 0))
    assert np.mean(helped) > 0.05
    with pytest.raises(ValueError, match="modality must be one of"):
        as_brightfield(read_rgb(dark[0]), "infrared")


def test_segment_a_fluorescence_image(demo_models_service: str) -> None:
    (path,) = _dsb("fluorescence", 1)
    files = [(path.name, path.read_bytes(), "image/png")]
    auto = _post(demo_models_service, "/segment", files)
    assert auto.status_code == 200, auto.text
    assert auto.json()[0]["modality"] == "fluorescence"
    forced = _post(demo_models_service, "/segment", files, modality="brightfield")
    assert forced.status_code == 200 and forced.json()[0]["modality"] == "brightfield"
    tile = sorted(HE_TILES.glob("TUM*.png"))[0]
    he = _post(demo_models_service, "/segment", [(tile.name, tile.read_bytes(), "image/png")])
    assert he.json()[0]["modality"] == "brightfield"
    bad = _post(demo_models_service, "/segment", files, modality="infrared")
    assert bad.status_code == 400 and "modality" in bad.text


def test_metrics_per_model_and_endpoint(demo_models_service: str) -> None:
    import httpx

    tile = sorted(HE_TILES.glob("MUC*.png"))[0]
    assert _post(demo_models_service, "/segment", [(tile.name, tile.read_bytes(), "image/png")]).status_code == 200
    text = httpx.get(f"{demo_models_service}/metrics", timeout=30).text
    assert 'medcl_model_request_seconds_count{endpoint="segment",model="demo-nuclei"}' in text
    assert 'medcl_nuclei_per_tile_count{model="demo-nuclei"}' in text
    assert 'medcl_model_info{model="demo-nuclei"' in text and 'medcl_model_info{model="demo-bloodmnist"' in text


def test_geojson_of_a_real_tile_is_valid(demo_models_service: str) -> None:
    """What a GeoJSON validator checks: closed rings of >= 4 positions, counter-clockwise exteriors
    (RFC 7946), and, with shapely where installed, simple valid polygons."""
    folder = shared("monuseg", "test", "images")
    path = sorted(folder.glob("*.png"))[2]
    (result,) = _post(demo_models_service, "/segment", [(path.name, path.read_bytes(), "image/png")],
                      return_geojson="true").json()
    features = result["geojson"]["features"]
    assert len(features) == result["count"] > 20
    json.loads(json.dumps(result["geojson"]))  # plain JSON, no NaN
    for feature in features:
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:])) > 0
    try:
        from shapely.geometry import shape
    except ImportError:
        return
    invalid = [f["properties"]["medcl_id"] for f in features if not shape(f["geometry"]).is_valid]
    assert not invalid, f"invalid (self-intersecting) contours: {invalid[:5]}"


def test_contours_are_simplified_within_tolerance_and_stay_valid() -> None:
    import shapely
    from skimage.draw import ellipse

    from medcl.segmentation import simplify_rings

    labels = np.zeros((120, 160), np.int32)
    for k, (cy, cx, ry, rx, angle) in enumerate([(30, 40, 12, 20, 0.3), (80, 100, 25, 9, 1.1), (60, 140, 3, 3, 0)]):
        rr, cc = ellipse(cy, cx, ry, rx, labels.shape, rotation=angle)
        labels[rr, cc] = k + 1
    raw = [np.asarray(n["contour"], float) for n in describe_instances(labels, tolerance=0.0)]
    simplified = simplify_rings(raw, 0.75)
    for before, after in zip(raw, simplified):
        a, b = shapely.Polygon(before), shapely.Polygon(after)
        assert b.is_valid and len(after) <= len(before)
        assert shapely.hausdorff_distance(a.exterior, b.exterior) <= 0.75 + 1e-9
    assert sum(map(len, simplified)) < sum(map(len, raw))  # it does simplify
    tiny = [np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])]
    assert simplify_rings(tiny, 0.75)[0] is tiny[0]  # too short for a polygon: returned as it was


# --- development split, stain input, self-training -------------------------------------------------

def test_development_images_never_train() -> None:
    from training.nuclei import SegmenterData, read_name_list, training_images

    dev = set(read_name_list(REPO_ROOT / "configs" / "splits" / "monuseg-dev.txt"))
    assert len(dev) == 6
    data = SegmenterData(name="t", images=str(shared("monuseg", "train", "images")),
                         exclude=str(REPO_ROOT / "configs" / "splits" / "monuseg-dev.txt"))
    files, images = training_images(data)
    assert len(files) == 24 and not dev & {f.stem for f in files}
    assert dev <= {f.stem for f in shared("monuseg", "train", "images").glob("*.png")}


def test_stain_input_channel_is_normalised_per_tile() -> None:
    from medcl.segmentation import haematoxylin, network_input

    rgb = np.asarray(Image.open(HE_TILES / sorted(p.name for p in HE_TILES.glob("*.png"))[0]).convert("RGB"))
    plain, with_stain = network_input(rgb, "rgb"), network_input(rgb, "rgb+haematoxylin")
    assert plain.shape == (3, *rgb.shape[:2]) and with_stain.shape == (4, *rgb.shape[:2])
    assert np.array_equal(with_stain[:3], plain)
    stain = with_stain[3]
    assert 0.0 <= stain.min() and stain.max() <= 1.0
    # a paler copy of the same tile (half the optical density) gives nearly the same stain channel
    density = haematoxylin(rgb)
    pale = (255 * np.exp(0.5 * np.log(np.clip(rgb / 255.0, 1 / 255, 1)))).astype(np.uint8)
    assert np.corrcoef(network_input(pale, "rgb+haematoxylin")[3].ravel(), stain.ravel())[0, 1] > 0.9
    assert stain[density > np.percentile(density, 99)].mean() > 0.5
    with pytest.raises(ValueError, match="inputs must be one of"):
        network_input(rgb, "rgb+eosin")


def test_stain_input_network_refines_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from export.segmenter_export import export_segmenter
    from training.nuclei import SegmenterConfig, load_segmenter, train_segmenter

    config = SegmenterConfig.model_validate({
        "name": "stain-refined", "inputs": "rgb+haematoxylin", "output_dir": str(tmp_path),
        "data": {"name": "demo-tiles", "images": str(HE_TILES), "scale": 2.0, "pixel_size_um": 0.25},
        "schedule": {"steps": 4, "batch": 2, "crop": 96, "eval_every": 2, "min_steps": 0},
        "refine": {"steps": 3}})
    run = train_segmenter(config, progress=False)
    network, card = load_segmenter(run)
    assert card.segmentation.inputs == "rgb+haematoxylin" and card.training["refine_steps"] == 3
    assert network.stem[0].in_channels == 4
    assert len(__import__("json").loads((run / "refine_history.json").read_text())) == 3
    package = export_segmenter(run, tmp_path / "package", parity_data=HE_TILES)
    assert (package / "model.onnx").is_file()


# --- which answer /segment gives, and what each nucleus carries -----------------------------------

def _monuseg_tile(crop: int = 400) -> np.ndarray:
    path = sorted(shared("monuseg", "test", "images").glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("RGB"))[:crop, :crop]


def test_a_map_that_floods_the_tile_is_answered_by_the_classical_method() -> None:
    from medcl.nuclei_check import MAX_COVERAGE, answer_tile, stain_density

    rgb = _monuseg_tile()
    rules = InstanceRules(threshold_rule="otsu")
    density, cut = stain_density(rgb)
    stain_like = (1 / (1 + np.exp(-(density - cut) * 60))).astype(np.float32)  # a map that follows the stain
    good = answer_tile(stain_like, rgb, rules)
    assert good.produced_by == "network" and good.check.passed and good.check.stain_agreement > 0.9
    assert good.labels.max() > 20 and good.confidence is stain_like

    flooding = np.full(rgb.shape[:2], 0.9, np.float32)  # marks the whole tile (the failure seen in a demo run)
    flooding[:5, :5] = 0.1
    bad = answer_tile(flooding, rgb, rules)
    assert bad.produced_by == "classical" and not bad.check.passed and bad.check.coverage > MAX_COVERAGE
    assert "of the tile" in bad.check.reason()
    # the classical answer: the stain region with the same morphology and watershed, never the flood
    assert np.array_equal(bad.labels, instances_from_mask(density > cut, rules))
    assert (bad.labels > 0).mean() < 0.5 and 0 <= bad.confidence.min() and bad.confidence.max() <= 1

    background = 1.0 - stain_like  # the other failure: a map of everything but the nuclei, thresholded high
    assert answer_tile(np.where(background > 0.99, 0.95, 0.0).astype(np.float32), rgb, rules).produced_by \
        == "classical"
    unchecked = answer_tile(flooding, rgb, rules, serve="network")
    assert unchecked.produced_by == "network" and unchecked.check is None
    classical = answer_tile(None, rgb, rules, serve="classical")
    assert classical.produced_by == "classical" and np.array_equal(classical.labels, bad.labels)
    with pytest.raises(ValueError, match="serve must be one of"):
        answer_tile(flooding, rgb, rules, serve="best")


def test_nuclei_carry_probability_stable_uid_and_slide_offsets() -> None:
    labels = _squares()
    probability = np.zeros(labels.shape, np.float32)
    probability[labels == 1] = 0.8
    probability[labels == 2] = 0.6
    probability[20:25, 30:50] = 1.0  # half of nucleus 2 more confident: its mean is 0.8
    here = describe_instances(labels, probability=probability, model_version="v1")
    assert [n["probability"] for n in here] == [pytest.approx(0.8), pytest.approx(0.8)]
    shifted = describe_instances(labels, probability=probability, offset=(1000, 2000), model_version="v1")
    assert shifted[0]["bbox"] == [1005, 2005, 1015, 2015] and shifted[0]["centroid"] == [1009.5, 2009.5]
    assert all(x >= 1004.5 and y >= 2004.5 for x, y in shifted[0]["contour"])
    assert shifted[0]["contour"] == [[x + 1000, y + 2000] for x, y in here[0]["contour"]]
    # the same nucleus seen from another tile of the slide (another offset, same slide position): same uid
    moved = np.zeros((40, 60), np.int32)
    moved[15:25, 25:35] = 1  # nucleus 1 of ``labels`` in a tile whose corner is 10 px up and 20 px left
    assert describe_instances(moved, offset=(980, 1990), model_version="v1")[0]["uid"] == shifted[0]["uid"]
    assert shifted[0]["uid"] != shifted[1]["uid"] != here[1]["uid"]
    assert describe_instances(labels, offset=(1000, 2000), model_version="v2")[0]["uid"] != shifted[0]["uid"]
    feature = geojson(shifted, "v1")["features"][0]
    assert feature["properties"]["measurements"]["probability"] == pytest.approx(0.8)
    assert feature["properties"]["medcl_uid"] == shifted[0]["uid"]
    assert feature["geometry"]["coordinates"][0][0][0] >= 1004.5


def test_map_markers_split_touching_nuclei_without_a_neck() -> None:
    yy, xx = np.mgrid[0:60, 0:90].astype(np.float32)
    # two nuclei pressed into one smooth ellipse: the mask has no neck, the stain two hills
    score = np.exp(-((yy - 30) ** 2 + (xx - 36) ** 2) / 120) + np.exp(-((yy - 30) ** 2 + (xx - 54) ** 2) / 120)
    mask = ((yy - 30) / 14) ** 2 + ((xx - 45) / 24) ** 2 < 1
    assert instances_from_mask(mask, InstanceRules(min_distance=12)).max() == 1
    assert instances_from_mask(mask, InstanceRules(min_distance=12, markers="map"), score).max() == 2
    with pytest.raises(ValueError, match="need the map"):
        instances_from_mask(mask, InstanceRules(markers="map"))
    half = InstanceRules(min_distance=12, min_area=30, markers="map").at_scale(2.0)
    assert (half.min_distance, half.min_area, half.marker_sigma) == (6, 8, 1.0)
    assert InstanceRules().at_scale(1.05) == InstanceRules()


def test_unet_checkpoint_is_chosen_on_excluded_development_images(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from training.nuclei import SegmenterConfig, SegmenterError, train_segmenter

    train = shared("monuseg", "train")
    dev = sorted(p.stem for p in (train / "instances").glob("*.png"))[:1]
    (tmp_path / "dev.txt").write_text("\n".join(dev) + "\n")
    data = {"name": "monuseg", "images": str(train / "images"), "masks": str(train / "binary_masks"),
            "select_images": str(train / "images"), "select_instances": str(train / "instances"),
            "select_names": str(tmp_path / "dev.txt")}
    config = {"name": "unet-select", "method": "supervised_unet", "output_dir": str(tmp_path), "data": data,
              "schedule": {"steps": 4, "batch": 2, "crop": 96, "eval_every": 2, "min_steps": 0, "patience": 1}}
    with pytest.raises(SegmenterError, match="must be excluded from training"):
        train_segmenter(SegmenterConfig.model_validate(config), progress=False)
    data["exclude"] = str(tmp_path / "dev.txt")
    run = train_segmenter(SegmenterConfig.model_validate(config), progress=False)
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history if "select_dice" in h] == [2, 4]
    assert all(0.0 <= h["select_dice"] <= 1.0 for h in history if "select_dice" in h)


def test_watershed_markers_are_skimages_peaks_on_real_tiles() -> None:
    """label_peaks replaces skimage's per-label peak_local_max for speed; on real H&E tiles, with both
    reliefs the service uses (the smoothed stain, the distance transform) and two spacings, it must
    find exactly the same points in the same order."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    from medcl.nuclei_check import STAIN_SIGMA, stain_density
    from medcl.segmentation import label_peaks

    tiles = sorted(shared("monuseg", "test", "images").glob("*.png"))[:3]
    for path in tiles:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        density, cut = stain_density(rgb, STAIN_SIGMA)
        mask = density > cut
        components = ndi.label(mask)[0]
        for relief in (ndi.gaussian_filter(density.astype(np.float32), 2.0), ndi.distance_transform_edt(mask)):
            for spacing in (12, 6):
                ours = label_peaks(relief, components, spacing)
                theirs = peak_local_max(relief, min_distance=spacing, labels=components, exclude_border=False)
                assert len(ours) > 100 and np.array_equal(ours, theirs), (path.name, spacing)
