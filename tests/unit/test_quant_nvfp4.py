"""CPU NVFP4 fake quant vs modelopt's NVFP4QTensor and kernel rules: `python -m pytest -q tests/unit/test_quant_nvfp4.py`."""

import copy
import itertools

import pytest
import torch
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # required: fails, never skips

from train.quant import nvfp4_fake_quant, nvfp4_fake_quant_forward
from train.quant.nvfp4 import _e2m1_round

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def qtensor_qdq(x, amax=None):
    """modelopt's NVFP4QTensor.quantize -> dequantize (padding the last dim to 16 first)."""
    k = x.shape[-1]
    xp = torch.nn.functional.pad(x, (0, (-k) % 16)) if k % 16 else x
    sf2 = None if amax is None else torch.as_tensor(amax).float() / (6.0 * 448.0)
    q, s, s2 = NVFP4QTensor.quantize(xp.clone(), 16, weights_scaling_factor_2=sf2)
    y = q.dequantize(dtype=x.dtype, scale=s, double_scale=s2, block_sizes={-1: 16})
    return y[..., :k]


def sample(kind, shape, scale, gen):
    if kind == "normal":
        x = torch.randn(shape, generator=gen)
    elif kind == "heavy":  # Student-t, 3 dof: blocks often dominated by one outlier
        x = _student_t(shape, gen)
    elif kind == "uniform":
        x = torch.rand(shape, generator=gen) * 2 - 1
    elif kind == "lognormal":  # per-element magnitudes over many decades
        x = torch.exp(torch.randn(shape, generator=gen) * 3) * torch.sign(torch.randn(shape, generator=gen))
    return x * scale


def _student_t(shape, gen):
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((*shape, 3), generator=gen).pow(2).sum(-1) / 3.0
    return z / chi2.sqrt()


SHAPES = [(16,), (4, 64), (3, 5, 32), (2, 48), (7, 160)]
SCALES = [1e-6, 1e-4, 1e-2, 1.0, 30.0, 1e4]
KINDS = ["normal", "heavy", "uniform", "lognormal"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_nvfp4qtensor_bitwise_on_random_tensors(dtype):
    """reference="qtensor" equals NVFP4QTensor quantize->dequantize exactly on every tensor."""
    gen = torch.Generator().manual_seed(1234)
    n = 0
    for seed, shape, scale, kind in itertools.product(range(2), SHAPES, SCALES, KINDS):
        x = sample(kind, shape, scale, gen).to(dtype)
        if not torch.isfinite(x).all():  # float16 overflow
            continue
        expected = qtensor_qdq(x)
        got = nvfp4_fake_quant_forward(x, reference="qtensor")
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected), (seed, shape, scale, kind)
        # with an explicit (calibrated) amax, larger or smaller than the data's
        for amax in (x.float().abs().max() * 3, x.float().abs().max() / 2):
            assert torch.equal(
                nvfp4_fake_quant_forward(x, amax, reference="qtensor"), qtensor_qdq(x, amax)
            ), (seed, shape, scale, kind, float(amax))
        n += 1
    assert n > 200


def test_kernel_reference_equals_qtensor_where_modelopt_agrees():
    """Default (kernel) numerics equal NVFP4QTensor whenever no block scale is tiny or underflows."""
    gen = torch.Generator().manual_seed(7)
    for seed, shape, scale, kind in itertools.product(range(3), SHAPES, [1e-2, 1.0, 1e4], KINDS):
        x = sample(kind, shape, scale, gen)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            xp = torch.nn.functional.pad(xd.float(), (0, (-shape[-1]) % 16))
            bmax = xp.reshape(-1, 16).abs().amax(-1)
            gs = xd.float().abs().max() / 2688.0
            safe = bool((bmax / (6 * gs) >= 2.0**-9).all() and (bmax / 6 > 2e-5).all())
            if safe:
                assert torch.equal(nvfp4_fake_quant_forward(xd), qtensor_qdq(xd))


