"""Nuclei segmentation without torch: probability map -> instances -> measurements, GeoJSON, metrics.

Shared by the service (/segment), the evaluation of the self-supervised segmenter and its baselines,
so that every method is scored through the same post-processing.

Instances: threshold, morphological opening then closing (disk 3, then disk 1, as in the reference
method), holes filled, small specks dropped, then a watershed on the distance transform splits
touching nuclei (markers = distance peaks at least ``min_distance`` apart).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InstanceRules:
    threshold: float = 0.5
    open_radius: int = 3
    close_radius: int = 1
    min_area: int = 30  # pixels; a nucleus at 40x covers hundreds
    min_distance: int = 6  # pixels between watershed markers; 0 disables splitting
    # "otsu": per tile, Otsu's threshold of the map, never below ``threshold`` (a tile with no nuclei
    # then stays empty). For the self-supervised maps, whose values are not calibrated probabilities.
    threshold_rule: str = "fixed"
    # Where the watershed's markers and relief come from. "distance": the mask's distance transform
    # (touching round nuclei meet at a neck). "map": the map the mask was cut from, smoothed by a
    # Gaussian of ``marker_sigma`` px (a nucleus is a hill of confidence or stain, even where two touch
    # without a neck).
    markers: str = "distance"
    marker_sigma: float = 2.0

    @classmethod
    def of(cls, spec) -> "InstanceRules":
        """The rules a segmenter's card (``SegmentationSpec``) prescribes: one reading for service, training, bench."""
        return cls(threshold=spec.threshold, open_radius=spec.open_radius, close_radius=spec.close_radius,
                   min_area=spec.min_area, min_distance=spec.min_distance, threshold_rule=spec.threshold_rule,
                   markers=spec.markers)


    def at_scale(self, factor: float) -> "InstanceRules":
        """The rules for pixels ``factor`` times as large as the model's (a 20x tile, 0.5 µm/px, for a
        model trained at 0.25 µm/px: factor 2): lengths divided by it, areas by its square."""
        if abs(factor - 1.0) <= 0.1:
            return self
        from dataclasses import replace

        return replace(self, open_radius=max(1, round(self.open_radius / factor)) if self.open_radius else 0,
                       close_radius=max(1, round(self.close_radius / factor)) if self.close_radius else 0,
                       min_area=max(1, round(self.min_area / factor ** 2)) if self.min_area else 0,
                       min_distance=max(1, round(self.min_distance / factor)) if self.min_distance else 0,
                       marker_sigma=self.marker_sigma / factor)


MODALITIES = ("auto", "brightfield", "fluorescence")
# The median of the brightest channel separates the two: 0.01-0.06 of full scale on DSB 2018's 47
# fluorescence images, 0.23 and up on 141 brightfield H&E images here (MoNuSeg, the demo tiles, the
# Kather tiles; the darkest is a tile packed with lymphocytes) and 0.76 and up on DSB's brightfield ones.
# The threshold sits in that gap, nearer the fluorescence side.
FLUORESCENCE_MEDIAN = 0.12 * 255


def looks_fluorescent(rgb: np.ndarray) -> bool:
    """A dark-background image (bright nuclei on black), decided from the image alone."""
    return float(np.median(rgb[..., :3].max(axis=2))) < FLUORESCENCE_MEDIAN


