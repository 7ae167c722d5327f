"""Megatron's packing index for GPTDataset, built with numpy and cached atomically.

Three arrays describe how documents are packed into samples of seq_length + 1 tokens
(consecutive samples overlap by one token, so every token is a target exactly once):

    document_index (E*docs,) int32   document order: each epoch a fresh permutation
    sample_index   (N_all+1, 2) int32 sample i runs from (document_index position, offset)
                                      sample_index[i] to sample_index[i+1], both inclusive
    shuffle_index  (N,) int64         sample order: samples of the complete epochs
                                      shuffled together, those of the last partial epoch
                                      shuffled separately after them (Megatron's
                                      separate final epoch), truncated to the N requested

The cache file `<cache_dir>/<name>-<hash>.npz` holds all three plus the description the
hash was taken from. Every rank that finds it missing or unreadable computes it (the
result is identical from the seed) and writes it as a temporary file renamed into place,
so ranks sharing a file system may race safely and ranks without one still agree.
"""

import hashlib
import json
import os
import uuid

import numpy as np

from train.data.errors import DataError


def epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs E with (E * tokens - 1) // seq_length >= num_samples."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def samples_in(tokens: int, seq_length: int) -> int:
    return max(0, (tokens - 1) // seq_length)


def build_packing_index(
    document_lengths: np.ndarray, seq_length: int, num_samples: int | None, seed: int
) -> dict[str, np.ndarray]:
    """The three arrays above for `num_samples` samples (None: one epoch's worth)."""
    lengths = np.asarray(document_lengths, dtype=np.int64)
    tokens_per_epoch = int(lengths.sum())
    if samples_in(tokens_per_epoch, seq_length) == 0:
        raise DataError(
            f"{tokens_per_epoch} tokens cannot fill one sample of {seq_length} + 1 tokens"
        )
    if num_samples is None:
        num_samples = samples_in(tokens_per_epoch, seq_length)
    epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.default_rng(seed)

    document_index = np.concatenate(
        [rng.permutation(len(lengths)).astype(np.int32) for _ in range(epochs)]
    )
    # Token position where each entry of document_index starts: (E*docs + 1,)
    starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(lengths[document_index], out=starts[1:])
    total_samples = samples_in(epochs * tokens_per_epoch, seq_length)
    boundaries = np.arange(total_samples + 1, dtype=np.int64) * seq_length
    # side="right" skips zero-length documents and lands on the next one at offset 0.
    position = np.searchsorted(starts, boundaries, side="right") - 1
    sample_index = np.stack([position, boundaries - starts[position]], axis=1).astype(np.int32)

    full_epoch_samples = samples_in((epochs - 1) * tokens_per_epoch, seq_length)
    shuffle_index = np.concatenate(
        [
            rng.permutation(full_epoch_samples),
            full_epoch_samples + rng.permutation(total_samples - full_epoch_samples),
        ]
    )[:num_samples].astype(np.int64)
    return {
        "document_index": document_index,
        "sample_index": sample_index,
        "shuffle_index": shuffle_index,
    }


def _cache_path(cache_dir: str, name: str, description: dict) -> str:
    digest = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{name}-{digest}.npz")


def _read_cache(path: str, description: dict) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as stored:
            if json.loads(str(stored["description"])) != description:
                return None
            return {key: stored[key] for key in ("document_index", "sample_index", "shuffle_index")}
    except (OSError, ValueError, KeyError, EOFError):  # missing, partial or foreign
        return None


def _write_cache(path: str, description: dict, arrays: dict[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as stream:
            np.savez(stream, description=json.dumps(description, sort_keys=True), **arrays)
        os.replace(temporary, path)
    except OSError:  # a read-only cache dir costs a recomputation next time, nothing more
        if os.path.exists(temporary):
            os.remove(temporary)


def cached_packing_index(
    document_lengths: np.ndarray,
    seq_length: int,
    num_samples: int | None,
    seed: int,
    cache_dir: str | None,
    name: str,
    description: dict,
) -> dict[str, np.ndarray]:
    """build_packing_index, through `<cache_dir>/<name>-<hash>.npz` when cache_dir is set."""
    description = {**description, "seq_length": seq_length, "num_samples": num_samples, "seed": seed}
    if cache_dir is None:
        return build_packing_index(document_lengths, seq_length, num_samples, seed)
    path = _cache_path(cache_dir, name, description)
    arrays = _read_cache(path, description)
    if arrays is None:
        arrays = build_packing_index(document_lengths, seq_length, num_samples, seed)
        _write_cache(path, description, arrays)
    return arrays
