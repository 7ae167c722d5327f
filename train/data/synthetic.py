"""Small generated datasets for tests and benchmarks (no downloads)."""

import numpy as np

from train.data.indexed_writer import IndexedDatasetWriter, commit_all


def write_documents(prefix: str, documents: list, dtype=np.uint16) -> str:
    """Write each document (a sequence of ids) as one sequence of a committed pair."""
    writer = IndexedDatasetWriter(prefix, dtype)
    lengths = np.array([len(document) for document in documents], dtype=np.int32)
    flat = np.concatenate([np.asarray(d) for d in documents]) if documents else np.zeros(0)
    writer.add_documents(flat, lengths)
    writer.finish()
    commit_all([writer])
    return prefix


def write_random_documents(
    prefix: str, document_count: int, mean_length: int, vocab_size: int, eod_id: int, seed: int
) -> str:
    """Documents of geometric-ish random lengths, random ids in [0, vocab) ending in eod_id."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.exponential(mean_length, document_count).astype(np.int32))
    flat = rng.integers(0, vocab_size, size=int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths) - 1
    flat[flat == eod_id] = (eod_id + 1) % vocab_size  # eod only at document ends
    flat[ends] = eod_id
    writer = IndexedDatasetWriter(prefix, np.uint16 if vocab_size < 65500 else np.int32)
    writer.add_documents(flat, lengths)
    writer.finish()
    commit_all([writer])
    return prefix
