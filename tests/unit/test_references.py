"""Critical code against references it shares nothing with: `python -m pytest -q tests/unit/test_references.py`.

Each module below is also tested against the project's own naive version (test_distill_chunked.py,
test_losses.py, test_data_datasets.py); a bug made in both places at once (T instead of T^2 in the
KD loss and its naive reference) passes those tests. Here the references are torch's own
F.kl_div / F.cross_entropy, numbers worked out by hand, and plain Python loops.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.synthetic_data import write_documents
from train.data.blended_dataset import BlendedDataset, build_blending_indices
from train.data.gpt_dataset import GPTDataset
from train.distill.chunked import chunked_distill_loss
from train.distill.loss import full_logits_loss, kd_loss_reference
from train.losses import language_model_loss, linear_cross_entropy, masked_cross_entropy
from train.models import build_model, init_weights
from train.models.common.rope import rope_inverse_frequencies
from train.quant.nvfp4 import _e2m1_round


def close(got, expected):
    """got (fp32 math inside the losses) equals the float64 reference to fp32 precision."""
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ KD loss
def torch_kd_loss(student_logits, teacher_logits, mask, temperature):
    """T^2 x KL(teacher || student) at temperature T per token (F.kl_div), mean over the mask."""
    student = F.log_softmax(student_logits.double() / temperature, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.double() / temperature, dim=-1).flatten(0, -2)
    per_token = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)  # (N,)
    selected = mask.flatten().bool()
    return temperature**2 * per_token[selected].mean()


def kd_inputs(seed=0, batch=2, seq=9, dim=8, vocab=30):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, seq, dim, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).double()
    return hidden, weight, teacher_hidden, teacher_weight, targets, mask


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_kd_loss_equals_torch_kl_div_times_t_squared(temperature):
    h, w, th, tw, targets, mask = kd_inputs()
    expected = torch_kd_loss(h @ w.T, th @ tw.T, mask, temperature)
    close(kd_loss_reference(h @ w.T, th @ tw.T, mask, temperature), expected)
    chunked = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=temperature, chunk_size=4)
    close(chunked, expected)
    # gradients: autograd through torch's definition vs the chunked loss's gradient made in forward
    expected_grads = torch.autograd.grad(expected, (h, w))
    for got, want in zip(torch.autograd.grad(chunked, (h, w)), expected_grads):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_kd_and_lm_terms_add_as_documented():
    h, w, th, tw, targets, mask = kd_inputs(1)
    temperature, lm_weight, kd_weight = 2.0, 0.3, 0.7
    selected = mask.flatten().bool()
    ce = F.cross_entropy((h @ w.T).flatten(0, 1)[selected], targets.flatten()[selected])
    expected = kd_weight * torch_kd_loss(h @ w.T, th @ tw.T, mask, temperature) + lm_weight * ce
    cfg = SimpleNamespace(temperature=temperature, lm_loss_weight=lm_weight, kd_loss_weight=kd_weight)
    close(full_logits_loss(h @ w.T, th @ tw.T, targets, mask, cfg, None), expected)
    chunked = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=temperature, lm_loss_weight=lm_weight,
                                   kd_loss_weight=kd_weight, chunk_size=5)
    close(chunked, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_hand_computed(temperature):
    """Two tokens, one position. Teacher logits (T ln 3, 0) -> p_t = (3/4, 1/4) at temperature T;
    student logits (0, 0) -> p_s = (1/2, 1/2). KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...,
    times T^2: 0.1308120 at T = 1, 0.5232481 at T = 2."""
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = torch.tensor(kl * temperature**2, dtype=torch.float32)
    student_logits = torch.tensor([[[0.0, 0.0]]])
    teacher_logits = torch.tensor([[[temperature * math.log(3.0), 0.0]]])
    mask = torch.ones(1, 1)
    torch.testing.assert_close(kd_loss_reference(student_logits, teacher_logits, mask, temperature), expected)
    # the chunked loss takes hidden states and lm_head weights: identity weights make hidden = logits
    eye = torch.eye(2)
    got = chunked_distill_loss(student_logits, eye, teacher_logits, eye, torch.zeros(1, 1, dtype=torch.long), mask,
                               temperature=temperature)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ LM loss
def torch_masked_cross_entropy(logits, targets, mask):
    """F.cross_entropy's mean over the positions whose mask is 1."""
    selected = mask.flatten().bool()
    return F.cross_entropy(logits.flatten(0, -2)[selected].double(), targets.flatten()[selected])


def test_lm_loss_fused_and_plain_equal_torch_cross_entropy():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (2, 11), generator=g)
    mask = (torch.rand(2, 11, generator=g) > 0.4).double()
    expected = torch_masked_cross_entropy(hidden @ weight.T, targets, mask)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    plain = masked_cross_entropy(hidden @ weight.T, targets, mask)
    fused = linear_cross_entropy(hidden, weight, targets, mask, chunk_bytes=4 * 40 * 3)  # chunks of 3 rows
    for got in (plain, fused):
        close(got, expected)
        for grad, want in zip(torch.autograd.grad(got, (hidden, weight)), expected_grads):
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


