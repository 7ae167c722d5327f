"""Batch collation: dataset samples ({"tokens", "loss_mask"} numpy arrays) to the model's tensors,
and Prefetcher, which makes the training loop's next micro-batches in a background thread.

    python -m pytest tests/unit/test_data_datasets.py

The one torch module of train/data: every job (the training loop, in-loop validation, the
student-vs-teacher comparison) turns samples into batches here, so next-token targets and
the loss mask line up the same way everywhere.
"""

import queue
import threading

import numpy as np
import torch


def to_batch(samples: list[dict], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate dataset samples: inputs (B, T), targets (B, T), loss mask (B, T).

    Each sample's tokens hold T + 1 ids: inputs are the first T, targets the last T."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    mask = torch.from_numpy(np.stack([s["loss_mask"] for s in samples]).astype(np.float32))
    if device.startswith("cuda"):  # pinned host memory: the copies run asynchronously
        tokens, mask = tokens.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), mask.to(device)


class Prefetcher:
    """Iterates `items` in a background thread, at most `depth` items ahead of the consumer, so that
    reading and collating the next micro-batches overlaps the current step's compute.

    The order is the iterator's own: the trainer's data state (consumed_samples) and exact resume
    do not depend on how far ahead it has read. An exception in the thread is raised by next();
    close() stops the thread (it is a daemon: an unfinished one does not hold the process)."""

    _END = object()

    def __init__(self, items, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(iter(items),), name="prefetch", daemon=True)
        self.thread.start()

    def _fill(self, items) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            self._put(error)
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            self.queue.put(item)  # every later next() stops too
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
