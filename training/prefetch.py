"""Packs the next micro-batches on a background thread while the current step runs.

Packing is Python/NumPy work (best-fit over a document buffer); on a GPU it would otherwise sit on the critical path
between steps. The thread fills a small queue with (rows, loader state after those rows); the consumer copies rows
from pinned memory without blocking the host. `state_dict()` is the loader's position just after the last batch
*consumed*, so a checkpoint taken between steps resumes exactly where training stopped, prefetched batches or not.
"""
from __future__ import annotations

import queue
import threading
from typing import Any

import torch

_DONE = object()


class BatchPrefetcher:
    def __init__(self, loader: Any, device: torch.device, depth: int = 2):
        self._loader = loader
        self._device = device
        self._pin = device.type == "cuda"
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                rows = torch.from_numpy(self._loader.next_rows())
                if self._pin:
                    rows = rows.pin_memory()
                item = (rows, self._loader.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the consumer, never swallowed
            self._error = exc
            self._queue.put(_DONE)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._queue.get()
        if item is _DONE:
            raise RuntimeError("batch prefetch thread failed") from self._error
        rows, self._state = item
        rows = rows.to(self._device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