def test_language_model_loss_on_a_model_equals_torch_cross_entropy():
    model = init_weights(build_model("debug-qwen3", device="cpu"), 4).double()
    g = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, model.args.vocab_size, (2, 10), generator=g)
    targets = torch.randint(0, model.args.vocab_size, (2, 10), generator=g)
    mask = (torch.rand(2, 10, generator=g) > 0.3).double()
    with torch.no_grad():
        expected = torch_masked_cross_entropy(model(inputs), targets, mask)
        got = language_model_loss(model, inputs, targets, mask)  # the fused path: lm_head is a plain Linear
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ blending
@pytest.mark.parametrize("weights", [[0.2, 0.3], [0.25, 0.75], [2.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.05], [5.0]])
@pytest.mark.parametrize("size", [1, 7, 100, 1000])
def test_blend_counts_equal_a_brute_force_count(weights, size):
    """Weights need not sum to 1: [0.2, 0.3] is a 40/60 blend."""
    dataset_index, dataset_sample_index = build_blending_indices(weights, size)
    assert len(dataset_index) == len(dataset_sample_index) == size
    shares = [w / sum(weights) for w in weights]
    seen = [0] * len(weights)
    for i, (source, sample) in enumerate(zip(dataset_index.tolist(), dataset_sample_index.tolist())):
        assert sample == seen[source]  # the k-th pick of a source reads its k-th sample
        seen[source] += 1
        for d, share in enumerate(shares):  # after every prefix, each source is within ~1 of its share
            assert abs(seen[d] - share * (i + 1)) <= 1.5, (i, d, seen)
    assert BlendedDataset.samples_per_dataset(weights, size) == seen
    assert all(abs(count - share * size) < 1 for count, share in zip(seen, shares))  # floor or ceil of its share


# ------------------------------------------------------------------ sequence packing
def plain_packer(documents, document_order, seq_length):
    """Concatenate the documents in order; sample j is tokens j*L .. j*L + L (L + 1 tokens)."""
    stream = []
    for d in document_order:
        stream.extend(documents[d])
    count = (len(stream) - 1) // seq_length
    return [stream[j * seq_length: j * seq_length + seq_length + 1] for j in range(count)]


@pytest.mark.parametrize("seq_length,num_samples", [(4, None), (5, 40), (3, 7), (16, 9)])
def test_packing_equals_a_plain_python_packer(tmp_path, seq_length, num_samples):
    # lengths 1 to 13, an empty-ish one-token document included; tokens name their document
    lengths = [6, 1, 13, 8, 4, 10, 2]
    documents = [[d * 100 + k + 1 for k in range(n - 1)] + [0] for d, n in enumerate(lengths)]
    prefix = write_documents(str(tmp_path / "docs_text_document"), documents)
    dataset = GPTDataset(prefix, seq_length, num_samples=num_samples, seed=11, eod_token_id=0, eod_mask_loss=True)
    order = dataset.document_index.tolist()
    epochs = len(order) // len(documents)
    for epoch in range(epochs):  # every epoch visits each document once
        assert sorted(order[epoch * len(documents): (epoch + 1) * len(documents)]) == list(range(len(documents)))
    packed = plain_packer(documents, order, seq_length)
    expected_count = num_samples if num_samples is not None else (sum(lengths) - 1) // seq_length
    assert len(dataset) == expected_count
    samples = sorted(dataset.shuffle_index.tolist())
    assert len(set(samples)) == len(samples) and samples[-1] < len(packed)  # no sample read twice
    for i in range(len(dataset)):
        item = dataset[i]
        expected = packed[int(dataset.shuffle_index[i])]
        assert item["tokens"].tolist() == expected
        assert item["loss_mask"].tolist() == [0.0 if t == 0 else 1.0 for t in expected[1:]]


# ------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("original_len, head_dim", [(8192, 128), (16, 16)])
def test_llama3_rope_frequencies_equal_transformers(original_len, head_dim):
    """LLaMA 3.1's frequency bands (the rope_scaling of meta-llama/Llama-3.1-8B's config.json) against
    transformers' own rope initialization; unscaled frequencies against 1 / theta^(2i / d)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original_len}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=500_000.0,
                         rope_scaling=scaling, max_position_embeddings=16 * original_len)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(rope_inverse_frequencies(head_dim, 500_000.0, scaling), expected.float())
    plain = torch.tensor([500_000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)])
    torch.testing.assert_close(rope_inverse_frequencies(head_dim, 500_000.0), plain)


# ------------------------------------------------------------------ NVFP4 (E2M1) rounding
def e2m1_round_reference(value: float) -> float:
    """The nearest E2M1 magnitude, ties to the even code (the grid's index is the 3-bit code); past 6: 6."""
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    distances = [abs(value - g) for g in grid]
    nearest = min(distances)
    codes = [code for code, distance in enumerate(distances) if distance == nearest]
    return grid[min(codes, key=lambda code: code % 2)]  # a tie: the even code


def test_e2m1_rounding_equals_a_plain_reference():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    near = [t + d for t in ties for d in (-1e-3, 1e-3)]
    uniform = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 7.0
    values = torch.tensor(ties + near + [0.0, 6.0, 6.5, 100.0] + uniform.tolist())
    expected = torch.tensor([e2m1_round_reference(v) for v in values.tolist()])
    torch.testing.assert_close(_e2m1_round(values), expected, rtol=0, atol=0)
    assert [e2m1_round_reference(t) for t in ties] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # by hand