def as_brightfield(rgb: np.ndarray, modality: str = "auto") -> tuple[np.ndarray, str]:
    """The image as the segmenters learned to see nuclei: dark on a bright background.

    Fluorescence images (``modality``, or detected when "auto") become grey brightfield-like images: the
    brightest channel, stretched so its 99.5th percentile is full scale (dim stains as dark as
    haematoxylin after inversion), inverted. Returns the image and the modality that was used. On DSB 2018
    this took the MoNuSeg-trained networks from Dice 0.21/0.31 to 0.58/0.78 (docs/segmentation.md)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    if modality == "auto":
        modality = "fluorescence" if looks_fluorescent(rgb) else "brightfield"
    if modality == "brightfield":
        return rgb, modality
    signal = rgb[..., :3].max(axis=2).astype(np.float32)
    top = max(float(np.percentile(signal, 99.5)), 1.0)
    inverted = (255.0 - np.clip(signal * (255.0 / top), 0, 255)).astype(np.uint8)
    return np.repeat(inverted[..., None], 3, axis=2), modality


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density per pixel (Ruifrok & Johnston colour deconvolution), float32 HxW."""
    from skimage.color import rgb2hed

    rgb = rgb[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # the spread of the three channels per pixel (np.ptp along the channel axis is the same number, and
    # took ~0.1 s on a 1000x1000 tile)
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    if not np.any(spread > 2):
        # a grey image (brightfield grey, or fluorescence made brightfield-like) has no colour to deconvolve:
        # its stain is its optical density
        return (-np.log((rgb.mean(axis=2, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
    return rgb2hed(rgb).astype(np.float32)[..., 0]


INPUTS = ("rgb", "rgb+haematoxylin")


def network_input(rgb: np.ndarray, inputs: str = "rgb") -> np.ndarray:
    """The (C, H, W) float32 tensor a segmenter's card asks for, from a whole uint8 RGB tile.

    "rgb": the pixels in [0, 1]. "rgb+haematoxylin" adds the tile's haematoxylin density divided by
    twice its own Otsu threshold (clipped to [0, 1]; 0.5 = at the threshold): a stain channel that is
    normalised per tile, so a pale and a dark staining of the same tissue look alike to the network.
    Computed once per tile, before any windowing, so that stitched windows still equal the whole."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, not {inputs!r}")
    chw = np.ascontiguousarray(rgb[..., :3].transpose(2, 0, 1), dtype=np.float32) / 255.0
    if inputs == "rgb":
        return chw
    density = haematoxylin(rgb)
    cut = otsu_or_max(density)
    stain = np.clip(density / (2.0 * cut), 0.0, 1.0) if cut > 0 else np.zeros_like(density)
    return np.concatenate([chw, stain[None].astype(np.float32)])


def network_input_channels(inputs: str) -> tuple[str, ...]:
    """The channels ``network_input`` gives for a card's ``inputs``."""
    return ("r", "g", "b") if inputs == "rgb" else ("r", "g", "b", "haematoxylin")


def otsu_or_max(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values)) if float(values.max()) > float(values.min()) else float(values.max())


def otsu_foreground(values: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    return values > threshold_otsu(values)


def instances_from_mask(foreground: np.ndarray, rules: InstanceRules = InstanceRules(),
                        score: np.ndarray | None = None, between: Callable[[], None] | None = None) -> np.ndarray:
    """Binary nuclei mask -> int32 label image (0 = background, 1..N = nuclei). ``score``: the map the
    mask was cut from, needed when the rules' markers come from the map. ``between`` is called
    between the steps (the service stops an abandoned request there by raising)."""
    between = between or (lambda: None)
    if rules.markers not in ("distance", "map"):
        raise ValueError(f"markers must be 'distance' or 'map', not {rules.markers!r}")
    if rules.markers == "map" and score is None:
        raise ValueError("watershed markers from the map need the map (score)")
    from scipy import ndimage as ndi
    from skimage.morphology import disk
    from skimage.segmentation import watershed

    mask = np.asarray(foreground, dtype=bool)
    if rules.open_radius:
        mask = ndi.binary_opening(mask, structure=disk(rules.open_radius))
    if rules.close_radius:
        mask = ndi.binary_closing(mask, structure=disk(rules.close_radius))
    mask = ndi.binary_fill_holes(mask)
    if rules.min_area > 1:
        components, _ = ndi.label(mask)
        keep = np.bincount(components.ravel()) >= rules.min_area
        keep[0] = False
        mask = keep[components]
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    if not rules.min_distance:
        return ndi.label(mask)[0].astype(np.int32)
    between()
    if rules.markers == "map":
        relief = ndi.gaussian_filter(np.asarray(score, dtype=np.float32), rules.marker_sigma)
    else:
        relief = ndi.distance_transform_edt(mask)
    components = ndi.label(mask)[0]
    between()
    peaks = label_peaks(relief, components, rules.min_distance)
    between()
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A component with no peak (flat, tiny) still becomes one nucleus: marked at its first pixel
    # (found inside the component's bounding box, not by scanning the whole tile per component).
    unmarked = np.setdiff1d(np.unique(components[mask]), np.unique(components[tuple(peaks.T)]))
    if len(unmarked):
        boxes = ndi.find_objects(components)
        for i, c in enumerate(unmarked, start=len(peaks) + 1):
            box = boxes[c - 1]
            ys, xs = np.nonzero(components[box] == c)
            markers[box[0].start + ys[0], box[1].start + xs[0]] = i
    labels = watershed(-relief, markers, mask=mask)
    between()
    return relabel(labels)


def _spaced(coords: np.ndarray, spacing: int) -> np.ndarray:
    """Greedy minimum spacing (Chebyshev distance) over coordinates sorted best first: each kept point
    drops the later ones closer than ``spacing``. skimage's ``ensure_spacing`` does the same with a
    KD-tree per call, which costs more than it saves for the few candidates one nucleus has."""
    if len(coords) <= 1:
        return coords
    if len(coords) > 50:  # skimage splits larger sets into batches; keep its exact behaviour there
        from skimage._shared.coord import ensure_spacing

        return ensure_spacing(coords, spacing=spacing, p_norm=np.inf)
    distance = np.abs(coords[:, None, :] - coords[None, :, :]).max(axis=-1)
    dropped = np.zeros(len(coords), bool)
    for i in range(len(coords)):
        if not dropped[i]:
            close = distance[i] < spacing
            close[i] = False
            dropped |= close
    return coords[~dropped]


def label_peaks(image: np.ndarray, labels: np.ndarray, min_distance: int) -> np.ndarray:
    """(row, col) watershed markers: per labelled region, the local maxima of ``image`` within a
    (2·min_distance+1)² window counting only that region's pixels, at least ``min_distance`` apart
    (Chebyshev), highest first. The same points as ``skimage.feature.peak_local_max(image,
    min_distance=min_distance, labels=labels, exclude_border=False)`` (a test compares them on real
    tiles), about 2.6× faster on a 1000×1000 tile with ~500 nuclei."""
    from scipy import ndimage as ndi

    footprint = np.ones((2 * min_distance + 1,) * 2, bool)
    threshold = image.min()
    floor = np.finfo(image.dtype).min if np.issubdtype(image.dtype, np.floating) else np.iinfo(image.dtype).min
    found = []
    for i, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        inside = labels[box] == i + 1
        region = image[box].copy()
        region[~inside] = floor  # other regions' pixels never suppress this region's peaks
        if region.size == 1:
            candidates = region > threshold
        else:
            candidates = region == ndi.maximum_filter(region, footprint=footprint, mode="nearest")
            if np.all(candidates[inside]):  # a flat region: its isolated pixels are its peaks
                candidates[:] = False
                candidates[np.logical_xor(inside, ndi.binary_opening(inside))] = True
            candidates &= region > threshold
        where = np.nonzero(candidates)
        coords = np.transpose(where)[np.argsort(-region[where], kind="stable")]
        if min_distance > 1:
            coords = _spaced(coords, min_distance)
        found.append(coords + [box[0].start, box[1].start])
    return np.vstack(found).astype(np.intp) if found else np.empty((0, 2), np.intp)


def probability_foreground(probability: np.ndarray, rules: InstanceRules = InstanceRules()) -> np.ndarray:
    """The pixels a nuclei map marks under the rules' threshold (fixed, or Otsu never below it)."""
    threshold = rules.threshold
    if rules.threshold_rule == "otsu" and float(probability.max()) > float(probability.min()):
        from skimage.filters import threshold_otsu

        threshold = max(threshold, float(threshold_otsu(probability)))
    return probability >= threshold


def instances_from_probability(probability: np.ndarray, rules: InstanceRules = InstanceRules()) -> np.ndarray:
    return instances_from_mask(probability_foreground(probability, rules), rules, probability)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..N in raster order of first appearance (stable across runs)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def nucleus_uid(model_version: str, centroid: tuple[float, float], area_px: int) -> str:
    """A nucleus's stable id: the same model version finding the same nucleus (same slide-coordinate
    centroid to the pixel, same area) gives the same id, in any request and on any machine. 16 hex
    digits of SHA-256, so ids from different tiles of one slide do not collide in practice."""
    import hashlib

    key = f"{model_version}|{round(centroid[0])}|{round(centroid[1])}|{area_px}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def describe_instances(labels: np.ndarray, pixel_size_um: float | None = None,
                       tolerance: float = 0.75, probability: np.ndarray | None = None,
                       offset: tuple[int, int] = (0, 0), model_version: str = "") -> list[dict]:
    """Per nucleus: id (1..N in this tile), uid (``nucleus_uid``), centroid (x, y), area in px (and µm²
    with a pixel size), bbox [x0, y0, x1, y1), the outer contour as a closed polygon of (x, y)
    pixel-corner coordinates simplified to within ``tolerance`` px (Douglas-Peucker, topology kept, all
    nuclei in one GEOS call: skimage's per-contour ``approximate_polygon`` took 60% of /segment's
    post-processing on a 1000x1000 tile) and, given the map that produced the nuclei, ``probability``:
    the map's mean inside the nucleus. ``offset`` (x, y) is added to every coordinate: the tile's
    top-left corner in slide pixels, so that contours land where they belong on the slide."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours, regionprops

    dx, dy = offset
    regions = regionprops(labels)
    means = (ndi.mean(probability, labels, [r.label for r in regions]) if probability is not None and regions
             else None)
    rings = []
    for region in regions:
        y0, x0, _, _ = region.bbox
        crop = np.pad(region.image, 1)
        contour = max(find_contours(crop.astype(np.uint8), 0.5), key=len)  # (row, col), closed
        rings.append(np.column_stack([contour[:, 1] - 1 + x0 + 0.5, contour[:, 0] - 1 + y0 + 0.5]))
    out = []
    for k, (region, ring) in enumerate(zip(regions, simplify_rings(rings, tolerance))):
        y0, x0, y1, x1 = region.bbox
        polygon = [[round(float(x) + dx, 2), round(float(y) + dy, 2)] for x, y in ring]
        if polygon[0] != polygon[-1]:
            polygon.append(polygon[0])
        polygon = _valid_ring(polygon, (y0 + dy, x0 + dx, y1 + dy, x1 + dx))
        cy, cx = region.centroid
        centroid = [round(float(cx) + dx, 2), round(float(cy) + dy, 2)]
        item = {"id": int(region.label), "uid": nucleus_uid(model_version, centroid, int(region.area)),
                "centroid": centroid, "area_px": int(region.area),
                "bbox": [int(x0) + dx, int(y0) + dy, int(x1) + dx, int(y1) + dy], "contour": polygon}
        if pixel_size_um is not None:
            item["area_um2"] = round(float(region.area) * pixel_size_um ** 2, 3)
        if means is not None:
            item["probability"] = round(float(np.clip(means[k], 0.0, 1.0)), 4)
        out.append(item)
    return out


def simplify_rings(rings: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Closed (x, y) rings simplified together; a ring GEOS cannot make a polygon of (under 4 points)
    comes back as it was."""
    import shapely

    usable = [i for i, r in enumerate(rings) if len(r) >= 4]
    out = list(rings)
    if not usable:
        return out
    coords = np.concatenate([rings[i] for i in usable])
    index = np.repeat(np.arange(len(usable)), [len(rings[i]) for i in usable])
    polygons = shapely.polygons(shapely.linearrings(coords, indices=index))
    simplified = shapely.simplify(polygons, tolerance, preserve_topology=True)
    points, owner = shapely.get_coordinates(simplified, return_index=True)
    starts = np.searchsorted(owner, np.arange(len(usable)))
    for k, (i, part) in enumerate(zip(usable, np.split(points, starts[1:]))):
        out[i] = part if len(part) >= 4 else rings[i]
    return out


def _valid_ring(ring: list[list[float]], bbox: tuple[int, int, int, int]) -> list[list[float]]:
    """A closed ring GeoJSON validators accept (RFC 7946): at least 4 positions, counter-clockwise
    by the shoelace sign of its (x, y) numbers. A contour simplified below that (a nucleus a pixel or
    two wide) becomes its bounding box."""
    if len(ring) < 4:
        y0, x0, y1, x1 = bbox
        ring = [[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]
    area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:]))
    return ring if area2 > 0 else ring[::-1]


def geojson(instances: list[dict], model_version: str = "") -> dict:
    """A GeoJSON FeatureCollection of nucleus polygons in pixel coordinates, as QuPath imports it
    (File > Import objects): each a detection classified 'Nucleus'."""
    features = []
    for item in instances:
        props = {"objectType": "detection", "classification": {"name": "Nucleus"},
                 "measurements": {"area_px": item["area_px"],
                                  **{k: item[k] for k in ("area_um2", "probability") if k in item}},
                 "medcl_id": item["id"], "medcl_uid": item["uid"]}
        if model_version:
            props["model_version"] = model_version
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [item["contour"]]},
                         "properties": props})
    return {"type": "FeatureCollection", "features": features}


