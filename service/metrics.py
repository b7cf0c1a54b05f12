"""Prometheus metrics beyond BentoML's defaults (module level, so they appear on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from medcl.drift import BUCKETS

IMAGES = Counter("medcl_images_total", "Images processed", ["endpoint", "model"])
ERRORS = Counter("medcl_request_errors_total", "Requests refused or failed, by kind", ["endpoint", "kind"])
BATCH_SIZE = Histogram("medcl_model_batch_size", "Images per model call after adaptive batching", ["model", "output"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
INFERENCE_SECONDS = Histogram("medcl_inference_seconds", "Model call latency", ["model", "output"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
MODEL_INFO = Gauge("medcl_model_info", "Loaded model version (value 1)", ["model", "version", "provider"])
SEARCH_SECONDS = Histogram("medcl_search_seconds", "Vector search latency (index only, not embedding)",
                           ["model", "version"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1))
INDEX_CASES = Gauge("medcl_index_cases", "Cases in the case index", ["model", "version"])
REQUEST_SECONDS = Histogram("medcl_request_seconds", "End-to-end latency of API requests (the server's view)",
                            ["endpoint", "status_class"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
NUCLEI_PER_TILE = Histogram("medcl_nuclei_per_tile", "Nuclei found per segmented tile", ["model"],
                            buckets=(0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000))
SEGMENT_ANSWERS = Counter("medcl_segment_answers_total",
                          "Segmented tiles by the method that produced the answer (network, or the classical "
                          "fallback where the network's map failed its label-free check)", ["model", "produced_by"])
MODEL_REQUEST_SECONDS = Histogram("medcl_model_request_seconds",
                                  "Successful API requests per model and endpoint: decode to answer, in the API",
                                  ["model", "endpoint"],
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def observe_request(model: str, endpoint: str, started: float) -> None:
    import time

    MODEL_REQUEST_SECONDS.labels(model, endpoint).observe(time.perf_counter() - started)
MODEL_SWITCHES = Counter("medcl_model_switches_total", "Versions switched to while running (promotions, rollbacks)",
                         ["model"])

# Drift signals (medcl/drift.py): traffic per model version, and the training reference on the same buckets.
DRIFT_CONFIDENCE = Histogram("medcl_drift_top_confidence", "Top-class probability of classified images",
                             ["model", "version"], buckets=BUCKETS["confidence"])
DRIFT_DISTANCE = Histogram("medcl_drift_train_distance",
                           "Cosine distance of an image's embedding to the nearest training embedding (sample)",
                           ["model", "version"], buckets=BUCKETS["distance"])
DRIFT_REFERENCE = Gauge("medcl_drift_reference_share",
                        "Held-out images at or below each bucket bound at training time (cumulative share)",
                        ["model", "version", "signal", "le"])
