"""MicroBatcher (service/batching.py) with real threads: every caller gets exactly its own rows,
waiting callers share a run, and a failing run fails every caller in it, not the batcher."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.batching import MicroBatcher


class SlowModel:
    """Doubles its input; records each batch's size; slow enough for callers to queue up."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(batch))
        time.sleep(0.02)
        if self.fail_on is not None and (batch == self.fail_on).any():
            raise ValueError("poisoned input")
        return batch * 2


@pytest.mark.parametrize("workers", [1, 2])
def test_each_caller_gets_its_own_rows_and_batches_form(workers: int) -> None:
    model = SlowModel()
    batcher = MicroBatcher(model, max_batch=16, workers=workers)
    inputs = [np.full((1 + i % 3, 4), float(i), np.float32) for i in range(60)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        outputs = list(pool.map(batcher, inputs))
    for x, y in zip(inputs, outputs):
        assert y.shape == x.shape and np.array_equal(y, x * 2)
    assert sum(model.sizes) == sum(len(x) for x in inputs)
    assert max(model.sizes) > 3 and max(model.sizes) <= 16  # callers shared runs, never beyond the cap


def test_a_lone_request_runs_at_once() -> None:
    model = SlowModel()
    batcher = MicroBatcher(model, max_batch=64)
    start = time.perf_counter()
    batcher(np.ones((1, 2), np.float32))
    assert model.sizes == [1] and time.perf_counter() - start < 1.0


def test_a_failing_run_fails_its_callers_and_the_batcher_goes_on() -> None:
    model = SlowModel(fail_on=-1.0)
    batcher = MicroBatcher(model, max_batch=8)
    with pytest.raises(ValueError, match="poisoned"):
        batcher(np.full((1, 2), -1.0, np.float32))
    assert np.array_equal(batcher(np.ones((2, 2), np.float32)), np.full((2, 2), 2.0))


# --- padding to fixed batch sizes (what a GPU session gets) ----------------------------------------

def test_padded_batches_give_the_rows_of_unpadded_runs(tiny_package) -> None:
    """A package padding its batches up to a power of two (as on a GPU) returns exactly the rows an
    unpadded run returns, for sizes that are and are not powers of two; real onnxruntime session."""
    from service.package import ModelPackage

    plain = ModelPackage(tiny_package)
    padded = ModelPackage(tiny_package)
    padded.pad_batches = True  # on the CPU the package would not pad; force it to check the arithmetic
    size = plain.card.preprocess.input_size
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 8, 13):
        x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
        assert padded._inputs(x)[plain.input_name].shape[0] == 1 << (n - 1).bit_length()
        np.testing.assert_allclose(padded.run(x, "logits"), plain.run(x, "logits"), rtol=1e-5, atol=1e-5)
        joined = padded.run_joined(x, ["logits", "embedding"])
        assert joined.shape[0] == n
        np.testing.assert_allclose(joined, plain.run_joined(x, ["logits", "embedding"]), rtol=1e-5, atol=1e-5)
    assert not plain.pad_batches  # CPU sessions run every batch size as it comes


def test_batch_buckets_cover_the_largest_batch(monkeypatch) -> None:
    from service.package import batch_buckets

    assert batch_buckets() == [1, 2, 4, 8, 16, 32, 64]
    monkeypatch.setenv("MEDCL_MAX_BATCH_SIZE", "48")
    assert batch_buckets()[-1] == 64
    monkeypatch.setenv("MEDCL_MAX_BATCH_SIZE", "1")
    assert batch_buckets() == [1]


def test_cuda_sessions_use_heuristic_convolution_search(monkeypatch) -> None:
    from medcl.runtime import providers_for

    chosen = providers_for(Path("pkg"), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert chosen == [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]
    monkeypatch.setenv("MEDCL_CUDNN_CONV_ALGO_SEARCH", "exhaustive")
    assert providers_for(Path("pkg"), ["CUDAExecutionProvider"])[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert providers_for(Path("pkg"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
