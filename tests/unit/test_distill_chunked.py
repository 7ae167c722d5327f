"""python -m pytest tests/unit/test_distill_chunked.py  (chunked KD loss == naive full-logits loss)"""

import pytest
import torch

from train.config import DistillConfig
from train.distill.chunked import chunked_distill_loss, chunked_distill_terms
from train.distill.loss import distill_loss, full_logits_loss, full_logits_terms, kd_loss_reference
from train.losses import masked_cross_entropy
from train.models import build_model, init_weights

B, T, D, V = 2, 12, 16, 40


def tensors(seed=0, vocab_student=V, vocab_teacher=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab_student, D, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab_teacher, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, min(vocab_student, vocab_teacher), (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    return hidden, weight, teacher_hidden, teacher_weight, targets, mask


def naive(hidden, weight, teacher_hidden, teacher_weight, targets, mask, temperature, lm_loss_weight, vocab=None):
    cfg = DistillConfig(temperature=temperature, lm_loss_weight=lm_loss_weight)
    return full_logits_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, mask, cfg, vocab)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("temperature,lm_loss_weight,chunk_size", [
    (1.0, 0.0, 5), (2.0, 0.0, 7), (0.5, 0.3, 4), (1.5, 1.0, 100), (1.0, 0.7, 1)])
def test_value_and_gradients_equal_naive(temperature, lm_loss_weight, chunk_size):
    h, w, th, tw, targets, mask = tensors()
    expected = naive(h, w, th, tw, targets, mask, temperature, lm_loss_weight)
    got = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=temperature,
                               lm_loss_weight=lm_loss_weight, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got * 3.0, h, w), grads(expected * 3.0, h, w)):  # the incoming gradient scales
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 math inside both


@pytest.mark.parametrize("kd_loss_weight", [0.0, 0.5])
def test_kd_loss_weight_scales_the_kl_term_only(kd_loss_weight):
    # kd_loss_weight 0 with lm_loss_weight 1 is QAT: the cross entropy alone, teacher ignored
    from train.losses import masked_cross_entropy
    h, w, th, tw, targets, mask = tensors(2)
    cfg = DistillConfig(temperature=2.0, lm_loss_weight=1.0, kd_loss_weight=kd_loss_weight)
    expected = full_logits_loss(h @ w.T, th @ tw.T, targets, mask, cfg, None)
    kl = naive(h, w, th, tw, targets, mask, 2.0, 0.0)
    torch.testing.assert_close(expected, kd_loss_weight * kl + masked_cross_entropy(h @ w.T, targets, mask))
    got = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=2.0, lm_loss_weight=1.0, chunk_size=5,
                               kd_loss_weight=kd_loss_weight)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, h, w), grads(expected, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if kd_loss_weight == 0:  # another teacher changes nothing
        other = chunked_distill_loss(h, w, th + 5.0, tw, targets, mask, temperature=2.0, lm_loss_weight=1.0,
                                     chunk_size=5, kd_loss_weight=0.0)
        torch.testing.assert_close(other, got)


def test_mask_excludes_tokens_and_empty_mask_is_zero():
    h, w, th, tw, targets, mask = tensors(1)
    mask[0] = 0  # a whole sequence out, including entire chunks
    got = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=2.0, lm_loss_weight=0.5, chunk_size=4)
    changed = th.clone()
    changed[0] += 10.0  # the teacher differs only where the mask is 0: nothing changes
    again = chunked_distill_loss(h, w, changed, tw, targets, mask, temperature=2.0, lm_loss_weight=0.5, chunk_size=4)
    torch.testing.assert_close(got, again)
    grad_h, = grads(got, h)
    assert float(grad_h[0].abs().max()) == 0.0 and float(grad_h[1].abs().max()) > 0
    zero = chunked_distill_loss(h, w, th, tw, targets, torch.zeros_like(mask), chunk_size=4)
    assert float(zero.detach()) == 0.0


def test_equal_models_give_zero_kl():
    h, w, _, _, targets, mask = tensors(2)
    loss = chunked_distill_loss(h, w, h.detach(), w.detach(), targets, mask, temperature=3.0, chunk_size=5)
    assert abs(float(loss.detach())) < 1e-6


def test_vocab_rule_compares_the_common_prefix():
    h, w, th, tw, targets, mask = tensors(3, vocab_student=48, vocab_teacher=44)
    targets = targets % 40  # real tokens lie below the tokenizer's size
    with pytest.raises(ValueError, match="student 48 vs teacher 44"):
        chunked_distill_loss(h, w, th, tw, targets, mask)
    with pytest.raises(ValueError, match="exceeds"):
        chunked_distill_loss(h, w, th, tw, targets, mask, vocab=46)
    got = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=2.0, lm_loss_weight=0.5, chunk_size=5, vocab=40)
    expected = naive(h, w, th, tw, targets, mask, 2.0, 0.5, vocab=40)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    got_w, = grads(got, w)
    expected_w, = grads(expected, w)
    torch.testing.assert_close(got_w, expected_w)
    assert float(got_w[40:].abs().max()) == 0.0  # padding rows: no gradient


