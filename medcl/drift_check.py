"""`medcl drift`: read a running service's /metrics, take a window of traffic, compare it with the
served version's training reference (medcl/drift.py) and say whether to retrain."""

from __future__ import annotations

import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from medcl.drift import BUCKETS, DEFAULT_PSI_THRESHOLD, compare
from medcl.errors import MedclError

HISTOGRAMS = {"confidence": "medcl_drift_top_confidence", "distance": "medcl_drift_train_distance"}


class DriftCheckError(MedclError, RuntimeError):
    """The service cannot be read or does not report drift signals for that model."""


def _le(value: str) -> float:
    return float("inf") if value in ("+Inf", "Inf") else float(value)


def scrape(url: str, api_key: str | None = None) -> dict:
    """{(model, version): {"traffic": {signal: {le: count}}, "reference": {signal: {le: share}}}, "_active": ...}"""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{url.rstrip('/')}/metrics", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise DriftCheckError(f"cannot read {url}/metrics: {e}") from None
    if answer.status_code != 200:
        raise DriftCheckError(f"{url}/metrics answered {answer.status_code}")
    found: dict = defaultdict(lambda: {"traffic": defaultdict(dict), "reference": defaultdict(dict)})
    active: dict[str, str] = {}
    names = {f"{v}_bucket": k for k, v in HISTOGRAMS.items()}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name in names:
                key = (labels["model"], labels["version"])
                found[key]["traffic"][names[sample.name]][_le(labels["le"])] = sample.value
            elif sample.name == "medcl_drift_reference_share":
                key = (labels["model"], labels["version"])
                found[key]["reference"][labels["signal"]][_le(labels["le"])] = sample.value
            elif sample.name == "medcl_model_info" and sample.value == 1:
                active[labels["model"]] = labels["version"]
    return {"series": dict(found), "active": active}


def check(url: str, model: str | None = None, window_seconds: float = 0.0, api_key: str | None = None,
          threshold: float = DEFAULT_PSI_THRESHOLD, min_images: int = 200, baseline: dict | None = None) -> dict:
    """The verdict for one model: PSI of each signal over the window, and whether to retrain.

    The window is the traffic since ``baseline`` (an earlier ``scrape``), else the next
    ``window_seconds``, else everything since the service started."""
    given = baseline is not None
    if baseline is None and window_seconds > 0:
        baseline = scrape(url, api_key)
        time.sleep(window_seconds)
    first = baseline or {"series": {}, "active": {}}
    last = scrape(url, api_key)
    with_reference = sorted({m for (m, _), s in last["series"].items() if s["reference"]})
    if not with_reference:
        raise DriftCheckError(f"{url} reports no drift reference for any model (runs trained before drift signals existed "
                              "have none; retrain them)")
    model = model or with_reference[0]
    if model not in with_reference:
        raise DriftCheckError(f"no drift signals for model {model!r}; models with a reference: "
                              f"{', '.join(with_reference)}")
    version = last["active"].get(model) or max(
        (v for (m, v) in last["series"] if m == model),
        key=lambda v: sum(last["series"][(model, v)]["traffic"].get("confidence", {}).values()))
    now, before = last["series"].get((model, version)), first["series"].get((model, version))
    signals = {}
    for signal, bounds in BUCKETS.items():
        edges = [*bounds, float("inf")]
        reference = now["reference"].get(signal, {})
        if len(reference) < len(edges):
            continue
        counts_now = now["traffic"].get(signal, {})
        counts_before = before["traffic"].get(signal, {}) if before else {}
        window = [counts_now.get(le, 0.0) - counts_before.get(le, 0.0) for le in edges]
        signals[signal] = compare([reference[le] for le in edges], window, threshold)
    shifted = [s for s, r in signals.items() if r["shifted"] and r["images"] >= min_images]
    enough = any(r["images"] >= min_images for r in signals.values())
    if shifted:
        reason = f"{' and '.join(shifted)} shifted (PSI above {threshold})"
    elif not enough:
        reason = f"fewer than {min_images} images in the window; no verdict"
    else:
        reason = f"no signal shifted (PSI at most {threshold})"
    window = window_seconds or ("since the baseline scrape" if given else "since the service started")
    return {"model": model, "version": version, "window": window,
            "signals": signals, "retrain": bool(shifted), "reason": reason}
