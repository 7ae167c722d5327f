"""Pure-PyTorch NVFP4 vs modelopt's CUDA (Triton) kernel: `python -m pytest -q -m gpu tests/gpu/test_quant_nvfp4_cuda.py`."""

import itertools

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def modelopt_kernel(x, amax):
    """modelopt's NVFP4 fake quant exactly as TensorQuantizer calls it (Triton on sm >= 89)."""
    from modelopt.torch.quantization.tensor_quant import dynamic_block_quant

    return dynamic_block_quant(x, 16, amax, None, (2, 1), (4, 3), None, None, True)


def _cases():
    gen = torch.Generator().manual_seed(0)
    for seed, shape, scale, dtype in itertools.product(
        range(3), [(16, 64), (64, 256), (3, 7, 128), (5, 40), (1024, 512)], [1e-4, 1e-2, 1.0, 1e3],
        [torch.float32, torch.bfloat16, torch.float16],
    ):
        z = torch.randn(shape, generator=gen)
        heavy = z / (torch.randn((*shape, 3), generator=gen).pow(2).mean(-1).sqrt())
        for x in (z, heavy):
            x = (x * scale).to(dtype)
            if torch.isfinite(x).all():
                yield x


def _near_decision_boundary(x, amax, ulps=4):
    """Elements whose exact |x|/scale, or whose block's E4M3 scale ratio, is within a few ulp of a
    rounding boundary (where Triton's approximate fp32 division, div.full.f32, may round the
    other way)."""
    e4m3 = lambda v: v.clamp(max=448).to(torch.float8_e4m3fn).float()  # noqa: E731
    tol = torch.finfo(torch.float32).eps * ulps
    xf = x.float().reshape(-1, 16)
    gs = amax.float().cpu() / 2688.0
    ratio = xf.abs().amax(-1, keepdim=True) / (6 * gs)
    block_flip = e4m3(ratio * (1 - tol)) != e4m3(ratio * (1 + tol))
    scale = e4m3(ratio) * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    a = xf.abs() / scale
    near = ((a.unsqueeze(-1) - BOUNDS).abs() <= (a * tol).unsqueeze(-1)).any(-1)
    return (near | block_flip).reshape(x.shape)


def test_pytorch_cuda_equals_pytorch_cpu_bitwise():
    """The pure-PyTorch code gives identical bits on CUDA and CPU."""
    from train.quant import nvfp4_fake_quant_forward

    for x in _cases():
        for reference in ("kernel", "qtensor"):
            cpu = nvfp4_fake_quant_forward(x, reference=reference)
            cuda = nvfp4_fake_quant_forward(x.cuda(), reference=reference).cpu()
            assert torch.equal(cpu, cuda) or (torch.isnan(cpu) == torch.isnan(cuda)).all()


def test_matches_modelopt_cuda_kernel():
    """Equal to modelopt's CUDA NVFP4 kernel except one-step flips at exact rounding boundaries."""
    from train.quant import nvfp4_fake_quant_forward

    total = mismatched = 0
    for x in _cases():
        xc = x.cuda()
        for amax in (xc.float().abs().amax(), xc.float().abs().amax() * 0.5):
            theirs = modelopt_kernel(xc, amax).cpu()
            ours = nvfp4_fake_quant_forward(x, amax.cpu())
            assert theirs.dtype == ours.dtype
            diff = ours != theirs
            total += x.numel()
            if diff.any():
                near = _near_decision_boundary(x, amax.cpu())
                mismatched += int(diff.sum())
                assert near[diff].all(), (x.shape, x.dtype, float(amax), ours[diff][:8], theirs[diff][:8])
    print(f"mismatches: {mismatched} / {total}")
    assert mismatched <= total * 1e-4


def test_edge_cases_match_modelopt_cuda_kernel():
    """Zeros, zero blocks, tiny tensors (scale < 1e-5), a huge outlier: same as the CUDA kernel."""
    from train.quant import nvfp4_fake_quant_forward

    g = torch.Generator().manual_seed(5)
    xs = [torch.zeros(4, 64), torch.randn(4, 64, generator=g) * 1e-6, torch.randn(8, 64, generator=g) * 1e-4]
    x = torch.randn(8, 64, generator=g)
    x[3, 7] = 1e7
    x[5] = 0
    x[:, 16:32] = 0
    xs.append(x)
    for x in xs:
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            amax = xd.cuda().float().abs().amax()
            assert torch.equal(nvfp4_fake_quant_forward(xd), modelopt_kernel(xd.cuda(), amax).cpu())


def test_nvfp4qtensor_cuda_matches_qtensor_reference():
    """reference="qtensor" equals NVFP4QTensor quantize->dequantize run on CUDA."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from train.quant import nvfp4_fake_quant_forward

    for x in _cases():
        if x.shape[-1] % 16:
            continue
        q, s, s2 = NVFP4QTensor.quantize(x.cuda().clone(), 16)
        y = q.dequantize(dtype=x.dtype, scale=s, double_scale=s2, block_sizes={-1: 16}).cpu()
        assert torch.equal(y, nvfp4_fake_quant_forward(x, reference="qtensor"))
