"""Packed GPT dataset, blending, sampler and resume: pytest tests/unit/test_data_datasets.py"""

import json
import os

import numpy as np
import pytest

from tests.fixtures.synthetic_data import write_documents, write_random_documents
from train.data.blended_dataset import BlendedDataset, build_blending_indices
from train.data.build import build_datasets
from train.data.errors import DataError
from train.data.gpt_dataset import GPTDataset, loss_mask_prefix
from train.data.sampler import MicroBatchSampler, parse_iterations_to_skip

EOD = 0


@pytest.fixture
def corpus(tmp_path):
    # Document d is [d*100+1, d*100+2, ..., EOD]: every token says which document it is from.
    documents = [[d * 100 + k + 1 for k in range(length)] + [EOD] for d, length in enumerate([5, 1, 12, 7, 3, 9])]
    return write_documents(str(tmp_path / "corpus_text_document"), documents), documents


def test_one_epoch_packs_every_token_once(corpus):
    prefix, documents = corpus
    seq_length = 4
    dataset = GPTDataset(prefix, seq_length, seed=3)
    total = sum(len(d) for d in documents)
    assert len(dataset) == (total - 1) // seq_length
    samples = [dataset[i]["tokens"] for i in range(len(dataset))]
    assert all(s.dtype == np.int64 and s.shape == (seq_length + 1,) for s in samples)
    # Unshuffle: samples in packing order overlap by one token and spell the documents
    # in the epoch's document order.
    order = np.argsort(dataset.shuffle_index)
    stream = np.concatenate([samples[order[0]]] + [samples[i][1:] for i in order[1:]])
    expected = np.concatenate([documents[d] for d in dataset.document_index])
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert len(stream) == len(dataset) * seq_length + 1


def test_shuffle_is_deterministic_from_seed(corpus, tmp_path):
    prefix, _ = corpus
    a = GPTDataset(prefix, 3, num_samples=20, seed=7)
    b = GPTDataset(prefix, 3, num_samples=20, seed=7, cache_dir=str(tmp_path / "cache"))
    c = GPTDataset(prefix, 3, num_samples=20, seed=8)
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(20))
    assert any(not np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(20))


def test_more_samples_than_one_epoch_adds_epochs(corpus):
    prefix, documents = corpus
    total = sum(len(d) for d in documents)
    one_epoch = (total - 1) // 4
    requested = 3 * one_epoch + 5  # 4 * 35 + 1 = 141 tokens > three epochs of 43
    dataset = GPTDataset(prefix, 4, num_samples=requested, seed=1)
    assert len(dataset) == requested
    assert len(dataset.document_index) == 4 * len(documents)  # four epochs of documents
    # each epoch is a full permutation of the documents
    for epoch in range(4):
        block = dataset.document_index[epoch * 6 : (epoch + 1) * 6]
        assert sorted(block.tolist()) == list(range(6))
    # the complete epochs come first in sample order
    full = (3 * total - 1) // 4
    assert dataset.shuffle_index[:full].max() < full


def test_cache_written_atomically_and_reused(corpus, tmp_path):
    prefix, _ = corpus
    cache = tmp_path / "cache"
    first = GPTDataset(prefix, 4, num_samples=10, seed=5, cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")
    # a corrupt cache (a half-written file from a killed writer) is recomputed, not trusted
    (cache / files[0]).write_bytes(b"garbage")
    again = GPTDataset(prefix, 4, num_samples=10, seed=5, cache_dir=str(cache))
    np.testing.assert_array_equal(first.shuffle_index, again.shuffle_index)
    assert not [f for f in os.listdir(cache) if ".tmp-" in f]
    # a different request gets a different file
    GPTDataset(prefix, 4, num_samples=11, seed=5, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 2


def test_loss_mask_from_companion_and_eod(tmp_path):
    documents = [[5, 6, 7, EOD], [8, 9, EOD]]
    prefix = write_documents(str(tmp_path / "sft_text_document"), documents)
    write_documents(loss_mask_prefix(prefix), [[0, 0, 1, 1], [0, 1, 1]], dtype=np.uint8)
    dataset = GPTDataset(prefix, 6, seed=0)
    sample = dataset[0]
    stream_mask = {5: 0, 6: 0, 7: 1, EOD: None, 8: 0, 9: 1}
    assert sample["loss_mask"].dtype == np.float32 and sample["loss_mask"].shape == (6,)
    # the mask belongs to the target: loss_mask[t] is the mask of tokens[t + 1]
    tokens = sample["tokens"]
    for t in range(6):
        expected = stream_mask[tokens[t + 1]]
        if expected is not None:
            assert sample["loss_mask"][t] == expected
    plain = write_documents(str(tmp_path / "plain_text_document"), documents)
    masked = GPTDataset(plain, 6, seed=0, eod_token_id=EOD, eod_mask_loss=True)[0]
    assert np.all(masked["loss_mask"][masked["tokens"][1:] == EOD] == 0)
    assert np.all(masked["loss_mask"][masked["tokens"][1:] != EOD] == 1)


def greedy_reference(weights, size):
    """Megatron's build_blending_indices loop, written plainly for comparison."""
    weights = np.asarray(weights, float) / np.sum(weights)
    counts = np.zeros(len(weights))
    chosen = []
    for i in range(size):
        source = int(np.argmax(weights * max(i, 1) - counts))
        chosen.append(source)
        counts[source] += 1
    return np.array(chosen)


def max_drift(stream, weights):
    weights = np.asarray(weights, float) / np.sum(weights)
    n = np.arange(1, len(stream) + 1)
    return max(np.abs(np.cumsum(stream == d) - weights[d] * n).max() for d in range(len(weights)))


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [1, 1], [0.01, 0.99], [3, 1, 4, 1, 5]])
def test_blending_tracks_weights_like_megatron(weights):
    size = 997
    dataset_index, dataset_sample_index = build_blending_indices(weights, size)
    assert len(dataset_index) == size
    assert max_drift(dataset_index, weights) <= max(1.0, max_drift(greedy_reference(weights, size), weights)) + 0.1
    for source in range(len(weights)):
        picks = dataset_sample_index[dataset_index == source]
        np.testing.assert_array_equal(picks, np.arange(len(picks)))


