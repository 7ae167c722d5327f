"""Batch collation and the jobs' datasets: pytest tests/unit/test_data_collate.py"""

import numpy as np
import torch

from train.data.collate import to_batch
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