def label_png(labels: np.ndarray) -> bytes:
    """The label image as a 16-bit greyscale PNG (0 = background), lossless up to 65,535 nuclei."""
    from PIL import Image

    if labels.max(initial=0) > 65535:
        raise ValueError("more than 65,535 nuclei do not fit a 16-bit label PNG")
    buffer = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


# Inference windows are at least this large, whatever window the model was exported with: the network is
# fully convolutional and the export's graph takes any size, so the window only bounds memory. Every
# window recomputes 2 x the receptive-field radius at each inner edge; at 512 px that was 2.2x the pixels
# of a 1000 x 1000 tile, at 1024 px such a tile is one run (docs/benchmarks.md). MEDCL_SEGMENT_WINDOW
# lowers it on hosts short of memory (~0.1 GB per megapixel of window in onnxruntime's arena).
INFERENCE_WINDOW = int(os.environ.get("MEDCL_SEGMENT_WINDOW", 1024))


def inference_window(exported_window: int, margin: int) -> int:
    """The window /segment and the benchmarks run: the larger of the export's and INFERENCE_WINDOW,
    and always more than twice the margin."""
    return max(exported_window, INFERENCE_WINDOW, 2 * margin + 64)


def sliding_window(image: np.ndarray, run: Callable[[np.ndarray], np.ndarray], window: int, margin: int,
                   batch: int = 4) -> np.ndarray:
    """Apply a fully convolutional network to an image of any size, tile by tile, with no seams.

    ``image`` is (C, H, W); ``run`` maps (N, C, h, w) to (N, K, h, w). Tiles overlap by 2 x
    ``margin`` and only each tile's centre is kept (the border tiles keep their outer edge): with a
    margin at least the network's receptive-field radius, the result equals running the whole image
    at once, so no blending is needed and none of its artefacts appear.
    """
    _, height, width = image.shape
    if height <= window and width <= window:
        return run(image[None])[0]
    if window <= 2 * margin:
        raise ValueError(f"window {window} must exceed twice the margin {margin}")
    step = window - 2 * margin
    tiles, places = [], []
    for y in _starts(height, window, step):
        for x in _starts(width, window, step):
            tiles.append(image[:, y:y + window, x:x + window])
            places.append((y, x))
    outputs = []
    for i in range(0, len(tiles), batch):
        outputs.extend(run(np.stack(tiles[i:i + batch])))
    result = np.zeros((outputs[0].shape[0], height, width), np.float32)
    for (y, x), out in zip(places, outputs):
        h, w = out.shape[1:]
        top = 0 if y == 0 else margin
        left = 0 if x == 0 else margin
        bottom = h if y + h >= height else h - margin
        right = w if x + w >= width else w - margin
        result[:, y + top:y + bottom, x + left:x + right] = out[:, top:bottom, left:right]
    return result


