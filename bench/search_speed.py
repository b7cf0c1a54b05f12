"""Search speed and recall at scale, side by side in one run on the same vectors: the project's embedded
index (FAISS + SQLite, kind chosen automatically), plain FAISS (flat and HNSW) and the Milvus backend
(Milvus Lite, the embedded engine; a cluster would be timed against its own URI).

    python -m bench.search_speed runs/bloodmnist-s5cl-10pct --sizes 100000 1000000 --out docs/results/search-speed

Vectors with realistic structure: the encoder's embeddings of every real BloodMNIST tile, a Gaussian
per class fitted to them, and N vectors sampled from that mixture (never uniform noise, which makes
every approximate index look broken). Queries: the real test-split embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import write_results
from medcl.index.embedded import EmbeddedIndex
from medcl.index.milvus import MilvusIndex


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mixture(embeddings: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    draws = rng.multinomial(n, counts / counts.sum())
    parts = []
    for c, m in zip(classes, draws):
        x = embeddings[labels == c]
        parts.append(rng.multivariate_normal(x.mean(0), np.cov(x, rowvar=False), size=m, method="cholesky"))
    v = np.concatenate(parts).astype(np.float32)
    v = v[rng.permutation(len(v))]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def time_queries(search, queries: np.ndarray, single: int = 200) -> tuple[float, float, np.ndarray]:
    start = time.perf_counter()
    for q in queries[:single]:
        search(q[None])
    single_qps = single / (time.perf_counter() - start)
    start = time.perf_counter()
    ids = search(queries)
    batched_qps = len(queries) / (time.perf_counter() - start)
    return single_qps, batched_qps, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def time_case_index(record, make_index, describe, vectors: np.ndarray, queries: np.ndarray, single: int) -> None:
    """Build a CaseIndex in batches of 20,000, then time its queries; ``record`` writes the row."""
    before, start = rss_mb(), time.perf_counter()
    index = make_index()
    ids = []
    for i in range(0, len(vectors), 20_000):
        ids += index.add(vectors[i:i + 20_000])
    index.save()  # what `medcl index build` does at its end (HNSW snapshot; Milvus seals its segments)
    build = time.perf_counter() - start
    position = {case: j for j, case in enumerate(ids)}

    def search(q):
        return np.array([[position[h.id] for h in r.hits] for r in index.search(q, k=10)])

    record(describe(index), build, rss_mb() - before, *time_queries(search, queries, single=single))
    index.close()


def run_size(vectors: np.ndarray, queries: np.ndarray, milvus: bool) -> list[dict]:
    import faiss

    n, dim = vectors.shape
    rows = []
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    truth = exact.search(queries, 10)[1]

    def record(name, build_s, mem, single, batched, found):
        rows.append({"n": n, "system": name, "build_s": round(build_s, 1), "memory_mb": round(mem, 1),
                     "single_qps": round(single, 1), "batched_qps": round(batched, 1),
                     "recall@10": round(recall(found, truth), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    # plain FAISS, exact
    before, start = rss_mb(), time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    build = time.perf_counter() - start
    record("faiss flat (exact)", build, rss_mb() - before, *time_queries(lambda q: flat.search(q, 10)[1], queries))
    flat = None  # free it before the next build is measured
    # plain FAISS, HNSW with the parameters the embedded index uses
    before, start = rss_mb(), time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(vectors)
    hnsw.hnsw.efSearch = 128
    build = time.perf_counter() - start
    record("faiss HNSW (M 32, ef 128)", build, rss_mb() - before,
           *time_queries(lambda q: hnsw.search(q, 10)[1], queries))
    hnsw = None
    # the project's backends, through the CaseIndex interface (ids, metadata, durability included)
    with tempfile.TemporaryDirectory() as tmp:
        time_case_index(record, lambda: EmbeddedIndex(tmp, "bench", "v1", dim, kind="auto"),
                        lambda index: f"medcl embedded ({index.active_kind}, SQLite + FAISS)", vectors, queries, 200)
    if milvus:
        with tempfile.TemporaryDirectory() as tmp:
            time_case_index(record, lambda: MilvusIndex(str(Path(tmp) / "m.db"), "bench", "v1", dim),
                            lambda index: "medcl milvus (Milvus Lite, AUTOINDEX)", vectors, queries, 50)
    return rows


def embedding_sample(run: Path, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's embeddings of every tile of its data (train, val, test), their labels, and up to
    ``n_queries`` L2-normalised test embeddings as queries."""
    import torch

    from training.data import read_npz
    from training.engine import load_trained
    from training.metrics import predict

    model, card = load_trained(run)
    splits = read_npz(card.data.path, card.class_names)
    with torch.no_grad():
        parts = [(predict(model, s.images, card.preprocess.mean, card.preprocess.std)[1], s.labels)
                 for s in (splits.train, splits.val, splits.test)]
    emb = np.concatenate([e for e, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    queries = parts[2][0][:n_queries].astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return emb, labels, queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the encoder whose embeddings give the vectors their structure")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--milvus-max", type=int, default=100_000, help="largest size also run on Milvus Lite")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    emb, labels, queries = embedding_sample(args.run, args.queries)
    rows = []
    for n in args.sizes:
        rows += run_size(mixture(emb, labels, n), queries, milvus=n <= args.milvus_max)
    import faiss
    import os

    meta = {"encoder": str(args.run), "dim": int(emb.shape[1]), "queries": len(queries),
            "vectors": "per-class Gaussian mixture fitted to the encoder's embeddings of all BloodMNIST tiles",
            "cpu_cores": os.cpu_count(), "faiss": faiss.__version__, "rows": rows}
    lines = [f"# Case-index speed and recall ({meta['dim']}-d embeddings, {os.cpu_count()} CPU cores)", "",
             f"Vectors: {meta['vectors']}. Queries: {len(queries)} real test-split embeddings; single = one query",
             "per call, batched = all in one call. recall@10 against exact search. Memory: growth of this",
             "process's RSS while building (approximate).", "",
             "| vectors | system | build s | memory MB | single q/s | batched q/s | recall@10 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['system']} | {r['build_s']} | {r['memory_mb']} | {r['single_qps']} | "
                     f"{r['batched_qps']} | {r['recall@10']} |")
    write_results(args.out, meta, lines, f"python -m bench.search_speed {args.run} --sizes "
                  + " ".join(map(str, args.sizes)) + f" --milvus-max {args.milvus_max} --out {args.out}")


if __name__ == "__main__":
    main()
