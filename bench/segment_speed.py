"""Time per megapixel of nuclei segmentation on real 1000x1000 MoNuSeg tiles, split into the service's
three stages, against the network's FLOP floor; then /segment end to end over HTTP.

Stages, each the very function the service runs:
- decode: the PNG bytes to RGB (``decode_image`` with the service's formats, ``to_rgb``) and to the
  network's (C, H, W) float input (``network_input``: RGB, plus the stain channel where the card asks);
- inference: the sliding window of onnxruntime calls (``sliding_window``, the window /segment runs and
  the card's margin); skipped under the "classical" rule, as the service skips it;
- post-processing: the label-free check against the stain and the choice of answer, threshold, watershed
  instances, per-nucleus description (``answer_tile``, ``describe_instances``).
Each answer rule is timed apart: the card's own (what a plain /segment runs) and "network-or-classical"
(the network checked against the stain, what ``method=network-or-classical`` runs).
The floor is the network's FLOP count on the whole tile at once (torch's counter) divided by the
machine's GEMM peak; the windows overlap, so inference does somewhat more work than that.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.engines import summarise_latencies
from bench.machine import model_gflops


def stage_timings(package_dir: Path, tiles: list[Path], rule: str | None = None) -> dict:
    """Seconds per megapixel of each stage under one answer rule (default: the card's)."""
    from medcl.preprocess import SERVICE_FORMATS, decode_image, to_rgb
    from medcl.nuclei_check import answer_tile
    from medcl.segmentation import (InstanceRules, describe_instances, inference_window, network_input,
                                    sliding_window)
    from service.package import ModelPackage

    package = ModelPackage(package_dir)
    spec = package.card.segmentation
    rules = InstanceRules.of(spec)
    window = inference_window(spec.window, spec.receptive_radius)  # what /segment runs
    rule = rule or spec.serve
    stages: dict[str, float] = {"decode": 0.0, "inference": 0.0, "post_processing": 0.0}
    megapixels, nuclei = 0.0, 0
    produced: dict[str, int] = {}
    for n, path in enumerate(tiles):
        data = path.read_bytes()
        t0 = time.perf_counter()
        image = to_rgb(decode_image(data, 4096 * 4096, SERVICE_FORMATS))
        rgb = np.asarray(image)
        chw = network_input(rgb, spec.inputs) if rule != "classical" else None
        t1 = time.perf_counter()
        probability = None
        if rule != "classical":  # the service runs no network for a classical answer
            probability = sliding_window(chw, lambda b: package.run(b, "nuclei"), window, spec.receptive_radius)
            probability = probability[0]  # the package's "nuclei" output is the chosen map alone
        t2 = time.perf_counter()
        answer = answer_tile(probability, rgb, rules, rule)
        found = describe_instances(answer.labels, None, probability=answer.confidence)
        t3 = time.perf_counter()
        if n == 0:
            continue  # warm-up: session start, first allocations
        produced[answer.produced_by] = produced.get(answer.produced_by, 0) + 1
        stages["decode"] += t1 - t0
        stages["inference"] += t2 - t1
        stages["post_processing"] += t3 - t2
        megapixels += image.width * image.height / 1e6
        nuclei += len(found)
    per_mp = {k: round(v / megapixels, 4) for k, v in stages.items()}
    per_mp["total"] = round(sum(stages.values()) / megapixels, 4)
    return {"seconds_per_megapixel": per_mp, "tiles_timed": len(tiles) - 1, "megapixels": round(megapixels, 2),
            "nuclei_per_tile": round(nuclei / max(1, len(tiles) - 1), 1), "window": window,
            "margin": spec.receptive_radius, "provider": package.provider, "rule": rule,
            "produced_by": produced}


def flop_floor(run_dir: Path, height: int, width: int, peak_gflops: float) -> dict:
    """The network's GFLOP on one whole tile and the time that costs at the GEMM peak, per megapixel."""
    from training.nuclei import load_segmenter

    from medcl.segmentation import network_input_channels

    network, card = load_segmenter(run_dir)
    gflop = model_gflops(network, (len(network_input_channels(card.segmentation.inputs)), height, width))
    per_mp = gflop / (height * width / 1e6)
    return {"gflop_per_megapixel": round(per_mp, 2), "floor_seconds_per_megapixel": round(per_mp / peak_gflops, 4)}


def http_timings(url: str, headers: dict[str, str], tiles: list[Path], method: str = "auto") -> dict:
    """One tile per request, one request at a time, as the raw request body: seconds per megapixel as a
    client sees it. ``method``: the answer rule asked for (auto: the card's)."""
    import httpx
    from PIL import Image

    latencies, megapixels = [], 0.0
    with httpx.Client(headers=headers, timeout=300) as http:
        for n, path in enumerate(tiles):
            t0 = time.perf_counter()
            r = http.post(f"{url}/segment", params={"method": method}, content=path.read_bytes(),
                          headers={"Content-Type": "image/png"})
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"/segment answered {r.status_code}: {r.text[:300]}")
            if n == 0:
                continue
            latencies.append(elapsed)
            with Image.open(path) as im:
                megapixels += im.width * im.height / 1e6
    result = summarise_latencies(latencies, images=len(latencies), requests=len(latencies), elapsed=sum(latencies))
    result["seconds_per_megapixel"] = round(sum(latencies) / megapixels, 4)
    return result
