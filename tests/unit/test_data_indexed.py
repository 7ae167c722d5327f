"""Megatron .bin/.idx byte compatibility and reader checks: pytest tests/unit/test_data_indexed.py"""

import struct

import numpy as np
import pytest

from train.data.errors import DataError
from train.data.indexed import IndexedDataset, check_vocab, count_tokens, token_dtype_for_vocab
from train.data.indexed_writer import IndexedDatasetWriter, commit_all


def write_megatron_style(prefix, sequences, dtype_code, np_dtype, document_indices):
    """Build a pair byte by byte with struct, following Megatron's _IndexWriter order."""
    with open(prefix + ".bin", "wb") as data:
        for sequence in sequences:
            data.write(np.asarray(sequence, dtype=np_dtype).tobytes())
    lengths = [len(s) for s in sequences]
    itemsize = np.dtype(np_dtype).itemsize
    pointers, position = [], 0
    for length in lengths:
        pointers.append(position)
        position += length * itemsize
    with open(prefix + ".idx", "wb") as index:
        index.write(b"MMIDIDX\x00\x00")
        index.write(struct.pack("<Q", 1))
        index.write(struct.pack("<B", dtype_code))
        index.write(struct.pack("<Q", len(sequences)))
        index.write(struct.pack("<Q", len(document_indices)))
        index.write(struct.pack(f"<{len(lengths)}i", *lengths))
        index.write(struct.pack(f"<{len(pointers)}q", *pointers))
        index.write(struct.pack(f"<{len(document_indices)}q", *document_indices))


def write_ours(prefix, sequences, dtype):
    writer = IndexedDatasetWriter(prefix, dtype)
    for sequence in sequences:
        writer.add_documents(np.asarray(sequence), np.array([len(sequence)]))
    writer.finish()
    commit_all([writer])


@pytest.mark.parametrize("code,np_dtype", [(8, np.uint16), (4, np.int32), (5, np.int64)])
def test_reads_file_built_the_megatron_way(tmp_path, code, np_dtype):
    rng = np.random.default_rng(code)
    sequences = [rng.integers(0, 60000, size=n) for n in (5, 1, 17, 3)]
    prefix = str(tmp_path / "megatron")
    # two documents of two sentences each: Megatron's document_indices [0, 2, 4]
    write_megatron_style(prefix, sequences, code, np_dtype, [0, 2, 4])
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 4
    assert dataset.dtype == np.dtype(np_dtype)
    assert list(dataset.document_indices) == [0, 2, 4]
    assert list(dataset.sequence_lengths) == [5, 1, 17, 3]
    for index, sequence in enumerate(sequences):
        np.testing.assert_array_equal(dataset[index], sequence)
    np.testing.assert_array_equal(dataset[-1], sequences[-1])
    np.testing.assert_array_equal(dataset.get(2, offset=3, length=4), sequences[2][3:7])
    assert count_tokens(prefix) == 26


def test_our_writer_bytes_field_by_field(tmp_path):
    sequences = [[1, 2, 3], [7], [9, 9, 9, 9, 65000]]
    prefix = str(tmp_path / "ours")
    write_ours(prefix, sequences, np.uint16)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)
    assert raw[17] == 8  # uint16
    assert struct.unpack("<QQ", raw[18:34]) == (3, 4)  # sequences, documents + 1
    assert struct.unpack("<3i", raw[34:46]) == (3, 1, 5)
    assert struct.unpack("<3q", raw[46:70]) == (0, 6, 8)  # byte offsets of uint16 tokens
    assert struct.unpack("<4q", raw[70:102]) == (0, 1, 2, 3)
    assert len(raw) == 102
    data = open(prefix + ".bin", "rb").read()
    assert data == np.array(sum(sequences, []), dtype="<u2").tobytes()
    # and the Megatron-way writer produces the identical .idx for the same content
    write_megatron_style(str(tmp_path / "ref"), sequences, 8, np.uint16, [0, 1, 2, 3])
    assert open(str(tmp_path / "ref") + ".idx", "rb").read() == raw


def test_dtype_rule_follows_megatron():
    assert token_dtype_for_vocab(50257) == np.uint16
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32
    assert token_dtype_for_vocab(151643) == np.int32


def test_empty_pair_round_trips(tmp_path):
    prefix = str(tmp_path / "empty")
    write_ours(prefix, [], np.int32)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 0 and list(dataset.document_indices) == [0]


def test_writer_leaves_no_final_names_until_commit(tmp_path):
    prefix = str(tmp_path / "partial")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_documents(np.array([1, 2, 3]), np.array([3]))
    writer.finish()
    assert not (tmp_path / "partial.bin").exists() and not (tmp_path / "partial.idx").exists()
    writer.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good_pair(tmp_path):
    prefix = str(tmp_path / "good")
    write_ours(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    return prefix


def test_wrong_magic(good_pair):
    raw = bytearray(open(good_pair + ".idx", "rb").read())
    raw[0:3] = b"XXX"
    open(good_pair + ".idx", "wb").write(raw)
    with pytest.raises(DataError, match="magic"):
        IndexedDataset(good_pair)


def test_wrong_version(good_pair):
    raw = bytearray(open(good_pair + ".idx", "rb").read())
    raw[9:17] = struct.pack("<Q", 2)
    open(good_pair + ".idx", "wb").write(raw)
    with pytest.raises(DataError, match="version 2"):
        IndexedDataset(good_pair)


@pytest.mark.parametrize("keep", [5, 20, 50])
def test_truncated_index(good_pair, keep):
    raw = open(good_pair + ".idx", "rb").read()
    open(good_pair + ".idx", "wb").write(raw[:keep])
    with pytest.raises(DataError, match="truncated|magic"):
        IndexedDataset(good_pair)


def test_bin_size_mismatch(good_pair):
    with open(good_pair + ".bin", "ab") as data:
        data.write(b"\x00\x00")
    with pytest.raises(DataError, match="does not match its index"):
        IndexedDataset(good_pair)


def test_missing_bin(good_pair):
    import os

    os.remove(good_pair + ".bin")
    with pytest.raises(DataError, match="missing"):
        IndexedDataset(good_pair)


def test_check_vocab_names_the_offending_sequence(tmp_path):
    prefix = str(tmp_path / "vocab")
    write_ours(prefix, [[1, 2, 3], [4, 99, 5], [6]], np.uint16)
    dataset = IndexedDataset(prefix)
    check_vocab(dataset, 100)
    with pytest.raises(DataError, match="token id 99 in sequence 1"):
        check_vocab(dataset, 99)
    with pytest.raises(DataError, match="sequence 1"):
        check_vocab(dataset, 50, chunk_tokens=2)  # the chunk boundary does not hide it