def test_values_land_on_e2m1_grid_times_block_scale():
    """Each output is +-(E2M1 value) * (E4M3 value) * amax/2688, saturating at 6 * block scale."""
    gen = torch.Generator().manual_seed(3)
    x = _student_t((32, 128), gen) * 5
    y = nvfp4_fake_quant(x)
    gs = x.abs().max() / 2688.0
    xb, yb = x.reshape(-1, 16), y.reshape(-1, 16)
    block_scale = (xb.abs().amax(-1, keepdim=True) / (6 * gs)).clamp(max=448)
    e4m3 = block_scale.to(torch.float8_e4m3fn).float()
    scale = e4m3 * gs
    candidates = GRID * scale.unsqueeze(-1)  # (blocks, 1, 8): every representable magnitude
    assert (yb.abs().unsqueeze(-1) == candidates).any(-1).all()
    assert torch.equal(torch.sign(yb[yb != 0]), torch.sign(xb[yb != 0]))
    assert (yb.abs() <= 6 * scale).all()
    # the error never exceeds half a grid step of the block (plus the block-scale rounding)
    assert ((yb - xb).abs() <= scale * 1.0 + 1e-6).all()
    # the tensor's largest value is reproduced up to the E4M3 rounding of its block scale
    assert torch.isclose(y.abs().max(), x.abs().max(), rtol=2**-3)


def test_round_half_to_even_on_the_e2m1_grid():
    """Exact midpoints round to the even E2M1 code: .25->0 .75->1 1.25->1 1.75->2 2.5->2 3.5->4 5->4."""
    # amax 6*448*2**-9... choose amax so that gs * e4m3(scale) == 1 exactly: block amax 6, amax 2688
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0])
    x = torch.cat([mids, -mids]).reshape(1, 16)
    for reference in ("kernel", "qtensor"):
        y = nvfp4_fake_quant_forward(x, amax=2688.0, reference=reference)
        assert torch.equal(y, torch.cat([expected, -expected]).reshape(1, 16)), reference
    assert torch.equal(qtensor_qdq(x, 2688.0), torch.cat([expected, -expected]).reshape(1, 16))
    # just off the midpoints, round to the nearest
    eps = 1e-3
    y = nvfp4_fake_quant_forward(torch.cat([mids[:7] + eps, mids[:7] - eps, torch.tensor([6.0, 0])]).reshape(1, 16), 2688.0)
    assert torch.equal(y[0, :7], torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]))
    assert torch.equal(y[0, 7:14], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]))


def test_zero_tiny_and_huge_edge_cases():
    """All-zero tensors/blocks, E4M3 underflow, the 1e-5 kernel floor and a single huge outlier."""
    z = torch.zeros(4, 32)
    assert torch.equal(nvfp4_fake_quant(z), z)
    assert torch.isnan(qtensor_qdq(z)).all()  # modelopt's NVFP4QTensor divides 0 by 0 here
    assert torch.isnan(nvfp4_fake_quant_forward(z, reference="qtensor")).all()

    # all-zero blocks inside a normal tensor: zero in both references, equal to NVFP4QTensor
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[:, 16:32] = 0
    x[2] = 0
    for reference in ("kernel", "qtensor"):
        y = nvfp4_fake_quant_forward(x, reference=reference)
        assert (y[:, 16:32] == 0).all() and (y[2] == 0).all()
        assert torch.equal(y, qtensor_qdq(x))

    # single huge outlier: its block keeps it (to 3 mantissa bits), other blocks' scales underflow
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    x[0, 5] = 1e7
    y_kernel = nvfp4_fake_quant_forward(x)
    y_qt = nvfp4_fake_quant_forward(x, reference="qtensor")
    assert torch.equal(y_qt, qtensor_qdq(x))
    assert y_kernel[0, 5] == y_qt[0, 5]
    assert torch.isclose(y_kernel[0, 5], torch.tensor(1e7), rtol=1e-6)  # block scale 448 * gs
    # block_amax / (6 * gs) < 2**-10 -> E4M3 flushes to 0: the kernel uses scale 1.0 (values
    # round on the unit E2M1 grid), NVFP4QTensor clamps the E4M3 scale to 2**-9.
    gs = 1e7 / 2688.0
    other = x[1].reshape(-1, 16)
    assert (other.abs().amax(-1) / (6 * gs) < 2**-10).all()
    unit = torch.where(x[1] >= 0, 1.0, -1.0) * _e2m1_round(x[1].abs())
    assert torch.equal(y_kernel[1], unit)
    qt_scale = torch.tensor(2.0**-9) * torch.tensor(gs, dtype=torch.float32)
    assert (y_qt[1].abs().unsqueeze(-1) == GRID * qt_scale).any(-1).all()
    assert not torch.equal(y_kernel[1], y_qt[1])

    # tiny tensor: every block scale is below the kernel's 1e-5 floor -> zeros; NVFP4QTensor
    # quantizes it normally.
    t = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)) * 1e-6
    assert torch.equal(nvfp4_fake_quant(t), torch.zeros_like(t))
    assert torch.equal(nvfp4_fake_quant_forward(t, reference="qtensor"), qtensor_qdq(t))
    assert (qtensor_qdq(t) != 0).any()


