"""BlendedDataset: samples drawn from several datasets in exact weight proportions.

Megatron's build_blending_indices picks, for each sample, the source furthest behind its
target share (a greedy loop in C++). We get the same kind of stream without a Python loop:
the k-th sample of source d is due at "time" (k + 0.5) / w_d, and sorting all due times
(ties to the lower source index) gives the order. After any n samples, every source's
count is within about one sample of w_d * n (the tests measure it against Megatron's
greedy), and the stream is a pure function of the weights: identical on every rank.
"""

import numpy as np

from train.data.errors import DataError


def build_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index (size,) int16, dataset_sample_index (size,) int64) for `size` samples.

    dataset_sample_index[i] is how many samples of dataset_index[i] came before i.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or np.any(~np.isfinite(weights)) or np.any(weights <= 0):
        raise DataError(f"blend weights must be positive, got {weights.tolist()}")
    weights = weights / weights.sum()
    due_times, sources = [], []
    for source, weight in enumerate(weights):
        count = int(np.ceil(weight * size)) + 2  # a little more than it can ever be given
        due_times.append((np.arange(count) + 0.5) / weight)
        sources.append(np.full(count, source, dtype=np.int16))
    due_times, sources = np.concatenate(due_times), np.concatenate(sources)
    order = np.lexsort((sources, due_times))[:size]
    dataset_index = sources[order]
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for source in range(len(weights)):  # running count of each source: (size,)
        chosen = dataset_index == source
        dataset_sample_index[chosen] = np.arange(int(chosen.sum()))
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """Sample i is datasets[dataset_index[i]][dataset_sample_index[i]]."""

    def __init__(self, datasets: list, weights: list[float], size: int):
        self.datasets = datasets
        self.weights = list(weights)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)
        for source, dataset in enumerate(datasets):
            needed = int(np.sum(self.dataset_index == source))
            if len(dataset) < needed:
                raise DataError(f"dataset {source} has {len(dataset)} samples, blend needs {needed}")

    @staticmethod
    def samples_per_dataset(weights: list[float], size: int) -> list[int]:
        """How many samples each dataset must provide for a blend of `size`."""
        dataset_index, _ = build_blending_indices(weights, size)
        return np.bincount(dataset_index, minlength=len(weights)).tolist()

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        dataset = self.datasets[self.dataset_index[index]]
        return dataset[int(self.dataset_sample_index[index])]
