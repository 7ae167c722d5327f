"""Pure-PyTorch NVFP4 fake quantization with nvidia-modelopt's numerics (works on CPU and CUDA).

NVFP4 = E2M1 values in blocks of 16 along the last dimension, one FP8 E4M3 scale per block and one
FP32 scale per tensor. modelopt (0.47) has two slightly different definitions, both reproduced here
bit for bit (apart from the GPU's approximate division, see below):

``reference="kernel"`` (default) -- modelopt's fake-quant kernel, i.e. what ``TensorQuantizer``
runs for ``NVFP4_DEFAULT_CFG`` during QAT/QAD on a GPU
(``modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py::fp4_fake_quant_block`` with
``common/nvfp4_quant.py``)::

    gs    = float32(amax) / 2688                       # 2688 = 6 * 448; per-tensor scale
    gs    = gs if gs > 0 else 1e-12
    s     = e4m3_rne(min(block_amax / (6 * gs), 448)) * gs   # per-block scale, e4m3 may flush to 0
    s     = s if s >= 1e-5 else 1.0                     # also catches zero blocks / flushed scales
    q     = e2m1_round(|x| / s)                          # ties to even: .25->0 .75->1 1.25->1
                                                         # 1.75->2 2.5->2 3.5->4 5->4; >5 -> 6
    y     = (q * s if x >= 0 else -q * s).to(x.dtype)

``reference="qtensor"`` -- ``NVFP4QTensor.quantize`` followed by ``.dequantize`` (the export /
real-quantization path)::

    gs    = float32(amax) / 2688                       # no guard: an all-zero tensor gives NaN
    r     = block_amax / (6 * gs); r[r == 0] = 1.0
    s     = e4m3_rne(clamp(r, 2**-9, 448)) * gs         # underflow clamps to the smallest subnormal
    y     = (sign(x) * e2m1_round(|x| / s) * s).to(x.dtype)

The two agree except for (a) all-zero tensors (kernel: zeros, qtensor: NaN), (b) blocks whose
E4M3 scale underflows (block_amax < amax / 2**19, kernel: scale 1.0 so the block is usually
flushed to 0, qtensor: scale 2**-9 * gs), (c) blocks whose real scale is below 1e-5, i.e.
block_amax below about 6e-5 (kernel: scale 1.0, so the block becomes 0; qtensor: quantized
normally). All arithmetic is float32 with IEEE rounding; the Triton kernel divides with
``div.full.f32`` (<= 2 ulp), so on CUDA the kernel can differ by one E2M1 step for values that
sit exactly on (or within 2 ulp of) a rounding boundary.

A last dimension that is not a multiple of the block size is zero-padded per row (zeros do not
change the block amax) and sliced back, as both the kernel and ``NVFP4QTensor`` do.

Gradient: straight-through. ``pass_through_bwd=True`` (modelopt's default) is the identity;
``False`` is modelopt's clipped STE, ``grad * (|x| <= amax)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["E2M1_GRID", "nvfp4_fake_quant", "nvfp4_fake_quant_forward"]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE = 16
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_KERNEL_MIN_SCALE = 1e-5  # fp4_fake_quant_kernel: scales below this become 1.0
_KERNEL_ZERO_GLOBAL_SCALE = 1e-12  # fp4_fake_quant_kernel: stand-in for a zero global scale
_REFERENCES = ("kernel", "qtensor")


def _e2m1_round(a: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 ``a`` to the E2M1 grid, ties to even (modelopt's thresholds)."""
    q = torch.full_like(a, 6.0)
    # Applied from the top down so the smallest matching threshold wins, exactly like the
    # kernel's nested tl.where chain (<= at ties that round down, < at ties that round up).
    q = torch.where(a <= 5.0, 4.0, q)
    q = torch.where(a < 3.5, 3.0, q)
    q = torch.where(a <= 2.5, 2.0, q)
    q = torch.where(a < 1.75, 1.5, q)
    q = torch.where(a <= 1.25, 1.0, q)
    q = torch.where(a < 0.75, 0.5, q)
    q = torch.where(a <= 0.25, 0.0, q)
    return q


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round float32 ``v`` (already within [0, 448]) to E4M3 (round to nearest even), as float32."""
    return v.to(torch.float8_e4m3fn).to(torch.float32)


def _global_amax(x: torch.Tensor, amax) -> torch.Tensor:
    if amax is None:
        return x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    amax = torch.as_tensor(amax, device=x.device).detach().float()
    return amax.amax() if amax.numel() != 1 else amax.reshape(())


def nvfp4_fake_quant_forward(
    x: torch.Tensor, amax=None, *, reference: str = "kernel", block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """NVFP4 quantize->dequantize of ``x`` (no autograd; see the module docstring for numerics)."""
    if reference not in _REFERENCES:
        raise ValueError(f"reference must be one of {_REFERENCES}, got {reference!r}")
    if not x.is_floating_point():
        raise TypeError(f"nvfp4_fake_quant needs a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return x.clone()
    shape, dtype = x.shape, x.dtype
    xf = x.detach().reshape(-1, shape[-1] if x.dim() else 1).float()
    k = xf.shape[-1]
    pad = (-k) % block_size
    if pad:
        xf = F.pad(xf, (0, pad))
    xf = xf.reshape(xf.shape[0], -1, block_size)
    xa = xf.abs()
    block_amax = xa.amax(dim=-1, keepdim=True)
    gs = _global_amax(x, amax) / (E2M1_MAX * E4M3_MAX)

    if reference == "kernel":
        gs = torch.where(gs > 0, gs, torch.full_like(gs, _KERNEL_ZERO_GLOBAL_SCALE))
        ratio = torch.clamp_max(block_amax / (E2M1_MAX * gs), E4M3_MAX)
        scale = _to_e4m3(ratio) * gs
        min_scale = torch.tensor(_KERNEL_MIN_SCALE, dtype=torch.float32, device=x.device)
        scale = torch.where(scale >= min_scale, scale, torch.ones_like(scale))
        q = _e2m1_round(xa / scale) * scale
        y = torch.where(xf >= 0, q, -q)
    else:  # NVFP4QTensor.quantize -> dequantize
        ratio = block_amax / (E2M1_MAX * gs)
        ratio = torch.where(ratio == 0, torch.ones_like(ratio), ratio)
        scale = _to_e4m3(ratio.clamp(min=2.0**-9, max=E4M3_MAX)) * gs
        q = _e2m1_round(xa / scale)
        # NVFP4QTensor sets the sign bit only for x < 0.
        y = torch.where(xf < 0, -q, q) * scale

    y = y.reshape(y.shape[0], -1)
    if pad:
        y = y[:, :k]
    return y.reshape(shape).to(dtype)


class _NVFP4FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, amax, reference, pass_through_bwd, block_size):
        global_amax = _global_amax(x, amax)
        if not pass_through_bwd:
            ctx.save_for_backward(x, global_amax)
        ctx.pass_through_bwd = pass_through_bwd
        return nvfp4_fake_quant_forward(x, global_amax, reference=reference, block_size=block_size)

    @staticmethod
    def backward(ctx, grad):
        if ctx.pass_through_bwd:
            return grad, None, None, None, None
        x, global_amax = ctx.saved_tensors
        return torch.where(x.abs() <= global_amax, grad, torch.zeros_like(grad)), None, None, None, None


def nvfp4_fake_quant(
    x: torch.Tensor,
    amax=None,
    *,
    reference: str = "kernel",
    pass_through_bwd: bool = True,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """NVFP4 fake quantization of ``x`` (blocks of 16 along the last dim) with a straight-through gradient.

    ``amax``: the per-tensor amax (tensor or float; a non-scalar tensor is reduced with ``amax()``,
    as modelopt does); ``None`` uses ``x.abs().amax()``. ``reference``: ``"kernel"`` (modelopt's
    fake-quant kernel, default) or ``"qtensor"`` (``NVFP4QTensor`` quantize/dequantize).
    ``pass_through_bwd``: identity gradient (True, modelopt's default) or gradient zeroed where
    ``|x| > amax`` (False). ``block_size``: 16 for NVFP4. Returns a tensor of ``x``'s shape, dtype and device.
    """
    if reference not in _REFERENCES:
        raise ValueError(f"reference must be one of {_REFERENCES}, got {reference!r}")
    return _NVFP4FakeQuant.apply(x, amax, reference, pass_through_bwd, block_size)