def test_last_dim_not_multiple_of_16_is_zero_padded():
    """K % 16 != 0: the row is zero-padded to whole blocks (as modelopt does) and sliced back."""
    x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(4))
    y = nvfp4_fake_quant(x)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (0, 11))
    assert torch.equal(y, nvfp4_fake_quant(padded, amax=x.abs().max())[..., :37])
    assert torch.equal(nvfp4_fake_quant_forward(x, reference="qtensor"), qtensor_qdq(x))


def test_straight_through_gradient():
    """Identity gradient by default; pass_through_bwd=False zeroes it where |x| > amax (modelopt)."""
    x = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(4, 32)
    nvfp4_fake_quant(x).backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    amax = x.detach().abs().max() / 2
    y = nvfp4_fake_quant(x, amax, pass_through_bwd=False)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(x.detach().abs() <= amax, g, torch.zeros_like(g)))
    assert (y.detach().abs() <= amax * (1 + 2**-3)).all()  # clipped at amax (up to E4M3 rounding)
    xb = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    yb = nvfp4_fake_quant(xb)
    assert yb.dtype == torch.bfloat16
    yb.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and (xb.grad == 1).all()


def test_bad_arguments():
    """Unknown reference and integer tensors raise clear errors."""
    with pytest.raises(ValueError, match="reference"):
        nvfp4_fake_quant(torch.randn(16), reference="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        nvfp4_fake_quant_forward(torch.arange(16))
    assert nvfp4_fake_quant(torch.randn(0, 16)).shape == (0, 16)


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 16),
    )


@pytest.mark.parametrize("via", ["stock-config", "named-backend"])
def test_mtq_quantize_nvfp4_on_cpu(via):
    """mtq.quantize(NVFP4 config) on a CPU model: calibrates, fake-quantizes forward, backprops."""
    import modelopt.torch.quantization as mtq
    from train.quant import nvfp4_backend_config, register_cpu_nvfp4_backend

    assert register_cpu_nvfp4_backend() == register_cpu_nvfp4_backend() == "train_nvfp4"
    cfg = mtq.NVFP4_DEFAULT_CFG if via == "stock-config" else nvfp4_backend_config()
    ref = _tiny_model()
    model = copy.deepcopy(ref)
    calib = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def forward_loop(m):
        for batch in calib:
            m(batch)

    mtq.quantize(model, cfg, forward_loop)
    lin = model[0]
    assert lin.weight_quantizer.is_enabled and lin.input_quantizer.is_enabled
    assert lin.input_quantizer.backend == (None if via == "stock-config" else "train_nvfp4")
    amax_in = lin.input_quantizer.amax
    assert torch.equal(amax_in.reshape(()), torch.stack([b.abs().max() for b in calib]).max())

    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(9))
    y, y_ref = model(x), ref(x)
    assert not torch.equal(y, y_ref)
    rel = (y - y_ref).norm() / y_ref.norm()
    assert 1e-3 < rel < 0.3, rel
    # first layer output is exactly F.linear of our fake-quantized input and weight
    expected = torch.nn.functional.linear(
        nvfp4_fake_quant(x, amax_in), nvfp4_fake_quant(ref[0].weight, lin.weight_quantizer.amax),
        ref[0].bias,
    )
    assert torch.equal(lin(x), expected)

    y.square().mean().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
