"""Grouped GEMM vs the per-expert loop on CUDA: `python -m pytest -q -m gpu tests/gpu/test_models_moe_cuda.py`."""

import time

import pytest
import torch

from train.models.common import moe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def loop_linear(x, weight, tokens_per_expert):
    chunks = x.split(tokens_per_expert.tolist())
    return torch.cat([torch.nn.functional.linear(c, weight[e]) for e, c in enumerate(chunks)])


def test_grouped_gemm_is_used_and_matches_the_loop():
    if moe._grouped_mm_dtype(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) is None:
        pytest.skip("no grouped GEMM kernel for this GPU / torch")
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.tensor([37, 0, 128, 5, 300, 1, 64, 17], device="cuda")  # uneven, one empty
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    w = torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    out = moe.grouped_linear(x, w, counts)
    out.float().pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = loop_linear(x, w, counts)
    ref.float().pow(2).sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx, x.grad, atol=5e-1, rtol=2e-2)
    torch.testing.assert_close(gw, w.grad, atol=5e-1, rtol=2e-2)


def test_bf16_autocast_moe_model_trains_on_cuda():
    from train.models import build_model
    from train.losses import language_model_loss

    model = build_model("tiny-qwen3-moe", device="cuda", seed=0)  # fp32 master weights
    ids = torch.randint(0, model.args.vocab_size, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = language_model_loss(model, ids[:, :-1], ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.float32))
    loss.backward()
    grad = model.layers[1].mlp.experts.gate_up_proj.grad
    assert torch.isfinite(loss) and grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_grouped_gemm_speed_against_the_loop():
    """Prints the ratio (not asserted beyond 'faster'): 128 experts, 8192 routed rows, bf16."""
    if moe._grouped_mm_dtype(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) is None:
        pytest.skip("no grouped GEMM kernel for this GPU / torch")
    counts = torch.full((128,), 64, device="cuda")
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, 1536, 2048, device="cuda", dtype=torch.bfloat16)

    def timed(fn):
        for _ in range(3):
            fn(x, w, counts)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn(x, w, counts)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 20

    grouped, loop = timed(moe.grouped_linear), timed(loop_linear)
    print(f"grouped {grouped * 1e3:.3f} ms, loop {loop * 1e3:.3f} ms, speed-up {loop / grouped:.1f}x")
    assert grouped < loop
