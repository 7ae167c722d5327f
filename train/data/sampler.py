"""Which samples each data-parallel rank reads, and Megatron's --iterations-to-skip.

The data state of a run is one number, consumed_samples (global, over all DP ranks):
a resumed run builds MicroBatchSampler(total, consumed, ...) and reads exactly the next
sample. Each step of the sampler covers micro_batch_size * data_parallel_size consecutive
samples, rank r taking the r-th slice of micro_batch_size; a global batch is
num_microbatches such steps (Megatron's MegatronPretrainingSampler).
"""

import re

from train.data.errors import DataError


class MicroBatchSampler:
    """Yields lists of micro_batch_size sample indices for one data-parallel rank."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        if total_samples <= 0:
            raise DataError(f"no samples to train on (total_samples={total_samples})")
        if not 0 <= consumed_samples < total_samples:
            raise DataError(
                f"consumed_samples {consumed_samples} outside [0, total_samples={total_samples})"
            )
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.samples_per_step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank still yields (a last incomplete step is dropped)."""
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self):
        rank_offset = self.data_parallel_rank * self.micro_batch_size
        for step in range(len(self)):
            start = self.consumed_samples + step * self.samples_per_step + rank_offset
            yield list(range(start, start + self.micro_batch_size))

def parse_iterations_to_skip(text: str | list | None) -> list[int]:
    """Megatron's --iterations-to-skip list, e.g. "100 200-205" -> [100, 200, ..., 205].

    Accepts space- or comma-separated iteration numbers and inclusive ranges "a-b" (or a
    list of those). On a listed iteration the trainer fetches and discards that
    iteration's batches (consumed_samples advances by one global batch, so later batches
    are unchanged) and takes no optimizer step: the way to step over a batch that spikes
    the loss.
    """
    if text is None:
        return []
    parts = text if isinstance(text, list) else re.split(r"[\s,]+", str(text).strip())
    iterations = set()
    for part in (str(p).strip() for p in parts):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise DataError(f"iterations_to_skip: {part!r} is not an iteration or a range a-b")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if high < low:
            raise DataError(f"iterations_to_skip: range {part!r} runs backwards")
        iterations.update(range(low, high + 1))
    return sorted(iterations)