def test_bf16_autocast_close_to_fp32():
    h, w, th, tw, targets, mask = (t.float() if t.is_floating_point() else t for t in tensors(4))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    reference = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=2.0, lm_loss_weight=0.5, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_distill_loss(h, w, th, tw, targets, mask, temperature=2.0, lm_loss_weight=0.5, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=0.05, atol=0.05)
    grad_w, = grads(got, w)
    assert grad_w.dtype == torch.float32


def test_distill_loss_on_models_matches_full_logits():
    """distill_loss on real CausalLMs (tied and untied) equals the naive loss on their logits."""
    torch.manual_seed(0)
    student = init_weights(build_model("tiny-qwen3", device="cpu"), 1)
    teacher = init_weights(build_model("tiny-qwen3", device="cpu"), 2).requires_grad_(False)
    inputs = torch.randint(0, student.args.vocab_size, (2, 10))
    targets = torch.randint(0, student.args.vocab_size, (2, 10))
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    cfg = DistillConfig(temperature=2.0, lm_loss_weight=0.5, chunk_size=6)
    loss, terms = distill_loss(student, teacher, inputs, targets, mask, cfg)
    got = grads(loss, *student.parameters())
    expected_loss, expected_terms = full_logits_terms(student(inputs), teacher(inputs), targets, mask, cfg, None)
    assert set(terms) == set(expected_terms) == {"kd_loss", "lm_loss"}
    for name in terms:  # the logged terms: unweighted T^2 KL and CE, no gradient
        assert not terms[name].requires_grad
        torch.testing.assert_close(terms[name], expected_terms[name], rtol=1e-4, atol=1e-4)  # fp32 KL of ~0.05
    torch.testing.assert_close(loss, terms["kd_loss"] + 0.5 * terms["lm_loss"], rtol=1e-5, atol=1e-6)
    expected = grads(expected_loss, *student.parameters())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_teacher_and_frozen_weight_cost_no_gradient():
    """Per chunk: student and teacher logits, grad_hidden, and grad_weight only for a trainable
    weight; nothing for the teacher (its inputs are detached)."""
    from torch.profiler import profile

    hidden, weight, teacher_hidden, teacher_weight, targets, mask = tensors()
    mask[:] = 1
    teacher_hidden.requires_grad_(), teacher_weight.requires_grad_()  # detached by the loss all the same

    def matmuls(weight) -> int:
        with profile() as profiler:
            chunked_distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, mask,
                                 chunk_size=6).backward()
        return sum(event.name in ("aten::mm", "aten::addmm", "aten::addmm_") for event in profiler.events())

    chunks = B * T // 6
    assert matmuls(weight) == 4 * chunks
    assert matmuls(weight.detach()) == 3 * chunks
    assert teacher_hidden.grad is None and teacher_weight.grad is None


def test_tokens_sets_the_denominator():
    hidden, weight, teacher_hidden, teacher_weight, targets, mask = tensors()
    kwargs = dict(temperature=2.0, lm_loss_weight=0.5, chunk_size=5)
    mean = chunked_distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, mask, **kwargs)
    summed = chunked_distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, mask, tokens=30.0, **kwargs)
    torch.testing.assert_close(summed, mean * mask.sum() / 30, check_dtype=False)
    cfg = DistillConfig(temperature=2.0, lm_loss_weight=0.5)
    reference = full_logits_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, mask, cfg, None, 30.0)
    torch.testing.assert_close(summed, reference, check_dtype=False)


def test_terms_are_the_unweighted_kl_and_cross_entropy_and_lm_loss_only_when_weighted():
    """kd_loss = T^2 KL, lm_loss = CE (what the logs show), whatever their weights; no lm_loss at weight 0."""
    h, w, th, tw, targets, mask = tensors(seed=3)
    logits, teacher_logits = h @ w.T, th @ tw.T
    kl = kd_loss_reference(logits, teacher_logits, mask, 2.0)
    ce = masked_cross_entropy(logits, targets, mask)
    loss, terms = chunked_distill_terms(h, w, th, tw, targets, mask, temperature=2.0, lm_loss_weight=0.25,
                                        kd_loss_weight=3.0, chunk_size=5)
    torch.testing.assert_close(terms["kd_loss"].double(), kl, rtol=1e-5, atol=1e-6)  # fp32 sums
    torch.testing.assert_close(terms["lm_loss"].double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), 3.0 * kl + 0.25 * ce, rtol=1e-5, atol=1e-6)
    _, kd_only = chunked_distill_terms(h, w, th, tw, targets, mask, temperature=2.0, chunk_size=5)
    assert set(kd_only) == {"kd_loss"}
    cfg = DistillConfig(temperature=2.0, lm_loss_weight=1.0, kd_loss_weight=0.0)
    assert set(full_logits_terms(logits, teacher_logits, targets, mask, cfg, None)[1]) == {"lm_loss"}


def test_vocabulary_work_runs_on_the_loss_tokens_only():
    """Half the positions masked out (the prompts): half the FLOPs of a full mask, whatever the chunking."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w, th, tw, targets, _ = tensors(3)
    answer = torch.zeros(B, T, dtype=torch.float64)
    answer[:, 1::2] = 1  # every other position: no chunk is wholly masked out

    def flops(mask):
        with FlopCounterMode(display=False) as counter:
            chunked_distill_loss(h, w, th, tw, targets, mask, temperature=2.0, chunk_size=5).backward()
        return counter.get_total_flops()

    assert flops(answer) * 2 == flops(torch.ones_like(answer))