def test_blended_dataset_draws_from_sources(tmp_path):
    a = write_random_documents(str(tmp_path / "a"), 50, 20, 1000, EOD, seed=1)
    b = write_random_documents(str(tmp_path / "b"), 50, 20, 1000, EOD, seed=2)
    datasets = build_datasets({"train": [0.25, a, 0.75, b]}, 8, {"train": 100}, seed=3)
    train = datasets["train"]
    assert isinstance(train, BlendedDataset) and len(train) == 100
    assert np.bincount(train.dataset_index).tolist() == [25, 75]
    for i in (0, 1, 2, 3, 99):
        source = train.datasets[train.dataset_index[i]]
        expected = source[int(train.dataset_sample_index[i])]["tokens"]
        np.testing.assert_array_equal(train[i]["tokens"], expected)


def test_build_datasets_per_split(tmp_path):
    a = write_random_documents(str(tmp_path / "a"), 40, 30, 500, EOD, seed=1)
    b = write_random_documents(str(tmp_path / "b"), 40, 30, 500, EOD, seed=2)
    blend_path = tmp_path / "datablend_t.json"
    blend_path.write_text(json.dumps({"train": [1, a, 1, b], "valid": [b], "test": [a]}))
    datasets = build_datasets(str(blend_path), 16, {"train": 50, "valid": 7, "test": 0}, seed=1, cache_dir=str(tmp_path / "run"))
    assert set(datasets) == {"train", "valid"}
    assert len(datasets["valid"]) == 7
    again = build_datasets(str(blend_path), 16, {"train": 50, "valid": 7}, seed=1, cache_dir=str(tmp_path / "run"))
    for i in range(50):
        np.testing.assert_array_equal(datasets["train"][i]["tokens"], again["train"][i]["tokens"])


def test_too_few_tokens_is_a_clear_error(tmp_path):
    prefix = write_documents(str(tmp_path / "tiny"), [[1, 2]])
    with pytest.raises(DataError, match="tiny"):
        GPTDataset(prefix, 8)


def test_sampler_ranks_disjoint_and_resume_exact():
    total, mbs, dp = 103, 2, 3
    seen = []
    for rank in range(dp):
        seen += [i for batch in MicroBatchSampler(total, 0, mbs, rank, dp) for i in batch]
    assert len(seen) == len(set(seen)) == (total // (mbs * dp)) * mbs * dp
    # rank 1's first micro-batch is the second slice of the first step
    assert next(iter(MicroBatchSampler(total, 0, mbs, 1, dp))) == [2, 3]
    # stop after 5 steps, resume from consumed_samples: the stream continues exactly
    full = list(MicroBatchSampler(total, 0, mbs, 2, dp))
    consumed = 5 * mbs * dp
    assert list(MicroBatchSampler(total, consumed, mbs, 2, dp)) == full[5:]


@pytest.mark.parametrize("total,consumed", [(12, 0), (24, 6), (6, 0)])
def test_sampler_keeps_the_last_full_step(total, consumed):
    """A total that is a multiple of MBS x DP: every remaining sample is read, the last step too."""
    mbs, dp = 2, 3
    samplers = [MicroBatchSampler(total, consumed, mbs, rank, dp) for rank in range(dp)]
    assert all(len(sampler) == (total - consumed) // (mbs * dp) for sampler in samplers)
    seen = sorted(i for sampler in samplers for batch in sampler for i in batch)
    assert seen == list(range(consumed, total))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(DataError):
        MicroBatchSampler(10, 10, 1, 0, 1)
    with pytest.raises(DataError):
        MicroBatchSampler(10, 0, 1, 2, 2)


def test_parse_iterations_to_skip():
    assert parse_iterations_to_skip("100 200-203") == [100, 200, 201, 202, 203]
    assert parse_iterations_to_skip("7,3 3") == [3, 7]
    assert parse_iterations_to_skip(["5", "1-2"]) == [1, 2, 5]
    assert parse_iterations_to_skip("") == [] and parse_iterations_to_skip(None) == []
    for bad in ("x", "5-2", "1.5"):
        with pytest.raises(DataError):
            parse_iterations_to_skip(bad)
