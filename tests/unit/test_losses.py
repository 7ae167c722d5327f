"""train.losses: the lm_head-fused chunked cross entropy equals the logits path in value and gradients."""

import pytest
import torch
from torch import nn

from train.losses import fused_loss_applies, language_model_loss, linear_cross_entropy, masked_cross_entropy


def _inputs(rows=24, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, dim, generator=g)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    mask = (torch.rand(rows, generator=g) > 0.3).float()
    return hidden, weight, targets, mask


def _grads(loss_fn, hidden, weight):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight)
    (3.0 * loss).backward()  # an upstream scale, as gradient accumulation gives
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [1, 5, 24, 100])
def test_fused_equals_logits_path(chunk_rows):
    hidden, weight, targets, mask = _inputs()
    naive = _grads(lambda h, w: masked_cross_entropy((h @ w.T)[None], targets[None], mask[None]), hidden, weight)
    fused = _grads(lambda h, w: linear_cross_entropy(h, w, targets, mask, chunk_bytes=4 * 50 * chunk_rows),
                   hidden, weight)
    for a, b in zip(naive, fused):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_fused_bf16_autocast_close_to_logits_path():
    hidden, weight, targets, mask = _inputs(rows=64, dim=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = _grads(lambda h, w: masked_cross_entropy(nn.functional.linear(h, w)[None], targets[None], mask[None]), hidden, weight)
        fused = _grads(lambda h, w: linear_cross_entropy(h, w, targets, mask, chunk_bytes=4 * 300 * 16),
                       hidden, weight)
    assert fused[2].dtype == torch.float32  # master-weight gradient stays fp32
    for a, b in zip(naive, fused):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-2)


def test_masked_out_rows_get_no_gradient_and_empty_mask_gives_zero():
    hidden, weight, targets, mask = _inputs()
    mask[:10] = 0
    _, grad_hidden, _ = _grads(lambda h, w: linear_cross_entropy(h, w, targets, mask, chunk_bytes=4 * 50 * 5),
                               hidden, weight)
    assert grad_hidden[:10].abs().max() == 0 and grad_hidden[10:].abs().max() > 0
    loss, grad_hidden, grad_weight = _grads(
        lambda h, w: linear_cross_entropy(h, w, targets, torch.zeros_like(mask)), hidden, weight)
    assert loss == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_no_grad_gives_the_same_value():
    hidden, weight, targets, mask = _inputs()
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, targets, mask)
    torch.testing.assert_close(value, masked_cross_entropy((hidden @ weight.T)[None], targets[None], mask[None]))


def test_fused_path_only_for_a_plain_linear():
    assert fused_loss_applies(nn.Linear(4, 8, bias=False))
    assert not fused_loss_applies(nn.Linear(4, 8, bias=True))

    class Adapted(nn.Linear):
        pass
    assert not fused_loss_applies(Adapted(4, 8, bias=False))  # QuantLinear / LoRA-like subclasses


def test_model_loss_equals_logits_loss_tied_and_untied():
    from train.models import build_model
    from train.models.registry import get_model_args

    for name in ("tiny-qwen3", "tiny-llama3", "tiny-gpt2"):  # tied, untied, LayerNorm + tied
        model = build_model(get_model_args(name), device="cpu", seed=0)
        ids = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
        inputs, targets, mask = ids[:, :-1], ids[:, 1:], torch.ones(2, 16)
        fused = language_model_loss(model, inputs, targets, mask)
        fused.backward()
        fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        naive = masked_cross_entropy(model(inputs), targets, mask)
        naive.backward()
        torch.testing.assert_close(fused, naive)
        for n, p in model.named_parameters():
            torch.testing.assert_close(fused_grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=f"{name}: {n}")


def matmuls(run) -> int:
    """Matrix multiplies run by run(), from the torch profiler."""
    from torch.profiler import profile

    with profile() as profiler:
        run()
    return sum(event.name in ("aten::mm", "aten::addmm", "aten::addmm_") for event in profiler.events())


def test_frozen_weight_costs_no_weight_gradient():
    """A frozen lm_head (LoRA): per chunk the logits and grad_hidden, not grad_weight (V, C) @ (C, D)."""
    hidden, weight, targets, mask = _inputs()
    mask[:] = 1  # every chunk computes
    chunks = 24 // 6

    def run(weight):
        linear_cross_entropy(hidden, weight, targets, mask, chunk_bytes=4 * 50 * 6).backward()

    assert matmuls(lambda: run(weight)) == 3 * chunks
    assert matmuls(lambda: run(weight.detach())) == 2 * chunks


def test_tokens_sets_the_denominator():
    """tokens replaces the mask count: the global-batch denominator the trainer passes."""
    hidden, weight, targets, mask = _inputs()
    mean = linear_cross_entropy(hidden, weight, targets, mask)
    scaled = linear_cross_entropy(hidden, weight, targets, mask, tokens=torch.tensor(40.0))
    torch.testing.assert_close(scaled, mean * mask.sum() / 40)
    logits = (hidden @ weight.T)[None]
    torch.testing.assert_close(masked_cross_entropy(logits, targets[None], mask[None], 40.0), scaled)


def test_lm_head_runs_on_the_loss_tokens_only():
    """An answer-only mask (a quarter of the positions kept): the fused loss's FLOPs are a quarter
    of a full mask's, with the same value and gradients as the logits path."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, targets, mask = _inputs(rows=64)
    answer = torch.zeros_like(mask)
    answer[48:] = 1  # the last 16 positions: the answer

    def flops(mask):
        with FlopCounterMode(display=False) as counter:
            linear_cross_entropy(hidden, weight, targets, mask).backward()
        return counter.get_total_flops()

    assert flops(answer) * 4 == flops(torch.ones_like(mask))
    naive = _grads(lambda h, w: masked_cross_entropy((h @ w.T)[None], targets[None], answer[None]), hidden, weight)
    fused = _grads(lambda h, w: linear_cross_entropy(h, w, targets, answer), hidden, weight)
    for a, b in zip(naive, fused):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
