"""Opportunistic batching inside one process: concurrent callers' arrays go to the model together.

Used when a model runs inline in the API process (``MEDCL_MODEL_PLACEMENT=inline``), where
BentoML's adaptive batching (which lives in a separate model process) does not apply. ``workers``
threads run the model; while they are busy, requests queue, and the next free worker takes
everything queued (up to ``max_batch`` images) in one call. An idle model runs a lone request at
once, so batching never adds a wait at low load; under load, batches grow by themselves.

Several workers over one onnxruntime session (its ``run`` is thread-safe), each run on one intra-op
thread, keep every core busy without onnxruntime's intra-op synchronisation, and leave a core to
HTTP and decoding whenever those need it (docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, name: str = "model",
                 workers: int = 1) -> None:
        self._run = run
        self._max_batch = max_batch
        self._queue: deque[tuple[np.ndarray, Future]] = deque()
        self._wake = threading.Condition()
        self._threads = [threading.Thread(target=self._serve, name=f"batcher-{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (N, ...) with whatever else is waiting; returns this caller's N rows."""
        done: Future = Future()
        with self._wake:
            self._queue.append((batch, done))
            self._wake.notify()
        return done.result()

    def _take(self) -> list[tuple[np.ndarray, Future]]:
        with self._wake:
            while not self._queue:
                self._wake.wait()
            # A fair share of what is queued, so one worker never takes it all while the others idle.
            queued = sum(len(a) for a, _ in self._queue)
            limit = min(self._max_batch, -(-queued // len(self._threads)))
            taken = [self._queue.popleft()]
            size = len(taken[0][0])
            # A request larger than the rest of the batch waits for the next run, never splits.
            while self._queue and size + len(self._queue[0][0]) <= limit:
                item = self._queue.popleft()
                taken.append(item)
                size += len(item[0])
            return taken

    def _serve(self) -> None:
        while True:
            taken = self._take()
            try:
                arrays = [a for a, _ in taken]
                outputs = self._run(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
            except BaseException as e:  # noqa: BLE001 - every waiting caller gets the model's error
                for _, done in taken:
                    done.set_exception(e)
                continue
            start = 0
            for array, done in taken:
                done.set_result(outputs[start:start + len(array)])
                start += len(array)
