"""MicroBatcher (service/batching.py) with real threads: every caller gets exactly its own rows,
waiting callers share a run, and a failing run fails every caller in it, not the batcher."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
