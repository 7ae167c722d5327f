"""Megatron's indexed dataset format: read a `<prefix>.bin` + `<prefix>.idx` pair (numpy only).

Byte layout of `<prefix>.idx` (all integers little endian), as Megatron-LM and NeMo write it:

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8         version, uint64 = 1
    17      1         dtype code, uint8 (DTYPE_BY_CODE below) of the tokens in .bin
    18      8         sequence_count S, uint64
    26      8         document_index_count D, uint64 = documents + 1
    34      4*S       sequence_lengths, int32: tokens in each sequence
    34+4S   8*S       sequence_pointers, int64: byte offset of each sequence in .bin
    34+12S  8*D       document_indices, int64: sequence index where each document starts,
                      beginning with 0 and ending with S (so document k is sequences
                      [document_indices[k], document_indices[k+1]))
    (Megatron's multimodal variant appends int8 sequence modes; we never write it and
     read only the fields above.)

`<prefix>.bin` is the tokens of all sequences back to back, in that dtype, no header.
Our preprocessing writes one sequence per document, so S = documents and
document_indices = arange(S + 1).
"""

import mmap
import os
import struct
from functools import cached_property

import numpy as np

from train.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts: 34

# Megatron's DType enum values.
DTYPE_BY_CODE = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_BY_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_BY_CODE.items()}


def token_dtype_for_vocab(vocab_size: int) -> type:
    """uint16 when every id fits with margin (Megatron's rule: cardinality < 65500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def index_path(prefix: str) -> str:
    return prefix + ".idx"


def data_path(prefix: str) -> str:
    return prefix + ".bin"


def pair_exists(prefix: str) -> bool:
    return os.path.isfile(index_path(prefix)) and os.path.isfile(data_path(prefix))


class IndexHeader:
    """The fixed 34-byte head of an .idx file, validated."""

    def __init__(self, path: str, dtype_code: int, sequence_count: int, document_index_count: int):
        self.path = path
        self.dtype_code = dtype_code
        self.dtype = np.dtype(DTYPE_BY_CODE[dtype_code])
        self.sequence_count = sequence_count
        self.document_index_count = document_index_count

    @property
    def expected_index_bytes(self) -> int:
        return HEADER_BYTES + 12 * self.sequence_count + 8 * self.document_index_count


def read_index_header(path: str) -> IndexHeader:
    """Parse and check the header; DataError on wrong magic, version, dtype or a short file."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(HEADER_BYTES)
    except OSError as error:
        raise DataError(f"{path}: cannot read index file ({error.strerror})") from None
    if len(head) < len(INDEX_MAGIC) or head[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DataError(
            f"{path}: not a Megatron index file (magic {head[:9]!r}, expected {INDEX_MAGIC!r})"
        )
    if len(head) < HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(head)} of {HEADER_BYTES} bytes)")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise DataError(f"{path}: unsupported index version {version} (expected {INDEX_VERSION})")
    dtype_code = head[17]
    if dtype_code not in DTYPE_BY_CODE:
        raise DataError(f"{path}: unknown dtype code {dtype_code} (known: 1-8)")
    sequence_count, document_index_count = struct.unpack("<QQ", head[18:34])
    header = IndexHeader(path, dtype_code, sequence_count, document_index_count)
    actual = os.path.getsize(path)
    if actual < header.expected_index_bytes:
        raise DataError(
            f"{path}: truncated index ({actual} bytes; header promises {sequence_count} "
            f"sequences and {document_index_count} document indices = "
            f"{header.expected_index_bytes} bytes)"
        )
    return header


def _map_readonly(path: str) -> memoryview | bytes:
    """A read-only map of the whole file (empty files cannot be mmapped)."""
    if os.path.getsize(path) == 0:
        return b""
    with open(path, "rb") as stream:
        return memoryview(mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ))


class IndexedDataset:
    """Memory-mapped Megatron dataset: `len()` sequences, `[i]` -> that sequence's tokens.

    Files written by Megatron-LM / NeMo load unchanged. The .bin size is checked against
    the index so a truncated copy fails here, not mid-training.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        for path in (index_path(prefix), data_path(prefix)):
            if not os.path.isfile(path):
                raise DataError(f"{prefix}: missing {path}")
        self.header = read_index_header(index_path(prefix))
        self.dtype = self.header.dtype
        self._index_buffer = _map_readonly(index_path(prefix))
        count = self.header.sequence_count
        # (S,) int32 | (S,) int64 | (D,) int64, views into the mapped .idx
        self.sequence_lengths = np.frombuffer(
            self._index_buffer, np.int32, count, offset=HEADER_BYTES
        )
        self.sequence_pointers = np.frombuffer(
            self._index_buffer, np.int64, count, offset=HEADER_BYTES + 4 * count
        )
        self.document_indices = np.frombuffer(
            self._index_buffer,
            np.int64,
            self.header.document_index_count,
            offset=HEADER_BYTES + 12 * count,
        )
        self._check_data_size()
        self._data_buffer = _map_readonly(data_path(prefix))

    def _check_data_size(self) -> None:
        count = self.header.sequence_count
        expected = 0
        if count:
            expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        actual = os.path.getsize(data_path(self.prefix))
        if actual != expected:
            raise DataError(
                f"{data_path(self.prefix)}: size {actual} bytes does not match its index "
                f"({expected} bytes for {count} sequences of {self.dtype.name})"
            )

    def __len__(self) -> int:
        return self.header.sequence_count

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        return self.get(int(index) % len(self))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence `index`: a read-only view, no copy."""
        if length is None:
            length = int(self.sequence_lengths[index]) - offset
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data_buffer, self.dtype, length, offset=start)

    @cached_property
    def all_tokens(self) -> np.ndarray:
        """Every token in .bin as one flat read-only array (memory-mapped, not loaded)."""
        total = len(self._data_buffer) // self.dtype.itemsize
        return np.frombuffer(self._data_buffer, self.dtype, total)

    @property
    def token_count(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def document_count(self) -> int:
        return max(len(self.document_indices) - 1, 0)


def count_tokens(prefix: str) -> int:
    """Tokens in a pair from its .idx alone (reads S int32 lengths; never touches .bin)."""
    header = read_index_header(index_path(prefix))
    lengths = np.fromfile(
        index_path(prefix), np.int32, header.sequence_count, offset=HEADER_BYTES
    )
    return int(lengths.sum(dtype=np.int64))


def check_vocab(dataset: IndexedDataset, vocab_size: int, chunk_tokens: int = 1 << 26) -> None:
    """DataError if any token id is >= vocab_size (or negative); vectorized over .bin in chunks."""
    tokens = dataset.all_tokens
    for start in range(0, len(tokens), chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        bad = (chunk >= vocab_size) | (chunk < 0) if chunk.dtype.kind == "i" else chunk >= vocab_size
        if bad.any():
            position = start + int(np.argmax(bad))
            pointer_tokens = dataset.sequence_pointers // dataset.dtype.itemsize
            sequence = int(np.searchsorted(pointer_tokens, position, side="right") - 1)
            raise DataError(
                f"{dataset.prefix}: token id {int(tokens[position])} in sequence {sequence} "
                f"is outside the model's vocabulary of {vocab_size} "
                f"(largest id in file: {int(tokens.max())})"
            )
