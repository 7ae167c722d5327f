"""Write Megatron `<prefix>.bin/.idx` pairs, streaming and atomic (see indexed.py for the layout).

Files are written as `<final>.tmp-<pid>` and renamed only by `commit_all()`: every .bin
first, then every .idx, so a killed run leaves no final-named .idx (the .idx is the
completion marker; the reader refuses a .bin without one).
"""

import os
import struct

import numpy as np

from train.data.indexed import (
    CODE_BY_DTYPE,
    INDEX_MAGIC,
    INDEX_VERSION,
    data_path,
    index_path,
)


def _temporary_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def write_index(path: str, dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an .idx file: header fields, then lengths, pointers, document indices."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    # Byte offset of each sequence in .bin: exclusive cumulative sum of lengths * itemsize.
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    documents = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as stream:
        stream.write(INDEX_MAGIC)  # 9 bytes
        stream.write(struct.pack("<Q", INDEX_VERSION))  # version 1
        stream.write(struct.pack("<B", CODE_BY_DTYPE[dtype]))  # token dtype code
        stream.write(struct.pack("<Q", len(lengths)))  # sequence count S
        stream.write(struct.pack("<Q", len(documents)))  # document indices count = docs + 1
        stream.write(lengths.astype("<i4").tobytes(order="C"))  # (S,) int32
        stream.write(pointers.astype("<i8").tobytes(order="C"))  # (S,) int64 byte offsets
        stream.write(documents.astype("<i8").tobytes(order="C"))  # (D,) int64


class IndexedDatasetWriter:
    """Append documents (one sequence each) to a pair; `finish()` writes the index.

    Tokens go straight to the temporary .bin; only the int32 lengths stay in memory.
    """

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._bin_temporary = _temporary_name(data_path(prefix))
        self._idx_temporary = _temporary_name(index_path(prefix))
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._bin = open(self._bin_temporary, "wb")
        self._length_chunks: list[np.ndarray] = []
        self.document_count = 0
        self.token_count = 0

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """flat_tokens: (sum(lengths),) tokens of several documents back to back."""
        if len(lengths) == 0:
            return
        self._bin.write(np.ascontiguousarray(flat_tokens, dtype=self.dtype).tobytes())
        self._length_chunks.append(np.asarray(lengths, dtype=np.int32))
        self.document_count += len(lengths)
        self.token_count += int(np.sum(lengths, dtype=np.int64))

    def finish(self) -> None:
        """Close .bin and write .idx, both still under temporary names."""
        self._bin.close()
        lengths = (
            np.concatenate(self._length_chunks) if self._length_chunks else np.zeros(0, np.int32)
        )
        write_index(self._idx_temporary, self.dtype, lengths, np.arange(len(lengths) + 1))

    def temporary_pairs(self) -> list[tuple[str, str]]:
        """(temporary, final) names, .bin then .idx."""
        return [
            (self._bin_temporary, data_path(self.prefix)),
            (self._idx_temporary, index_path(self.prefix)),
        ]

    def discard(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for temporary, _ in self.temporary_pairs():
            if os.path.exists(temporary):
                os.remove(temporary)


def commit_all(writers: list[IndexedDatasetWriter]) -> None:
    """Rename every finished pair into place: all .bin files first, then all .idx files."""
    moves = [pair for writer in writers for pair in writer.temporary_pairs()]
    for _, final in moves:  # an old .idx must not describe the new .bin, even briefly
        if final.endswith(".idx") and os.path.exists(final):
            os.remove(final)
    for temporary, final in [m for m in moves if m[1].endswith(".bin")]:
        os.replace(temporary, final)
    for temporary, final in [m for m in moves if m[1].endswith(".idx")]:
        os.replace(temporary, final)
