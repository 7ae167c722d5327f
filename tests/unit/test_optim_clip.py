"""fold_clipping_into_step (fused AdamW) equals clip_grad_norm_ + step: `python -m pytest -q tests/unit/test_optim_clip.py`."""

import pytest
import torch
from omegaconf import OmegaConf

from train.optim import build_optimizer, fold_clipping_into_step

OPTIM = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8})


def _model_and_grads(scale: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    (model(torch.randn(5, 8)).square().sum() * scale).backward()
    return model


@pytest.mark.parametrize("scale", [100.0, 1e-4])  # clipped, and below the threshold (no clipping)
def test_folded_clip_matches_clip_grad_norm(scale):
    ours = _model_and_grads(scale)
    reference = _model_and_grads(scale)  # same seed: same weights and gradients
    ours_optimizer, reference_optimizer = build_optimizer(ours, OPTIM), build_optimizer(reference, OPTIM)
    assert ours_optimizer.defaults["fused"]
    for step in range(2):
        norm = fold_clipping_into_step(ours, ours_optimizer, 1.0)
        reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch.testing.assert_close(norm, reference_norm)
        assert (ours_optimizer.grad_scale is not None) and bool(ours_optimizer.grad_scale >= 1)
        ours_optimizer.step()
        reference_optimizer.step()
        for a, b in zip(ours.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        if step == 0:  # fresh gradients for the second step
            for model in (ours, reference):
                model.zero_grad()
                (model(torch.ones(5, 8)).square().sum() * scale).backward()


def test_other_optimizers_are_left_to_the_caller():
    model = _model_and_grads(100.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.grad_scale = torch.tensor(5.0)  # e.g. left by an earlier call
    before = [p.grad.clone() for p in model.parameters()]
    assert fold_clipping_into_step(model, optimizer, 1.0) is None
    assert optimizer.grad_scale is None
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))  # untouched
