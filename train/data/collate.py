"""Batch collation: dataset samples ({"tokens", "loss_mask"} numpy arrays) to the model's tensors.

    python -m pytest tests/unit/test_data_datasets.py

The one torch module of train/data: every job (the training loop, in-loop validation, the
student-vs-teacher comparison) turns samples into batches here, so next-token targets and
the loss mask line up the same way everywhere.
"""

import numpy as np
import torch


def to_batch(samples: list[dict], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate dataset samples: inputs (B, T), targets (B, T), loss mask (B, T).

    Each sample's tokens hold T + 1 ids: inputs are the first T, targets the last T."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    mask = torch.from_numpy(np.stack([s["loss_mask"] for s in samples]).astype(np.float32))
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), mask.to(device)