def _starts(length: int, window: int, step: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, step))
    starts.append(length - window)  # the last tile flush with the edge
    return starts


# --- metrics over instance label images (0 = background) -------------------------------------------

def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pixel-level Dice of the foreground."""
    p, t = pred > 0, truth > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)


def _overlaps(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection matrix (truth x pred, background excluded) and each instance's area."""
    t = relabel(truth).ravel().astype(np.int64)
    p = relabel(pred).ravel().astype(np.int64)
    nt, np_ = int(t.max(initial=0)), int(p.max(initial=0))
    joint = np.bincount(t * (np_ + 1) + p, minlength=(nt + 1) * (np_ + 1)).reshape(nt + 1, np_ + 1)
    return joint[1:, 1:], joint[1:, :].sum(1), joint[:, 1:].sum(0)


def aji(truth: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017, the MoNuSeg metric): each true nucleus is paired
    with the predicted one of highest IoU; unpaired predictions add to the union."""
    inter, t_area, p_area = _overlaps(truth, pred)
    if len(t_area) == 0:
        return 1.0 if len(p_area) == 0 else 0.0
    if len(p_area) == 0:
        return 0.0
    union = t_area[:, None] + p_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.argmax(1)
    rows = np.arange(len(t_area))
    paired = inter[rows, best] > 0
    total_inter = inter[rows, best][paired].sum()
    total_union = union[rows, best][paired].sum() + t_area[~paired].sum()
    used = np.zeros(len(p_area), bool)
    used[best[paired]] = True
    total_union += p_area[~used].sum()
    return float(total_inter / total_union) if total_union else 0.0


def panoptic_quality(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """PQ = DQ x SQ (Kirillov et al. 2019) with the unique matching IoU > 0.5."""
    inter, t_area, p_area = _overlaps(truth, pred)
    if len(t_area) == 0 and len(p_area) == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0}
    union = t_area[:, None] + p_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    matched = iou > 0.5
    tp = int(matched.sum())
    fn, fp = len(t_area) - tp, len(p_area) - tp
    dq = tp / (tp + 0.5 * fn + 0.5 * fp) if (tp + fn + fp) else 0.0
    sq = float(iou[matched].mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq}


def segmentation_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    pq = panoptic_quality(truth, pred)
    return {"dice": dice(pred, truth), "aji": aji(truth, pred), "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"],
            "nuclei_true": int(len(np.unique(truth)) - (truth == 0).any()),
            "nuclei_found": int(len(np.unique(pred)) - (pred == 0).any())}


def dumps_geojson(collection: dict) -> str:
    return json.dumps(collection, separators=(",", ":"))


def classical_instances(rgb: np.ndarray, rules: InstanceRules = InstanceRules()) -> np.ndarray:
    """The classical baseline: haematoxylin by colour deconvolution, Otsu threshold, the same
    morphology and watershed as the networks' maps."""
    return instances_from_mask(otsu_foreground(haematoxylin(rgb)), rules)
