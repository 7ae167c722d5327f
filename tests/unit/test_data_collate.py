"""Batch collation and the jobs' datasets: pytest tests/unit/test_data_collate.py"""

import threading

import numpy as np
import pytest
import torch

from train.data.collate import Prefetcher, to_batch
from train.data.job_datasets import SyntheticSequences


def test_to_batch_shifts_targets_and_keeps_the_mask():
    samples = [{"tokens": np.arange(5) + 10 * i, "loss_mask": np.array([1, 1, 0, 1], np.float32)} for i in range(2)]
    inputs, targets, mask = to_batch(samples, "cpu")
    assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.float32
    assert inputs.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert targets.tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]
    assert mask.tolist() == [[1, 1, 0, 1]] * 2


def test_synthetic_sequences_are_seeded_and_fit_the_vocabulary():
    data = SyntheticSequences(vocab_size=50, seq_length=8, seed=3)
    first, again = data[7], SyntheticSequences(50, 8, 3)[7]
    assert np.array_equal(first["tokens"], again["tokens"]) and first["tokens"].shape == (9,)
    assert first["tokens"].max() < 50 and first["loss_mask"].shape == (8,)


def test_prefetcher_keeps_the_order_and_reads_ahead_in_a_thread():
    readers, reading = set(), threading.Event()

    def items():
        for index in range(10):
            readers.add(threading.current_thread().name)
            if index == 3:
                reading.set()  # 3 items made before the consumer asked for any
            yield index

    prefetcher = Prefetcher(items(), depth=3)
    assert reading.wait(5)
    assert list(prefetcher) == list(range(10)) and readers == {"prefetch"}
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_prefetcher_raises_the_readers_error_and_closes():
    def items():
        yield 1
        raise ValueError("bad sample 7")

    prefetcher = Prefetcher(items(), depth=2)
    assert next(prefetcher) == 1
    with pytest.raises(ValueError, match="bad sample 7"):
        next(prefetcher)
    endless = Prefetcher(iter(int, 1), depth=2)  # never ends: close() must stop it
    next(endless)
    endless.close()
    assert not endless.thread.is_alive()
